"""The OpenAI-compatible HTTP front-end: Starlette routes served by uvicorn on the gRPC server's event loop.

    POST /v1/completions   the Completions API (prompt as text or token ids; SSE streaming with [DONE])
    GET  /v1/models        the served model and its context length
    GET  /health, /ready   the states of grpc.health's "" and reformer.v1.TextGeneration (200 / 503)
    POST /v1/chat/completions  404: a plain language model has no chat template; use /v1/completions

It is a thin adapter like the gRPC servicer: the JSON body becomes a `GenerateRequest` (so that the server's
one request path, `servicer.Generation` + `convert.to_engine_request`, judges it with the same limits and
messages as a gRPC call, and counts it in the same open-stream limit and drain), and engine events become
OpenAI JSON. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
the official client maps to its exception classes (400 BadRequestError, 401 AuthenticationError, 404
NotFoundError, 429 RateLimitError, 503 InternalServerError).

A client that disconnects aborts its engine request at once (streaming or not): the response watches the
ASGI `http.disconnect` message beside the generation and cancels it, and `Generation.close()` in a `finally`
frees the cache, as the gRPC handlers do. A client that stops reading for `--stall-timeout` is cut off too.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from reformer_infer.requests import (
    EngineStoppedError,
    FinishEvent,
    FinishReason,
    InvalidRequestError,
    OutOfMemoryError,
    OverloadedError,
    PrefillProgress,
    TokenEvent,
    TokenizerUnavailableError,
    TokenLogprob,
)
from reformer_server._proto import generation_pb2 as pb
from reformer_server.errors import NotReadyError, RequestFailedError, StalledClientError
from reformer_server.servicer import Caller, Generation, TextGenerationServicer

logger = logging.getLogger(__name__)

_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11

_INT32_MAX = 2**31 - 1
# Engine field names -> the OpenAI parameter a client sent (error messages name what the client wrote).
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "text": "prompt", "token_ids": "prompt", "prompt": "prompt"}
# Parameters of the Completions API accepted only at their neutral value (there is no such feature here).
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "n": 1, "echo": False, "suffix": None,
            "logit_bias": None}
_KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "logprobs", "stream",
          "stream_options", "user", "repetition_penalty", "ignore_eos", *_NEUTRAL}


class HTTPError(Exception):
    """An error answered before any part of the response was sent."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(_error_body(self), status_code=self.status,
                            headers={"www-authenticate": "Bearer"} if self.status == 401 else None)


def _error_body(e: HTTPError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def http_error_for(exc: BaseException) -> HTTPError:
    """The one mapping from a failure to an HTTP status, as errors.status_for is for gRPC."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, InvalidRequestError):
        param = _PARAM_NAMES.get(exc.field, exc.field)
        return HTTPError(400, f"{param}: {exc.message}", "invalid_request_error", param)
    if isinstance(exc, TokenizerUnavailableError):  # gRPC's FAILED_PRECONDITION: text for an ids-only model
        return HTTPError(400, f"{exc} (send the prompt as a list of token ids)", "invalid_request_error",
                         code="tokenizer_unavailable")
    if isinstance(exc, OverloadedError):
        return HTTPError(429, f"server overloaded: {exc}" if str(exc) else "server overloaded", "server_overloaded",
                         code="overloaded")
    if isinstance(exc, OutOfMemoryError):
        return HTTPError(429, f"out of memory serving this request: {exc}", "server_overloaded",
                         code="out_of_memory")
    if isinstance(exc, NotReadyError | EngineStoppedError):
        return HTTPError(503, str(exc) or "server is not accepting requests", "service_unavailable",
                         code="unavailable")
    if isinstance(exc, RequestFailedError):
        logger.error("request failed inside the engine: %s", exc)
        return HTTPError(500, f"internal error: {exc}", "internal_error")
    logger.exception("internal error while serving an HTTP request", exc_info=exc)
    return HTTPError(500, f"internal error ({type(exc).__name__}); see the server log", "internal_error")


def _bad(param: str, message: str) -> HTTPError:
    return HTTPError(400, f"{param}: {message}", "invalid_request_error", param)


# ---- request: OpenAI JSON -> GenerateRequest ------------------------------------------------------------


@dataclass
class CompletionRequest:
    """A validated /v1/completions body: the gRPC request it stands for plus what only HTTP needs."""

    generate: pb.GenerateRequest
    stream: bool
    include_usage: bool
    logprobs: int | None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _token_ids(v: Any, param: str) -> list[int] | None:
    if isinstance(v, list) and v and all(_is_int(t) for t in v):
        for t in v:
            if not 0 <= t <= _INT32_MAX:
                raise _bad(param, f"token id {t} is negative or too large")
        return list(v)
    return None


def parse_completion(body: Any, model_name: str) -> CompletionRequest:
    """Check the JSON body of /v1/completions and build the GenerateRequest it stands for.

    Only types and the OpenAI-specific fields are judged here; value ranges, the context and the prompt
    limits are the shared request path's (convert.to_engine_request and the engine), like for gRPC."""
    if not isinstance(body, dict):
        raise _bad("body", "must be a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise _bad(unknown[0], "unknown parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", "must be a string naming the served model (GET /v1/models)")
    if model != model_name:
        raise HTTPError(404, f"model: the model {model!r} does not exist; this server serves {model_name!r}",
                        "invalid_request_error", "model", "model_not_found")
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and value != neutral:
            raise _bad(name, f"only {json.dumps(neutral)} is supported, got {json.dumps(value)}")

    req = pb.GenerateRequest()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.text = prompt
    elif (ids := _token_ids(prompt, "prompt")) is not None:
        req.token_ids.extend(ids)
    else:
        raise _bad("prompt", "must be a string or a list of token ids (one prompt per request)")

    def number(name: str, check: Callable[[Any], bool] = _is_number, what: str = "a number") -> Any:
        value = body.get(name)
        if value is not None and not check(value):
            raise _bad(name, f"must be {what}, got {json.dumps(value)}")
        return value

    if (v := number("max_tokens", _is_int, "an integer")) is not None:
        if not -_INT32_MAX <= v <= _INT32_MAX:
            raise _bad("max_tokens", f"must be >= 1, got {v}")
        req.max_new_tokens = v
    for name in ("temperature", "top_p", "repetition_penalty"):
        if (v := number(name)) is not None:
            setattr(req, name, v)
    if (v := number("top_k", _is_int, "an integer")) is not None:
        if not -_INT32_MAX <= v <= _INT32_MAX:
            raise _bad("top_k", f"must be >= 0, got {v}")
        # OpenAI-compatible servers (vLLM) take -1 for "no top-k"; ours is 0.
        req.top_k = 0 if v == -1 else v
    if (v := number("seed", _is_int, "an integer")) is not None:
        if not 0 <= v < 2**63:
            raise _bad("seed", f"must be in [0, 2**63), got {v}")
        req.seed = v
    stop = body.get("stop")
    if isinstance(stop, str):
        req.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        req.stop.extend(stop)
    elif stop is not None:
        raise _bad("stop", "must be a string or a list of strings")
    logprobs = number("logprobs", _is_int, "an integer")
    if logprobs is not None:
        if not 0 <= logprobs <= 20:
            raise _bad("logprobs", f"must be in [0, 20], got {logprobs}")
        req.logprobs = logprobs
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None:
        if not isinstance(ignore_eos, bool):
            raise _bad("ignore_eos", "must be a boolean")
        req.ignore_eos = ignore_eos
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise _bad("stream_options", "must be an object with include_usage")
        include_usage = options.get("include_usage") is True
    return CompletionRequest(req, stream, include_usage, logprobs)


# ---- response: engine events -> OpenAI JSON -------------------------------------------------------------


def finish_reason(ev: FinishEvent) -> str:
    """OpenAI's two reasons: 'stop' (a stop string, stop token or end of sequence) or 'length' (a limit)."""
    return "stop" if ev.finish_reason in (FinishReason.STOP, FinishReason.EOS) else "length"


def usage(ev: FinishEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.generated_tokens,
                           "total_tokens": ev.prompt_tokens + ev.generated_tokens}
    if ev.cached_tokens:  # OpenAI's field for prompt tokens served from a cache (prefix caching)
        out["prompt_tokens_details"] = {"cached_tokens": ev.cached_tokens}
    return out


class _Logprobs:
    """OpenAI's legacy completions logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.offset = 0

    def build(self, items: tuple[TokenLogprob, ...]) -> dict[str, Any]:
        tokens = [self._decode([lp.token_id]) for lp in items]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{self._decode([t]): p for t, p in lp.top} for lp in items],
            "text_offset": offsets,
        }


# ---- the app --------------------------------------------------------------------------------------------


class OpenAIFrontend:
    """The Starlette app over the gRPC servicer's engine and limits, and its uvicorn server."""

    def __init__(self, servicer: TextGenerationServicer, *, ready: Callable[[], bool], auth_token: str | None,
                 auth_health: bool, stall_timeout: float, max_body_bytes: int,
                 count: Callable[[str, int], None] | None = None) -> None:
        self.servicer = servicer
        self._ready = ready
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        self._auth_health = auth_health
        self._stall_timeout = stall_timeout
        self._max_body = max_body_bytes
        self._count = count
        self._created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
        ], exception_handlers={StarletteHTTPException: _route_error})
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Future[None] | None = None

    # ---- ASGI entry: auth, errors in OpenAI's shape, counting -------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan is off; nothing else comes
            return
        path: str = scope["path"]
        status = 0

        async def counted_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            protected = path.startswith("/v1/") or self._auth_health
            if self._expected is not None and protected and not self._authorized(scope):
                await HTTPError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                                "invalid_request_error", code="invalid_api_key").response()(scope, receive,
                                                                                             counted_send)
                return
            await self.app(scope, receive, counted_send)
        finally:
            if self._count is not None:
                self._count(path if path in _COUNTED_ROUTES else "other", status or 499)

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                return hmac.compare_digest(value, self._expected or b"")
        return False

    def _caller(self, request: Request) -> Caller:
        """The caller as the gRPC side names one: its bearer token where the server knows it, else its
        address (same per-client stream limit and priority rules over both protocols)."""
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ").encode() if auth.startswith("Bearer ") else None
        host = request.client.host if request.client is not None else ""
        return self.servicer.caller_of(token, ("ipv6:[" + host + "]" if ":" in host else "ipv4:" + host) if host else "")

    # ---- routes -------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        # Liveness: the process answers and its engine (once loaded) is alive; same as grpc.health "".
        return self._state()

    async def ready(self, request: Request) -> Response:
        return self._state()

    def _state(self) -> Response:
        ok = self._ready()
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        desc = self.servicer.description
        if desc is None:
            return http_error_for(NotReadyError("model is still loading; retry shortly")).response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        desc = self.servicer.description
        if desc is None:
            return http_error_for(NotReadyError("model is still loading; retry shortly")).response()
        name = request.path_params["model"]
        if name != desc.name:
            return HTTPError(404, f"the model {name!r} does not exist", "invalid_request_error", "model",
                             "model_not_found").response()
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        desc = self.servicer.description
        assert desc is not None
        return {"id": desc.name, "object": "model", "created": self._created, "owned_by": "reformer-serve",
                "max_model_len": desc.max_context}

    async def chat_completions(self, request: Request) -> Response:
        return HTTPError(404, "chat completions are not served: this is a plain language model without a chat "
                         "template; send the text to continue to POST /v1/completions", "invalid_request_error",
                         code="not_found").response()

    async def completions(self, request: Request) -> Response:
        try:
            desc = self.servicer.description
            if desc is None:
                self.servicer.ready_engine()  # raises NotReadyError (loading or draining)
            assert desc is not None
            req = parse_completion(await self._json(request), desc.name)
            gen = Generation(self.servicer, req.generate, self._caller(request))
        except Exception as exc:
            return http_error_for(exc).response()
        if req.stream:
            return _EventStream(self, gen, req, desc.name)
        return _Whole(self, gen, req, desc.name)

    async def _json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise HTTPError(413, f"request body of {length} bytes is larger than this server's limit of "
                            f"{self._max_body} bytes (--max-message-bytes)", "invalid_request_error")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                raise HTTPError(413, f"request body is larger than this server's limit of {self._max_body} "
                                "bytes (--max-message-bytes)", "invalid_request_error")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad("body", f"not valid JSON ({e})") from None

    # ---- events of one generation -----------------------------------------------------------------
    def logprobs_builder(self, req: CompletionRequest) -> _Logprobs | None:
        return _Logprobs(self.servicer.engine.tokenizer.decode) if req.logprobs is not None else None

    async def send_stalled(self, send: Send, message: dict[str, Any]) -> None:
        """A write that gives up after --stall-timeout (a client that stopped reading)."""
        # asyncio.timeout (3.11+) arms a timer on the current task; wait_for would spawn a task per message.
        try:
            if _timeout is not None:
                async with _timeout(self._stall_timeout):
                    await send(message)
            else:
                await asyncio.wait_for(send(message), self._stall_timeout)
        except TimeoutError:
            raise StalledClientError(f"client stopped reading for {self._stall_timeout:g}s; request aborted") from None

    # ---- uvicorn on this loop -------------------------------------------------------------------
    def bind(self, host: str, port: int) -> socket.socket:
        """Bind the listening socket now (so --port 0's port is known before serving starts)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
        return sock

    async def start(self, sock: socket.socket, *, tls_cert: str | None, tls_key: str | None,
                    tls_client_ca: str | None) -> None:
        config = uvicorn.Config(
            self, lifespan="off", log_config=None, access_log=False, server_header=False,
            ssl_certfile=tls_cert, ssl_keyfile=tls_key, ssl_ca_certs=tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
            timeout_keep_alive=30, timeout_graceful_shutdown=None,
        )
        self.server = _EmbeddedServer(config)
        self._task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                await self._task  # a startup failure (TLS files) surfaces here
                raise RuntimeError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)

    def begin_shutdown(self) -> None:
        """Close the listener and idle keep-alive connections; running responses go on."""
        if self.server is not None:
            self.server.should_exit = True

    async def stop(self, timeout: float) -> None:
        """Wait up to `timeout` for running responses, then cancel them (their `finally` aborts)."""
        if self.server is None or self._task is None:
            return
        self.server.should_exit = True
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        if not done:
            self.server.force_exit = True
            for task in list(self.server.server_state.tasks):
                task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)


async def _route_error(request: Request, exc: Exception) -> Response:
    """Unknown routes (404) and wrong methods (405) in OpenAI's error shape."""
    assert isinstance(exc, StarletteHTTPException)
    what = "no such route" if exc.status_code == 404 else str(exc.detail)
    return HTTPError(exc.status_code, f"{request.method} {request.url.path}: {what}", "invalid_request_error",
                     code="not_found" if exc.status_code == 404 else None).response()


_COUNTED_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready"})


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the ReformerServer owns SIGTERM/SIGINT and the drain."""

    def capture_signals(self) -> Any:
        import contextlib

        return contextlib.nullcontext()


async def _until_disconnect(receive: Receive, work: Awaitable[None]) -> None:
    """Run `work` until it ends or the client disconnects (then it is cancelled: its finally aborts)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


class _Whole(Response):
    """A non-streamed completion: generated while watching for the client's disconnect."""

    def __init__(self, front: OpenAIFrontend, gen: Generation, req: CompletionRequest, model: str) -> None:
        super().__init__()
        self._front, self._gen, self._req, self._model = front, gen, req, model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def work() -> None:
            gen, texts, tokens = self._gen, [], []
            lp = self._front.logprobs_builder(self._req)
            try:
                async for ev in gen.events():
                    if isinstance(ev, TokenEvent):
                        texts.append(ev.text)
                        tokens.extend(ev.logprobs)
                    elif isinstance(ev, FinishEvent):
                        texts.append(ev.text)
                        body = {"id": f"cmpl-{gen.request_id}", "object": "text_completion",
                                "created": int(time.time()), "model": self._model,
                                "choices": [{"index": 0, "text": "".join(texts),
                                             "logprobs": lp.build(tuple(tokens)) if lp is not None else None,
                                             "finish_reason": finish_reason(ev)}],
                                "usage": usage(ev)}
                        await JSONResponse(body)(scope, receive, send)
                        return
                raise RuntimeError("engine stream ended without a FinishEvent")
            except Exception as exc:
                await http_error_for(exc).response()(scope, receive, send)
            finally:
                gen.close()

        await _until_disconnect(receive, work())


class _EventStream(Response):
    """A streamed completion: server-sent events, one `data:` chunk per engine event, `data: [DONE]` last."""

    media_type = "text/event-stream"

    def __init__(self, front: OpenAIFrontend, gen: Generation, req: CompletionRequest, model: str) -> None:
        super().__init__()
        self._front, self._gen, self._req, self._model = front, gen, req, model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _until_disconnect(receive, self._stream(send))

    async def _stream(self, send: Send) -> None:
        front, gen, req = self._front, self._gen, self._req
        created = int(time.time())
        base = {"id": f"cmpl-{gen.request_id}", "object": "text_completion", "created": created, "model": self._model}

        async def emit(payload: str) -> None:
            await front.send_stalled(send, {"type": "http.response.body", "body": payload.encode(),
                                            "more_body": True})

        def chunk(choices: list[dict[str, Any]], use: dict[str, int] | None = None) -> str:
            body = {**base, "choices": choices}
            if req.include_usage:
                body["usage"] = use
            return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

        # The chunk of one plain text delta, the message of almost every event, is the same JSON around the
        # text: formatted once here, so a token costs one json.dumps of a string (the event loop shares the
        # GIL with the engine thread: its time per token is taken from the engine's).
        head, _, tail = chunk([{"index": 0, "text": "\0", "logprobs": None, "finish_reason": None}]).partition(
            json.dumps("\0"))

        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            lp = front.logprobs_builder(req)
            try:
                async for ev in gen.events():
                    if isinstance(ev, TokenEvent) and lp is None:
                        await emit(head + json.dumps(ev.text) + tail)
                    elif isinstance(ev, TokenEvent):
                        await emit(chunk([{"index": 0, "text": ev.text, "logprobs": lp.build(ev.logprobs),
                                           "finish_reason": None}]))
                    elif isinstance(ev, FinishEvent):
                        await emit(chunk([{"index": 0, "text": ev.text, "logprobs": None,
                                           "finish_reason": finish_reason(ev)}]))
                        if req.include_usage:
                            await emit(chunk([], usage(ev)))
                    elif isinstance(ev, PrefillProgress):
                        await emit(": prefill\n\n")  # an SSE comment: keeps proxies from timing out
            except StalledClientError as exc:
                logger.info("request %s: %s", gen.request_id, exc)
                return
            except Exception as exc:  # the status line is gone: the error travels as an event
                err = http_error_for(exc)
                await emit(f"data: {json.dumps(_error_body(err))}\n\n")
            await emit("data: [DONE]\n\n")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gen.close()
