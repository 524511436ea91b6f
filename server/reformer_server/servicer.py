"""The TextGeneration servicer: a thin layer over the engine's async API.

Each RPC converts the request (convert.py), calls the engine, converts events back, and fails through
the one error mapping (errors.py, applied by `_rpc`). Two serving rules live here:

- An engine request is aborted in a `finally` unless its FinishEvent was seen: grpc.aio closes a handler
  parked at an await with CancelledError (client cancel, deadline) and `finally` is the only place that
  always runs (notes/serving.md).
- Requests belong to a caller (its bearer token when the server checks tokens or the token is a
  --priority-tokens one, else its IP address): Cancel finds only the caller's own requests (NOT_FOUND
  otherwise, the same answer as for an id that is not running), --max-streams-per-client counts per
  caller, and a request's priority is honoured only with --allow-client-priority or a priority token.
- Writes are bounded in time: a client that stops reading for `stall_timeout` gets its request aborted, so
  it cannot pin a batch slot and cache bytes forever. (The engine's own hand-off buffer is bounded and never
  blocks the engine loop, so a slow reader does not slow the other streams.)
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from reformer_infer.requests import (
    ContextCreated,
    FinishEvent,
    InvalidRequestError,
    OverloadedError,
    PrefillProgress,
    TokenEvent,
)
from reformer_server import convert
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from reformer_server.errors import (
    NotFoundError,
    NotReadyError,
    RequestFailedError,
    StalledClientError,
    finish_error,
    status_for,
)
from reformer_server.metrics import RequestTracker, ServerMetrics
from reformer_server.model_info import ModelDescription

logger = logging.getLogger(__name__)

_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11

Req = TypeVar("Req")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _rpc(fn: Handler) -> Handler:
    """Run one RPC handler: map any failure to its status (errors.status_for) and count the outcome."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: TextGenerationServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        code = "OK"
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except Exception as exc:
            status, message, trailing = status_for(exc)
            code = status.name
            if context.done():  # the call already ended (client gone): there is nobody to tell
                return None
            await context.abort(status, message, trailing_metadata=trailing)
        finally:
            self.metrics.rpc_done(method, code)

    return wrapper


@dataclass(frozen=True)
class Caller:
    """Who sent a call: `key` groups a caller's requests (never the token itself); `privileged` callers may set
    a priority."""

    key: str
    privileged: bool = False


def _bearer(context: grpc.aio.ServicerContext) -> bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            raw = value.encode() if isinstance(value, str) else bytes(value)
            return raw.removeprefix(b"Bearer ")
    return None


def _peer_host(peer: str) -> str:
    """'ipv4:10.0.0.7:53211' -> 'ipv4:10.0.0.7', 'ipv6:[::1]:5000' -> 'ipv6:[::1]' (a client's connections and
    ports are one caller); other forms (unix sockets) as they are."""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class Generation:
    """One engine request as one call sees it (a gRPC RPC or an HTTP request, openai_api.py): the shared
    admission and validation path, its events, its metrics, and its abort when left early."""

    def __init__(self, servicer: TextGenerationServicer, request: pb.GenerateRequest, caller: Caller) -> None:
        engine = servicer.ready_engine()
        assert servicer.limits is not None
        if len(servicer.active) >= servicer.max_streams:
            raise OverloadedError(f"{len(servicer.active)} generation streams are open, the limit of "
                                  "--max-concurrent-streams")
        per_client = servicer.max_streams_per_client
        if per_client and servicer.streams_of[caller.key] >= per_client:
            raise OverloadedError(f"this client has {servicer.streams_of[caller.key]} generation streams open, the "
                                  "limit of --max-streams-per-client")
        prompt, params = convert.to_engine_request(
            request, engine.tokenizer, servicer.limits,
            allow_priority=servicer.allow_client_priority or caller.privileged)
        if request.request_id and request.request_id in servicer.active:
            raise InvalidRequestError("request_id", f"{request.request_id!r} is already in use by a running request")
        self.engine = engine
        self._servicer = servicer
        self.stream = engine.add_request(prompt, params, request_id=request.request_id or None,
                                         context_id=request.context_id or None, owner=caller.key)
        self.request_id: str = self.stream.request_id
        self.finished = False
        self.tracker: RequestTracker = servicer.metrics.request_tracker(len(prompt))
        servicer.request_started(self.request_id, caller.key)

    async def events(self) -> AsyncIterator[Any]:
        async for ev in self.stream:
            if isinstance(ev, TokenEvent):
                self.tracker.tokens(len(ev.token_ids))
            elif isinstance(ev, FinishEvent):
                self.finished = True
                error = finish_error(ev)
                label = "error" if error else convert.finish_reason_label(ev)
                self.tracker.finished(ev, label)
                logger.info("request %s: %s, %d prompt + %d generated tokens, queue %.3fs, first token %.3fs, "
                            "total %.3fs%s", self.request_id, label, ev.prompt_tokens, ev.generated_tokens,
                            ev.queue_time_s, ev.first_token_time_s, ev.total_time_s,
                            f" ({ev.error})" if error else "")
                if error is not None:
                    raise error
            yield ev

    def close(self) -> None:
        """Always called (finally): abort the engine request unless it already finished; frees its cache."""
        if not self.finished:
            self.engine.abort(self.request_id)
            self.tracker.abandoned()
            logger.info("request %s: cancelled (client gone, deadline, stall or shutdown); aborted", self.request_id)
        self._servicer.request_ended(self.request_id)


class TextGenerationServicer(pb_grpc.TextGenerationServicer):
    def __init__(self, metrics: ServerMetrics, *, stall_timeout: float = 30.0, max_streams: int = 256,
                 max_streams_per_client: int = 0, allow_client_priority: bool = False,
                 priority_tokens: tuple[str, ...] = (), tokens_checked: bool = False) -> None:
        self.metrics = metrics
        self.stall_timeout = stall_timeout
        self.max_streams = max_streams  # open generations (Generate + GenerateStream) at once
        self.max_streams_per_client = max_streams_per_client  # 0: no per-client limit
        self.allow_client_priority = allow_client_priority
        self._priority_tokens = tuple(t.encode() for t in priority_tokens)
        # Only a token the server checks (--auth-token) or knows (--priority-tokens) names a caller: an
        # unchecked one is made up at will, so without auth every caller is its address.
        self._tokens_checked = tokens_checked
        self.owners: dict[str, str] = {}  # running request id -> its caller's key
        self.streams_of: Counter[str] = Counter()  # caller key -> generations open
        self.engine: Any = None  # set by attach() once the model is loaded
        self.description: ModelDescription | None = None
        self.limits: convert.RequestLimits | None = None
        self.draining = False
        self.active: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle (called by server.py) ----------------------------------------------------
    def attach(self, engine: Any, description: ModelDescription, limits: convert.RequestLimits) -> None:
        self.engine, self.description, self.limits = engine, description, limits

    def ready_engine(self) -> Any:
        if self.draining:
            raise NotReadyError("server is shutting down; retry on another replica")
        if self.engine is None:
            raise NotReadyError("model is still loading; retry shortly")
        return self.engine

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        return self.caller_of(_bearer(context), _peer_host(context.peer() or ""))

    def caller_of(self, token: bytes | None, peer: str) -> Caller:
        """The caller of a call with this bearer token (or None) from this peer host (gRPC's `ipv4:10.0.0.7`
        form; the HTTP front-end passes the same form)."""
        if token:
            privileged = any(hmac.compare_digest(token, t) for t in self._priority_tokens)
            if privileged or self._tokens_checked:
                return Caller("token:" + hashlib.sha256(token).hexdigest()[:16], privileged)
        return Caller("peer:" + peer)

    def request_started(self, request_id: str, caller_key: str) -> None:
        self.active.add(request_id)
        self.owners[request_id] = caller_key
        self.streams_of[caller_key] += 1
        self._idle.clear()
        self.metrics.streams_open.inc()

    def request_ended(self, request_id: str) -> None:
        self.active.discard(request_id)
        caller_key = self.owners.pop(request_id, None)
        if caller_key is not None:
            self.streams_of[caller_key] -= 1
            if self.streams_of[caller_key] <= 0:
                del self.streams_of[caller_key]
        self.metrics.streams_open.dec()
        if not self.active:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no generation is in progress; False when `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _write(self, context: grpc.aio.ServicerContext,
                     message: pb.GenerateStreamResponse | pb.CreateContextResponse) -> None:
        # asyncio.timeout (3.11+) arms a timer on the current task; wait_for would spawn a task per message.
        try:
            if _timeout is not None:
                async with _timeout(self.stall_timeout):
                    await context.write(message)
            else:
                await asyncio.wait_for(context.write(message), self.stall_timeout)
        except TimeoutError:
            raise StalledClientError(
                f"client stopped reading for {self.stall_timeout:g}s; request aborted"
            ) from None

    # ---- RPCs ----------------------------------------------------------------------------
    @_rpc
    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        gen = Generation(self, request, self.caller(context))
        try:
            piece = gen.engine.tokenizer.piece
            async for ev in gen.events():
                await self._write(context, convert.event_to_stream_response(ev, gen.request_id, piece))
        finally:
            gen.close()

    @_rpc
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        gen = Generation(self, request, self.caller(context))
        acc = convert.ResponseAccumulator(gen.request_id, gen.engine.tokenizer.piece)
        try:
            async for ev in gen.events():
                if isinstance(ev, TokenEvent):
                    acc.add(ev)
                elif isinstance(ev, FinishEvent):
                    return acc.finish(ev)
            raise RuntimeError("engine stream ended without a FinishEvent")
        finally:
            gen.close()

    @_rpc
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        if self.description is None:
            raise NotReadyError("model is still loading; retry shortly")
        return convert.model_info_to_proto(self.description)

    @_rpc
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        engine = self.ready_engine()  # a model without a tokenizer raises FAILED_PRECONDITION here
        assert self.limits is not None
        convert.check_text_size("text", request.text, self.limits.max_prompt_bytes)
        return pb.TokenizeResponse(token_ids=engine.tokenizer.encode(request.text))

    @_rpc
    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        engine = self.ready_engine()
        assert self.limits is not None
        limit = self.limits.max_prompt_bytes
        if limit is not None and len(request.token_ids) > limit:
            raise InvalidRequestError("token_ids", f"{len(request.token_ids)} token ids are more than this server's "
                                      f"limit of {limit} (--max-prompt-bytes)")
        vocab = engine.tokenizer.vocab_size
        for t in request.token_ids:
            if not (0 <= t < vocab):
                raise InvalidRequestError("token_ids", f"token id {t} outside [0, {vocab})")
        return pb.DetokenizeResponse(text=engine.tokenizer.decode(request.token_ids))

    @_rpc
    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        if not request.request_id:
            raise InvalidRequestError("request_id", "must be non-empty")
        engine = self.engine
        owner = self.owners.get(request.request_id)
        if engine is None or owner is None or owner != self.caller(context).key:
            # another caller's request gets the same answer as an unknown id: ids are not probed this way
            raise NotFoundError(f"no running request {request.request_id!r} of this caller")
        engine.abort(request.request_id)
        return pb.CancelResponse(cancelled=True)

    @_rpc
    async def CreateContext(self, request: pb.CreateContextRequest, context: grpc.aio.ServicerContext) -> None:
        engine = self.ready_engine()
        assert self.limits is not None
        owner = self.caller(context).key
        tokens, ttl = convert.create_context_input(request, engine.tokenizer, self.limits)
        stream = engine.create_context(tokens, ttl_s=ttl, owner=owner)
        cid = stream.request_id
        finished = False
        created: ContextCreated | None = None
        try:
            async for ev in stream:
                if isinstance(ev, PrefillProgress):
                    await self._write(context, convert.context_progress(cid, ev))
                elif isinstance(ev, ContextCreated):
                    created = ev
                elif isinstance(ev, FinishEvent):
                    finished = True
                    error = finish_error(ev)
                    if error is not None:
                        raise error
                    if created is None:
                        raise RequestFailedError(f"the prefill of context {cid} ended without it ({ev.finish_reason})")
                    logger.info("context %s: %d tokens, %d cache bytes, ttl %gs", cid, created.prompt_tokens,
                                created.cache_bytes, created.ttl_s)
                    try:
                        await self._write(context, convert.context_created(created))
                    except BaseException:  # the caller never learns the id: nobody could use or delete it
                        engine.delete_context(cid, owner)
                        raise
        finally:
            if not finished:  # cancelled, deadline, stall: the prefill stops and its bytes are freed
                engine.abort(cid)

    @_rpc
    async def DeleteContext(
        self, request: pb.DeleteContextRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteContextResponse:
        engine = self.ready_engine()
        if not request.context_id:
            raise InvalidRequestError("context_id", "must be non-empty")
        active = engine.delete_context(request.context_id, self.caller(context).key)
        logger.info("context %s deleted (%d requests still on it)", request.context_id, active)
        return pb.DeleteContextResponse(active_requests=active)

    @_rpc
    async def ListContexts(
        self, request: pb.ListContextsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListContextsResponse:
        engine = self.ready_engine()
        return convert.contexts_to_proto(engine.list_contexts(self.caller(context).key))
