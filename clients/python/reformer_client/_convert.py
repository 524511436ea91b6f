"""SDK dataclasses <-> protobuf messages (private: nothing here is part of the public API).

Client-side validation mirrors `reformer_infer.requests.SamplingParams.validate` message for message, so a
bad parameter fails fast with exactly the error the server would send (tests/test_client_sdk.py checks
the two agree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from reformer_client._proto import generation_pb2 as pb
from reformer_client.errors import InvalidRequestError
from reformer_client.types import (
    Context,
    ContextInfo,
    Finished,
    FinishReason,
    GenerateResult,
    GenerationDefaults,
    ModelConfig,
    ModelInfo,
    PrefillProgress,
    ServerLimits,
    StreamEvent,
    TextChunk,
    Timings,
    TokenizerInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
)

MAX_LOGPROBS = 20
_TRUNCATION = {None: pb.TRUNCATION_UNSPECIFIED, "none": pb.TRUNCATION_NONE, "left": pb.TRUNCATION_LEFT}
_FINISH = {
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_EOS: FinishReason.EOS,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    pb.FINISH_REASON_TIME_LIMIT: FinishReason.TIME_LIMIT,
}


def validate_params(
    *,
    max_new_tokens: int | None,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
    seed: int | None,
    stop: Sequence[str],
    logprobs: int,
    max_time_seconds: float | None,
) -> None:
    """Raise InvalidRequestError for the first bad parameter (the server's message for the same mistake).

    Token ids are left to the server, which knows the vocabulary size."""
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise InvalidRequestError("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
        raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {float(temperature)}")
    if top_k is not None and top_k < 0:
        raise InvalidRequestError("top_k", f"must be >= 0, got {top_k}")
    if top_p is not None and (not math.isfinite(top_p) or not (0.0 < top_p <= 1.0)):
        raise InvalidRequestError("top_p", f"must be in (0, 1], got {float(top_p)}")
    if repetition_penalty is not None and (not math.isfinite(repetition_penalty) or repetition_penalty <= 0):
        raise InvalidRequestError(
            "repetition_penalty", f"must be a finite number > 0, got {float(repetition_penalty)}"
        )
    if seed is not None and not (0 <= seed < 2**63):
        raise InvalidRequestError("seed", f"must be in [0, 2**63), got {seed}")
    for s in stop:
        if not s:
            raise InvalidRequestError("stop", "stop strings must be non-empty")
    if not (0 <= logprobs <= MAX_LOGPROBS):
        raise InvalidRequestError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {logprobs}")
    if max_time_seconds is not None and not (max_time_seconds > 0 and math.isfinite(max_time_seconds)):
        raise InvalidRequestError("max_time_seconds", f"must be > 0, got {max_time_seconds}")


def context_id_of(context: Context | ContextInfo | str) -> str:
    """The id to send for `context=` (a Context, a ContextInfo or the id itself)."""
    if isinstance(context, Context | ContextInfo):
        return context.context_id
    if not isinstance(context, str):
        raise TypeError(f"context must be a Context, a ContextInfo or a context id (str), got {type(context).__name__}")
    if not context:
        raise InvalidRequestError("context_id", "must be non-empty")
    return context


def _prompt_is_empty(prompt: str | Sequence[int]) -> bool:
    return not prompt if isinstance(prompt, str) else len(prompt) == 0


def build_request(
    prompt: str | Sequence[int],
    *,
    context: Context | ContextInfo | str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    logprobs: int = 0,
    request_id: str | None = None,
    ignore_eos: bool = False,
    priority: int = 0,
    max_time_seconds: float | None = None,
    truncate: str | None = None,
    validate: bool = True,
) -> pb.GenerateRequest:
    """Keyword parameters of Client.generate -> GenerateRequest (unset optionals stay unset: server defaults).

    With a context the prompt continues after its tokens and may be empty."""
    if isinstance(stop, str):
        stop = (stop,)
    if truncate not in _TRUNCATION:
        raise InvalidRequestError("truncation", f"must be None, 'none' or 'left', got {truncate!r}")
    context_id = context_id_of(context) if context is not None else ""
    if validate:
        if not context_id and _prompt_is_empty(prompt):
            raise InvalidRequestError("text", "the prompt is empty: give text or token_ids")
        validate_params(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop,
            logprobs=logprobs, max_time_seconds=max_time_seconds,
        )
    kw: dict[str, Any] = {
        "stop": list(stop),
        "stop_token_ids": list(stop_token_ids),
        "logprobs": logprobs,
        "request_id": request_id or "",
        "ignore_eos": ignore_eos,
        "priority": priority,
        "truncation": _TRUNCATION[truncate],
        "context_id": context_id,
    }
    if isinstance(prompt, str):
        kw["text"] = prompt
    else:
        kw["token_ids"] = list(prompt)
    optional = {
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
        "repetition_penalty": repetition_penalty, "seed": seed, "max_time_seconds": max_time_seconds,
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    return pb.GenerateRequest(**kw)


def build_context_request(
    prompt: str | Sequence[int], *, ttl_seconds: float | None = None, validate: bool = True
) -> pb.CreateContextRequest:
    """Client.create_context's arguments -> CreateContextRequest (no ttl_seconds: the server's default TTL)."""
    if validate and _prompt_is_empty(prompt):  # the TTL's range is the server's (--max-context-ttl)
        raise InvalidRequestError("text", "the context is empty: give text or token_ids")
    kw: dict[str, Any] = {"text": prompt} if isinstance(prompt, str) else {"token_ids": list(prompt)}
    if ttl_seconds is not None:
        kw["ttl_seconds"] = ttl_seconds
    return pb.CreateContextRequest(**kw)


def context_progress(msg: pb.CreateContextResponse) -> tuple[int, int] | None:
    """(done, total) tokens of a progress message; None for the message that carries the context."""
    if msg.HasField("prefill_progress"):
        return msg.prefill_progress.done_tokens, msg.prefill_progress.total_tokens
    return None


def context(msg: pb.CreateContextResponse) -> Context:
    return Context(msg.context_id, msg.prompt_tokens, msg.cache_bytes, msg.ttl_seconds)


def context_infos(msg: pb.ListContextsResponse) -> list[ContextInfo]:
    return [
        ContextInfo(c.context_id, c.prompt_tokens, c.cache_bytes, c.expires_in_seconds, c.active_requests)
        for c in msg.contexts
    ]


def finish_reason(value: int) -> FinishReason:
    return _FINISH.get(value, FinishReason.UNSPECIFIED)


def _logprobs(items: Sequence[pb.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(lp.token_id, lp.logprob, tuple(TopLogprob(t.token_id, t.logprob, t.token) for t in lp.top),
                     lp.token)
        for lp in items
    )


def _usage(u: pb.Usage) -> Usage:
    return Usage(prompt_tokens=u.prompt_tokens, generated_tokens=u.generated_tokens, cached_tokens=u.cached_tokens)


def _timings(t: pb.Timings) -> Timings:
    return Timings(t.queue_seconds, t.prefill_seconds, t.first_token_seconds, t.total_seconds)


def stream_event(msg: pb.GenerateStreamResponse) -> StreamEvent:
    if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED or msg.HasField("usage"):
        return Finished(
            request_id=msg.request_id,
            text=msg.text,
            finish_reason=finish_reason(msg.finish_reason),
            usage=_usage(msg.usage),
            timings=_timings(msg.timings),
            peak_cache_bytes=msg.peak_cache_bytes,
        )
    if msg.HasField("prefill_progress"):
        p = msg.prefill_progress
        return PrefillProgress(msg.request_id, p.done_tokens, p.total_tokens)
    return TextChunk(msg.request_id, msg.text, tuple(msg.token_ids), _logprobs(msg.logprobs))


def generate_result(msg: pb.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        request_id=msg.request_id,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=finish_reason(msg.finish_reason),
        usage=_usage(msg.usage),
        timings=_timings(msg.timings),
        peak_cache_bytes=msg.peak_cache_bytes,
        logprobs=_logprobs(msg.logprobs),
    )


class ResultBuilder:
    """Folds stream events into a GenerateResult (for callers that stream but also want the whole result)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []

    def add(self, ev: StreamEvent) -> GenerateResult | None:
        if isinstance(ev, TextChunk):
            self.text.append(ev.text)
            self.token_ids.extend(ev.token_ids)
            self.logprobs.extend(ev.logprobs)
        elif isinstance(ev, Finished):
            self.text.append(ev.text)
            return GenerateResult(
                request_id=ev.request_id, text="".join(self.text), token_ids=tuple(self.token_ids),
                finish_reason=ev.finish_reason, usage=ev.usage, timings=ev.timings,
                peak_cache_bytes=ev.peak_cache_bytes, logprobs=tuple(self.logprobs),
            )
        return None


def model_info(msg: pb.GetModelInfoResponse) -> ModelInfo:
    c, lim, d = msg.config, msg.limits, msg.defaults
    return ModelInfo(
        model_name=msg.model_name,
        config=ModelConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, attn_layers=tuple(c.attn_layers),
            num_attention_heads=c.num_attention_heads, attention_head_size=c.attention_head_size,
            num_hashes=c.num_hashes, num_buckets=c.num_buckets, lsh_attn_chunk_length=c.lsh_attn_chunk_length,
            local_attn_chunk_length=c.local_attn_chunk_length, max_position_embeddings=c.max_position_embeddings,
            axial_pos_shape=tuple(c.axial_pos_shape), eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        ),
        config_json=msg.config_json,
        rotation_fingerprint=msg.rotation_fingerprint,
        device=msg.device,
        dtype=msg.dtype,
        backend=msg.backend,
        limits=ServerLimits(
            max_context=lim.max_context, max_new_tokens=lim.max_new_tokens, max_batch=lim.max_batch,
            max_queue=lim.max_queue, cache_memory_bytes=lim.cache_memory_bytes, max_logprobs=lim.max_logprobs,
            max_receive_message_bytes=lim.max_receive_message_bytes,
            context_memory_bytes=lim.context_memory_bytes, max_context_ttl_seconds=lim.max_context_ttl_seconds,
            default_context_ttl_seconds=lim.default_context_ttl_seconds, prefix_caching=lim.prefix_caching,
        ),
        defaults=GenerationDefaults(
            max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p,
            repetition_penalty=d.repetition_penalty,
        ),
        server_version=msg.server_version,
        num_parameters=msg.num_parameters,
        tokenizer=TokenizerInfo(kind=msg.tokenizer.kind, vocab_size=msg.tokenizer.vocab_size, file=msg.tokenizer.file),
    )
