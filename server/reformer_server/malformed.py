"""Request messages that do not parse get INVALID_ARGUMENT, not grpc's UNKNOWN plus a logged traceback.

grpc.aio deserialises the request before any handler or interceptor code runs; when protobuf raises
DecodeError (corrupt wire format, a string field with bad UTF-8) it answers UNKNOWN "Unexpected
<DecodeError>" and logs a full traceback at ERROR, so any client could fill the log with tracebacks by
sending garbage. This interceptor swaps in a deserialiser that returns a `Malformed` marker instead of
raising, and a behaviour that turns the marker into INVALID_ARGUMENT. Client-streaming methods (reflection)
are left as they are: their messages are parsed one by one inside the call.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request message that failed to parse."""

    reason: str


MESSAGE = "the request message could not be parsed"


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError and friends: the bytes are the client's fault
            return Malformed(str(exc))

    return parse


async def _reject(request: Malformed, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{MESSAGE}: {request.reason}")


def _guard_unary_unary(inner: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await _reject(request, context)
        return await inner(request, context)

    return behaviour


def _guard_unary_stream(inner: Callable[..., Any]) -> Callable[..., Any]:
    # A server-streaming behaviour is either an async generator or a coroutine that calls context.write.
    if inspect.isasyncgenfunction(inner):
        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await _reject(request, context)
            async for message in inner(request, context):
                yield message

        return generator
    return _guard_unary_unary(inner)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        kw = {"request_deserializer": _safe(handler.request_deserializer),
              "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_guard_unary_unary(handler.unary_unary), **kw)
        return grpc.unary_stream_rpc_method_handler(_guard_unary_stream(handler.unary_stream), **kw)
