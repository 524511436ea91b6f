"""Bearer-token authentication as a grpc.aio server interceptor, and TLS server credentials.

A call must carry `authorization: Bearer <token>` metadata (what `grpc.access_token_call_credentials`
sends). The health service can be exempted so that load-balancer and Kubernetes probes, which carry no
token, still work.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        token: str,
        *,
        also: tuple[str, ...] = (),
        exempt_health: bool = True,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        # `also`: further accepted tokens (--priority-tokens)
        self._expected = tuple(f"Bearer {t}".encode() for t in (token, *also))
        self._exempt_health = exempt_health
        self._on_reject = on_reject

    def _authorized(self, metadata: tuple[tuple[str, Any], ...] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                # Constant-time comparison: the token is a secret (every one is compared, whichever matches).
                return sum(hmac.compare_digest(got, expected) for expected in self._expected) > 0
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or (self._exempt_health and method.startswith(HEALTH_PREFIX)):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        if self._on_reject is not None:
            self._on_reject(method)
        return _deny(handler)


_DENIED = "missing or invalid bearer token (send 'authorization: Bearer <token>' metadata)"


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def deny_stream_request(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny_stream_request, **kw)
    return grpc.stream_stream_rpc_method_handler(deny_stream_request, **kw)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials; with `client_ca`, clients must present a certificate signed by it (mTLS)."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )
