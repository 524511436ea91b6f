"""`Client` (blocking) and `AsyncClient` (asyncio) for a reformer-serve server. Same methods, same types.

Lifecycle: a client owns one gRPC channel; use it as a (async) context manager or call `close()`.
Streams: `generate_stream` returns a stream object that is an (async) iterator and a context manager;
leaving it early (break, exception, `close()`, task cancellation, or just dropping it) cancels the RPC,
and the server then aborts the request and frees its cache.
Retries: unary calls (generate, model_info, tokenize, delete_context, ...) retry on UNAVAILABLE with
exponential backoff and jitter (`RetryPolicy`); streams never retry, since tokens may already have been
delivered. `create_context` (a stream of prefill progress, then the context) is not idempotent: it retries
UNAVAILABLE only while no message has arrived (the server had not taken it on), never once it has started.
Contexts: `create_context` prefills a prompt once and pins it on the server; `generate(..., context=ctx)`
continues after it, as often as needed, until its TTL passes or `delete_context`.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from reformer_client import _convert, _health
from reformer_client._proto import generation_pb2 as pb
from reformer_client._proto import generation_pb2_grpc as pb_grpc
from reformer_client.errors import NotFoundError, ReformerError, from_rpc_error
from reformer_client.types import Context, ContextInfo, GenerateResult, HealthStatus, ModelInfo, StreamEvent

T = TypeVar("T")
ContextRef = Context | ContextInfo | str  # what `context=` accepts: a context, or its id
ProgressCallback = Callable[[int, int], Any]  # on_progress(done_tokens, total_tokens)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0  # seconds, for info / tokenize / health / cancel
# A 64K-token prompt can take minutes to prefill on a CPU (and the queue may be long): generation calls
# get a generous default deadline rather than none, so a lost server never hangs a caller forever.
DEFAULT_GENERATE_TIMEOUT = 3600.0
MAX_MESSAGE_BYTES = 16 * 2**20  # matches the server's default --max-message-bytes


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Defaults matched to the server: keepalive pings every 30 s even while a long prefill sends no data
    (the server accepts pings every >= 10 s), explicit message limits, and a fixed HTTP/2 receive window.

    Without BDP probing the window stays at 64 KiB per stream, so a caller that stops reading pushes back
    on the server (its write blocks, and after --stall-timeout it aborts the request and frees the cache)
    instead of the server streaming megabytes into this process's buffers. Token streams are far below
    what a 64 KiB window carries per round trip."""
    return [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),  # retries are ours (RetryPolicy), for unary calls only
    ]


@dataclass(frozen=True)
class RetryPolicy:
    """Retry unary calls that fail with UNAVAILABLE (server restarting, draining, not yet loaded)."""

    max_attempts: int = 4
    initial_backoff: float = 0.25
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def retries(self, e: grpc.RpcError, attempt: int) -> bool:
        """Whether call number `attempt` (1-based), which failed with `e`, is tried again."""
        return e.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.max_attempts

    def delay(self, attempt: int) -> float:
        """Backoff before retry number `attempt` (1-based), with full jitter to spread reconnect storms."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(cap / 2, cap)


NO_RETRY = RetryPolicy(max_attempts=1)


def _rpc_error(e: grpc.RpcError) -> ReformerError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    return from_rpc_error(code, details, trailing)


def is_local_target(target: str) -> bool:
    """True when a gRPC target stays on this machine: a unix socket, 'localhost' or a loopback address.
    'host:port', '[::1]:port', 'dns:///host:port', 'ipv4:127.0.0.1:port' and 'ipv6:[::1]:port' are understood;
    any other name counts as remote."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme):].split(",")[0]
            break
    if t.startswith("["):  # [v6]:port
        host = t[1:t.find("]")] if "]" in t else t[1:]
    elif t.count(":") == 1:  # host:port
        host = t.split(":")[0]
    else:  # a bare host, or a bare IPv6 address
        host = t
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Settings:
    """What Client and AsyncClient share: credentials, metadata, timeouts, retry policy."""

    def __init__(
        self,
        target: str,
        *,
        tls: bool | None,
        root_certificates: bytes | None,
        private_key: bytes | None,
        certificate_chain: bytes | None,
        server_name: str | None,
        token: str | None,
        timeout: float | None,
        generate_timeout: float | None,
        retry: RetryPolicy | None,
        validate: bool,
        options: Sequence[tuple[str, Any]] | None,
        allow_insecure_token: bool = False,
    ) -> None:
        self.target = target
        self.tls = tls if tls is not None else bool(root_certificates or certificate_chain)
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.generate_timeout = DEFAULT_GENERATE_TIMEOUT if generate_timeout is None else generate_timeout
        self.retry = retry or NO_RETRY
        self.validate = validate
        self.options = list(channel_options()) + list(options or ())
        if server_name:
            self.options.append(("grpc.ssl_target_name_override", server_name))
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.credentials: grpc.ChannelCredentials | None = None
        if self.tls:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            if token:
                creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
            self.credentials = creds
        elif token:
            if not allow_insecure_token and not is_local_target(target):
                raise ValueError(
                    f"refusing to send a bearer token to {target} over a plaintext channel (anyone on the path "
                    "could read it): use tls=True / root_certificates, or pass allow_insecure_token=True (e.g. "
                    "through a TLS-terminating proxy you trust)")
            # Call credentials need a secure channel; on plaintext (loopback, or allowed above) the same header
            # is sent as metadata.
            self.metadata = (("authorization", f"Bearer {token}"),)


class GenerationStream:
    """Iterator over the events of one streamed generation (blocking). Cancels the RPC when left early."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._done = False
        self.request_id: str | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StreamEvent:
        if self._done:
            raise StopIteration
        try:
            msg = next(self._call)
        except StopIteration:
            self._done = True
            raise
        except grpc.RpcError as e:
            self._done = True
            raise _rpc_error(e) from None
        ev = _convert.stream_event(msg)
        self.request_id = ev.request_id
        return ev

    def collect(self) -> GenerateResult:
        """Consume the rest of the stream into one result."""
        builder = _convert.ResultBuilder()
        for ev in self:
            result = builder.add(ev)
            if result is not None:
                return result
        raise ReformerError("stream ended without a final message", code="INTERNAL")

    def close(self) -> None:
        """Cancel the RPC if it is still running (idempotent); the server frees the request."""
        if not self._done:
            self._done = True
            self._call.cancel()

    cancel = close

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to cancel
            pass


class AsyncGenerationStream:
    """Async iterator over the events of one streamed generation. Cancels the RPC when left early."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._done = False
        self.request_id: str | None = None

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            msg = await self._call.read()
        except asyncio.CancelledError:
            self.close()
            raise
        except grpc.RpcError as e:
            self._done = True
            raise _rpc_error(e) from None
        if msg is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        ev = _convert.stream_event(msg)
        self.request_id = ev.request_id
        return ev

    async def collect(self) -> GenerateResult:
        builder = _convert.ResultBuilder()
        async for ev in self:
            result = builder.add(ev)
            if result is not None:
                return result
        raise ReformerError("stream ended without a final message", code="INTERNAL")

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._call.cancel()

    cancel = close

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # the loop is gone: nothing left to cancel
            pass


_CLIENT_DOC = """
    target: "host:port" of the server.
    tls: use TLS (default: on when certificates are given). root_certificates: PEM CA bundle (None: system
    roots); private_key / certificate_chain: PEM client key and certificate for mutual TLS; server_name:
    override the name checked against the server certificate.
    token: bearer token sent as `authorization: Bearer <token>`. Over a plaintext channel it is sent only to a
    loopback target (else ValueError) unless allow_insecure_token=True (a TLS-terminating proxy you trust).
    timeout: deadline of unary calls in seconds (default 30); generate_timeout: deadline of generations
    (default 3600, long enough for a 64K-token prefill). Every method also takes `timeout=`.
    retry: RetryPolicy for unary calls on UNAVAILABLE (default: 4 attempts); pass NO_RETRY to disable.
    validate: check parameters client-side before sending (same messages as the server).
"""


class Client:
    __doc__ = "Blocking client of a reformer-serve server.\n" + _CLIENT_DOC

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        server_name: str | None = None,
        token: str | None = None,
        timeout: float | None = None,
        generate_timeout: float | None = None,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 (frozen dataclass: immutable default)
        validate: bool = True,
        options: Sequence[tuple[str, Any]] | None = None,
        allow_insecure_token: bool = False,
    ) -> None:
        self._s = _Settings(
            target, tls=tls, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, server_name=server_name, token=token, timeout=timeout,
            generate_timeout=generate_timeout, retry=retry, validate=validate, options=options,
            allow_insecure_token=allow_insecure_token,
        )
        if self._s.credentials is not None:
            self._channel = grpc.secure_channel(target, self._s.credentials, options=self._s.options)
        else:
            self._channel = grpc.insecure_channel(target, options=self._s.options)
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self._health = self._channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.HealthCheckRequest.SerializeToString,
            response_deserializer=_health.HealthCheckResponse.FromString,
        )

    # ---- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ------------------------------------------------------------------------------
    def _unary(self, fn: Callable[..., T], request: Any, timeout: float | None, retry: bool = True) -> T:
        policy = self._s.retry if retry else NO_RETRY
        attempt = 1
        while True:
            try:
                return fn(request, timeout=timeout, metadata=self._s.metadata)
            except grpc.RpcError as e:
                if not policy.retries(e, attempt):
                    raise _rpc_error(e) from None
            time.sleep(policy.delay(attempt))
            attempt += 1

    def generate(
        self, prompt: str | Sequence[int] = "", *, context: ContextRef | None = None, timeout: float | None = None,
        **params: Any,
    ) -> GenerateResult:
        """Generate from `prompt` (text or token ids) and return the whole result.

        context: a Context from `create_context` (or its id): the prompt continues after the context's tokens
        and may be empty; `result.usage.cached_tokens` counts the context's tokens.
        params: max_new_tokens, temperature (0 = greedy), top_k, top_p, repetition_penalty, seed, stop,
        stop_token_ids, logprobs (top-N), request_id, ignore_eos, priority, max_time_seconds,
        truncate (None | "none" | "left"). Unset parameters take the server's defaults.
        """
        request = _convert.build_request(prompt, context=context, validate=self._s.validate, **params)
        msg = self._unary(self._stub.Generate, request, timeout or self._s.generate_timeout)
        return _convert.generate_result(msg)

    def generate_stream(
        self, prompt: str | Sequence[int] = "", *, context: ContextRef | None = None, timeout: float | None = None,
        **params: Any,
    ) -> GenerationStream:
        """Stream a generation: TextChunk events as tokens arrive (PrefillProgress for long prompts), then one
        Finished event. Same parameters as `generate`."""
        request = _convert.build_request(prompt, context=context, validate=self._s.validate, **params)
        call = self._stub.GenerateStream(
            request, timeout=timeout or self._s.generate_timeout, metadata=self._s.metadata
        )
        return GenerationStream(call)

    def create_context(
        self, prompt: str | Sequence[int], *, ttl_seconds: float | None = None,
        on_progress: ProgressCallback | None = None, timeout: float | None = None,
    ) -> Context:
        """Prefill `prompt` (text or token ids) once and pin it on the server as a context, for
        `generate(..., context=...)` to continue from. Blocks until the prefill is done.

        ttl_seconds: its lifetime (default: the server's `limits.default_context_ttl_seconds`).
        on_progress(done_tokens, total_tokens) is called as a long prompt is processed. Interrupting the call
        (Ctrl-C, an exception in on_progress, the deadline) cancels the RPC and the server frees the prefill.
        Raises OverloadedError when the context would not fit `--context-memory` or the cache budget.
        """
        request = _convert.build_context_request(prompt, ttl_seconds=ttl_seconds, validate=self._s.validate)
        policy = self._s.retry
        attempt = 1
        while True:
            call = self._stub.CreateContext(
                request, timeout=timeout or self._s.generate_timeout, metadata=self._s.metadata
            )
            started = False
            try:
                final = None
                for msg in call:
                    started = True
                    progress = _convert.context_progress(msg)
                    if progress is None:
                        final = msg
                    elif on_progress is not None:
                        on_progress(*progress)
                if final is None:
                    raise ReformerError("CreateContext ended without the context", code="INTERNAL")
                return _convert.context(final)
            except grpc.RpcError as e:
                if started or not policy.retries(e, attempt):
                    raise _rpc_error(e) from None
            finally:
                call.cancel()  # a no-op once the call has completed; otherwise the server aborts the prefill
            time.sleep(policy.delay(attempt))
            attempt += 1

    def delete_context(self, context: ContextRef, *, timeout: float | None = None) -> int:
        """Delete one of this caller's contexts; returns the requests still generating on it (they finish, and
        its memory is freed when the last one does). NotFoundError for an unknown, expired or deleted id."""
        request = pb.DeleteContextRequest(context_id=_convert.context_id_of(context))
        msg = self._unary(self._stub.DeleteContext, request, timeout or self._s.timeout)
        return int(msg.active_requests)

    def list_contexts(self, *, timeout: float | None = None) -> list[ContextInfo]:
        """This caller's live contexts, oldest first."""
        msg = self._unary(self._stub.ListContexts, pb.ListContextsRequest(), timeout or self._s.timeout)
        return _convert.context_infos(msg)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        msg = self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout or self._s.timeout)
        return _convert.model_info(msg)

    def tokenize(self, text: str, *, timeout: float | None = None) -> list[int]:
        msg = self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text), timeout or self._s.timeout)
        return list(msg.token_ids)

    def detokenize(self, token_ids: Sequence[int], *, timeout: float | None = None) -> str:
        msg = self._unary(
            self._stub.Detokenize, pb.DetokenizeRequest(token_ids=list(token_ids)), timeout or self._s.timeout
        )
        return msg.text

    def cancel(self, request_id: str, *, timeout: float | None = None) -> bool:
        """Cancel one of this caller's requests by id (e.g. one started by another process with the same token);
        True if it was running, False if no request of this caller runs under that id."""
        try:
            msg = self._unary(self._stub.Cancel, pb.CancelRequest(request_id=request_id),
                              timeout or self._s.timeout)
        except NotFoundError:
            return False
        return bool(msg.cancelled)

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """grpc.health.v1 status of the server ("") or of one service; never retried (a probe wants now)."""
        msg = self._unary(
            self._health, _health.HealthCheckRequest(service=service), timeout or self._s.timeout, retry=False
        )
        return HealthStatus(_health.STATUS_NAMES.get(msg.status, "UNKNOWN"))


class AsyncClient:
    __doc__ = "asyncio client of a reformer-serve server (create it inside a running event loop).\n" + _CLIENT_DOC

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        server_name: str | None = None,
        token: str | None = None,
        timeout: float | None = None,
        generate_timeout: float | None = None,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 (frozen dataclass: immutable default)
        validate: bool = True,
        options: Sequence[tuple[str, Any]] | None = None,
        allow_insecure_token: bool = False,
    ) -> None:
        self._s = _Settings(
            target, tls=tls, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, server_name=server_name, token=token, timeout=timeout,
            generate_timeout=generate_timeout, retry=retry, validate=validate, options=options,
            allow_insecure_token=allow_insecure_token,
        )
        if self._s.credentials is not None:
            self._channel = grpc.aio.secure_channel(target, self._s.credentials, options=self._s.options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=self._s.options)
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self._health = self._channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.HealthCheckRequest.SerializeToString,
            response_deserializer=_health.HealthCheckResponse.FromString,
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(
        self, fn: Callable[..., Awaitable[T]], request: Any, timeout: float | None, retry: bool = True
    ) -> T:
        policy = self._s.retry if retry else NO_RETRY
        attempt = 1
        while True:
            try:
                return await fn(request, timeout=timeout, metadata=self._s.metadata)
            except grpc.RpcError as e:
                if not policy.retries(e, attempt):
                    raise _rpc_error(e) from None
            await asyncio.sleep(policy.delay(attempt))
            attempt += 1

    async def generate(
        self, prompt: str | Sequence[int] = "", *, context: ContextRef | None = None, timeout: float | None = None,
        **params: Any,
    ) -> GenerateResult:
        """See Client.generate."""
        request = _convert.build_request(prompt, context=context, validate=self._s.validate, **params)
        msg = await self._unary(self._stub.Generate, request, timeout or self._s.generate_timeout)
        return _convert.generate_result(msg)

    def generate_stream(
        self, prompt: str | Sequence[int] = "", *, context: ContextRef | None = None, timeout: float | None = None,
        **params: Any,
    ) -> AsyncGenerationStream:
        """See Client.generate_stream; iterate with `async for`."""
        request = _convert.build_request(prompt, context=context, validate=self._s.validate, **params)
        call = self._stub.GenerateStream(
            request, timeout=timeout or self._s.generate_timeout, metadata=self._s.metadata
        )
        return AsyncGenerationStream(call)

    async def create_context(
        self, prompt: str | Sequence[int], *, ttl_seconds: float | None = None,
        on_progress: ProgressCallback | None = None, timeout: float | None = None,
    ) -> Context:
        """See Client.create_context; on_progress may also be a coroutine function. Cancelling the task
        cancels the RPC, and the server frees the prefill."""
        request = _convert.build_context_request(prompt, ttl_seconds=ttl_seconds, validate=self._s.validate)
        policy = self._s.retry
        attempt = 1
        while True:
            call = self._stub.CreateContext(
                request, timeout=timeout or self._s.generate_timeout, metadata=self._s.metadata
            )
            started = False
            try:
                final = None
                while (msg := await call.read()) is not grpc.aio.EOF:
                    started = True
                    progress = _convert.context_progress(msg)
                    if progress is None:
                        final = msg
                    elif on_progress is not None:
                        result = on_progress(*progress)
                        if inspect.isawaitable(result):
                            await result
                if final is None:
                    raise ReformerError("CreateContext ended without the context", code="INTERNAL")
                return _convert.context(final)
            except grpc.RpcError as e:
                if started or not policy.retries(e, attempt):
                    raise _rpc_error(e) from None
            finally:
                call.cancel()  # a no-op once the call has completed; otherwise the server aborts the prefill
            await asyncio.sleep(policy.delay(attempt))
            attempt += 1

    async def delete_context(self, context: ContextRef, *, timeout: float | None = None) -> int:
        """See Client.delete_context."""
        request = pb.DeleteContextRequest(context_id=_convert.context_id_of(context))
        msg = await self._unary(self._stub.DeleteContext, request, timeout or self._s.timeout)
        return int(msg.active_requests)

    async def list_contexts(self, *, timeout: float | None = None) -> list[ContextInfo]:
        """See Client.list_contexts."""
        msg = await self._unary(self._stub.ListContexts, pb.ListContextsRequest(), timeout or self._s.timeout)
        return _convert.context_infos(msg)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        msg = await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout or self._s.timeout)
        return _convert.model_info(msg)

    async def tokenize(self, text: str, *, timeout: float | None = None) -> list[int]:
        msg = await self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text), timeout or self._s.timeout)
        return list(msg.token_ids)

    async def detokenize(self, token_ids: Sequence[int], *, timeout: float | None = None) -> str:
        msg = await self._unary(
            self._stub.Detokenize, pb.DetokenizeRequest(token_ids=list(token_ids)), timeout or self._s.timeout
        )
        return msg.text

    async def cancel(self, request_id: str, *, timeout: float | None = None) -> bool:
        try:
            msg = await self._unary(
                self._stub.Cancel, pb.CancelRequest(request_id=request_id), timeout or self._s.timeout
            )
        except NotFoundError:
            return False
        return bool(msg.cancelled)

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        msg = await self._unary(
            self._health, _health.HealthCheckRequest(service=service), timeout or self._s.timeout, retry=False
        )
        return HealthStatus(_health.STATUS_NAMES.get(msg.status, "UNKNOWN"))

