"""Typed exceptions, one per status code a caller may want to handle differently.

    INVALID_ARGUMENT   -> InvalidRequestError (.field names the bad request field)
    RESOURCE_EXHAUSTED -> OverloadedError     (queue or cache budget full, out of memory, stalled reader)
    UNAVAILABLE        -> UnavailableError    (not reachable, loading, draining; safe to retry)
    UNAUTHENTICATED    -> AuthenticationError
    PERMISSION_DENIED  -> PermissionDeniedError
    DEADLINE_EXCEEDED  -> DeadlineExceededError
    CANCELLED          -> RequestCancelledError
    FAILED_PRECONDITION -> FailedPreconditionError (e.g. text sent to a model that has no tokenizer)
    NOT_FOUND          -> NotFoundError       (an unknown or expired context id; Cancel of an unknown id)
    INTERNAL / others  -> ServerError
"""

from __future__ import annotations

import grpc

FIELD_METADATA_KEY = "reformer-error-field"


class ReformerError(Exception):
    """Base of every SDK error. `code` is the gRPC status code name ("INVALID_ARGUMENT", ...)."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidRequestError(ReformerError, ValueError):
    """A request parameter is invalid (raised client-side before sending, or by the server)."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class OverloadedError(ReformerError):
    code = "RESOURCE_EXHAUSTED"


class UnavailableError(ReformerError):
    code = "UNAVAILABLE"


class AuthenticationError(ReformerError):
    code = "UNAUTHENTICATED"


class PermissionDeniedError(ReformerError):
    code = "PERMISSION_DENIED"


class DeadlineExceededError(ReformerError, TimeoutError):
    code = "DEADLINE_EXCEEDED"


class RequestCancelledError(ReformerError):
    code = "CANCELLED"


class FailedPreconditionError(ReformerError):
    """The server cannot do this for the loaded model (text for a model without a tokenizer: send token ids)."""

    code = "FAILED_PRECONDITION"


class NotFoundError(ReformerError):
    """NOT_FOUND: a context id that is unknown, expired, deleted or another caller's; Cancel of an id under
    which this caller has no running request."""

    code = "NOT_FOUND"


class ServerError(ReformerError):
    code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[ReformerError]] = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
}


def from_rpc_error(code: grpc.StatusCode | None, details: str | None, trailing: object = None) -> ReformerError:
    """Build the typed exception for a failed call (sync or async)."""
    message = details or (code.name if code is not None else "unknown error")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = None
        for key, value in trailing or ():  # type: ignore[attr-defined]
            if key == FIELD_METADATA_KEY:
                field = value.decode() if isinstance(value, bytes) else str(value)
        prefix = f"{field}: " if field else ""
        if field is None and ": " in message:  # an older server without the trailer: "field: message"
            field, _, rest = message.partition(": ")
            return InvalidRequestError(field, rest)
        return InvalidRequestError(field or "request", message.removeprefix(prefix))
    cls = _BY_CODE.get(code, ServerError) if code is not None else ServerError
    return cls(message, code=code.name if code is not None else None)
