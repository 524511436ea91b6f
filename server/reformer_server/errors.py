"""The one error-mapping path: every RPC fails through `status_for`, so a given failure always gets the same
status code and message shape.

    InvalidRequestError                 -> INVALID_ARGUMENT  ("<field>: <message>", BadRequest field violation,
                                                              and trailing metadata reformer-error-field)
    OverloadedError / OutOfMemoryError  -> RESOURCE_EXHAUSTED (queue full / budget full carry RetryInfo)
    StalledClientError                  -> RESOURCE_EXHAUSTED (the client stopped reading)
    TokenizerUnavailableError           -> FAILED_PRECONDITION (text asked of a model without a tokenizer)
    EngineStoppedError / NotReadyError  -> UNAVAILABLE        (loading, draining, engine gone)
    NotFoundError, ContextNotFoundError -> NOT_FOUND          (Cancel of an id the caller does not own; a
                                                              context that is unknown, expired, deleted or
                                                              another caller's)
    ContextsDisabledError               -> FAILED_PRECONDITION (--context-memory 0: the server keeps none)
    anything else                       -> INTERNAL           (a bug: logged with its traceback)

Rich details use the standard `grpc-status-details-bin` trailer (google.rpc.Status), which grpcurl and
grpcio-status clients understand; the reformer SDK only needs the plain trailer.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from reformer_infer.contexts import ContextNotFoundError, ContextsDisabledError
from reformer_infer.requests import (
    EngineStoppedError,
    FinishEvent,
    FinishReason,
    InvalidRequestError,
    OutOfMemoryError,
    OverloadedError,
    TokenizerUnavailableError,
)

logger = logging.getLogger(__name__)

FIELD_METADATA_KEY = "reformer-error-field"
_DETAILS_KEY = "grpc-status-details-bin"


class NotReadyError(Exception):
    """The server is loading its model or draining; no new work is accepted (UNAVAILABLE)."""


class StalledClientError(Exception):
    """The client stopped reading its stream for longer than --stall-timeout."""


class RequestFailedError(Exception):
    """The engine reported an internal failure of one request (a bug, not the request's fault)."""


class NotFoundError(Exception):
    """No such resource for this caller (Cancel of an id the caller has no running request under)."""


class UnauthenticatedError(Exception):
    """Missing or wrong bearer token."""


Metadata = tuple[tuple[str, str | bytes], ...]


def _rich(code: grpc.StatusCode, message: str, *details: object) -> bytes:
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for d in details:
        status.details.add().Pack(d)
    return status.SerializeToString()


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, Metadata]:
    """Map an exception raised while serving a request to (code, message, trailing metadata)."""
    if isinstance(exc, InvalidRequestError):
        code = grpc.StatusCode.INVALID_ARGUMENT
        msg = str(exc)
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.message)
        detail = error_details_pb2.BadRequest(field_violations=[violation])
        return code, msg, ((FIELD_METADATA_KEY, exc.field), (_DETAILS_KEY, _rich(code, msg, detail)))
    if isinstance(exc, OverloadedError):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        msg = f"server overloaded: {exc}" if str(exc) else "server overloaded"
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
        return code, msg, ((_DETAILS_KEY, _rich(code, msg, retry)),)
    if isinstance(exc, OutOfMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory serving this request: {exc}", ()
    if isinstance(exc, TokenizerUnavailableError | ContextsDisabledError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), ()
    if isinstance(exc, StalledClientError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), ()
    if isinstance(exc, NotReadyError | EngineStoppedError):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "server is not accepting requests", ()
    if isinstance(exc, NotFoundError | ContextNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc), ()
    if isinstance(exc, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc), ()
    if isinstance(exc, RequestFailedError):
        logger.error("request failed inside the engine: %s", exc)
        return grpc.StatusCode.INTERNAL, f"internal error: {exc}", ()
    logger.exception("internal error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log", ()


def finish_error(ev: FinishEvent) -> Exception | None:
    """The exception a failed request ends with, or None when it finished normally (a time limit is normal)."""
    if ev.finish_reason is not FinishReason.ERROR or ev.error_kind == "timeout":
        return None
    if ev.error_kind == "oom":
        return OutOfMemoryError(ev.error or "out of memory")
    if ev.error_kind == "overloaded":  # waited past --max-queue-time
        return OverloadedError(ev.error or "waited too long for admission")
    return RequestFailedError(ev.error or "unknown engine error")
