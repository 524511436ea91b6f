"""The one place where protobuf messages and engine types meet (both directions).

Requests: `GenerateRequest` -> (prompt ids, `SamplingParams`), with the checks only the wire format needs
(text vs token_ids, enum values, truncation); every other check is the engine's (`SamplingParams.validate`,
`validate_prompt`, the scheduler's context and budget checks), so the server reports the same field and
message as the library.
Responses: engine events -> `GenerateStreamResponse`, a whole run -> `GenerateResponse`, and the plain
model description -> `GetModelInfoResponse`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from reformer_infer.contexts import ContextInfo
from reformer_infer.requests import (
    ContextCreated,
    FinishEvent,
    FinishReason,
    InvalidRequestError,
    PrefillProgress,
    RequestBounds,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    validate_stops,
)
from reformer_server._proto import generation_pb2 as pb
from reformer_server.model_info import ModelDescription

MAX_LOGPROBS = 20  # SamplingParams.validate's bound, reported in ServerLimits

PieceOf = Callable[[int], str]  # token id -> the token as its tokenizer spells it (logprobs' `token`)


def _no_piece(token_id: int) -> str:
    return ""


@dataclass(frozen=True)
class RequestLimits:
    """What the converter needs to know about the server to turn a request into engine input."""

    max_context: int  # the engine's (prompt + max_new_tokens), for truncation
    default_max_new_tokens: int
    max_prompt_bytes: int | None = None  # checked before encoding or truncating (cheap refusal of huge input)
    max_time_s: float | None = None  # server cap on a request's generation time
    bounds: RequestBounds = RequestBounds()  # stop strings / stop token ids, checked before any other work


class TextEncoder(Protocol):
    """The part of the engine's tokenizer the converter needs."""

    def encode(self, text: str) -> list[int]: ...


def to_engine_request(
    req: pb.GenerateRequest, tokenizer: TextEncoder, limits: RequestLimits, *, allow_priority: bool = True
) -> tuple[list[int], SamplingParams]:
    """Validate a GenerateRequest and return (prompt token ids, sampling params). The request's priority is
    kept only when `allow_priority` (the server's --allow-client-priority, or a --priority-tokens caller)."""
    validate_stops(req.stop, req.stop_token_ids, limits.bounds)  # O(1) on the counts: before any other work
    if req.text and len(req.token_ids):
        raise InvalidRequestError("token_ids", "give either text or token_ids, not both")
    if not req.text and not len(req.token_ids) and not req.context_id:
        raise InvalidRequestError("text", "the prompt is empty: give text or token_ids")
    if req.truncation not in pb.Truncation.values():
        raise InvalidRequestError("truncation", f"unknown enum value {req.truncation}")
    _check_prompt_size(req, limits.max_prompt_bytes)
    prompt = tokenizer.encode(req.text) if req.text else list(req.token_ids)
    max_time_s = req.max_time_seconds if req.HasField("max_time_seconds") else None
    if limits.max_time_s is not None and (max_time_s is None or max_time_s > limits.max_time_s):
        max_time_s = limits.max_time_s  # NaN stays NaN (the comparison is False) and validate() names it
    params = SamplingParams(
        max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else limits.default_max_new_tokens,
        temperature=req.temperature if req.HasField("temperature") else 1.0,
        top_k=req.top_k if req.HasField("top_k") else 0,
        top_p=req.top_p if req.HasField("top_p") else 1.0,
        repetition_penalty=req.repetition_penalty if req.HasField("repetition_penalty") else 1.0,
        seed=req.seed if req.HasField("seed") else None,
        stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids),
        logprobs=req.logprobs,
        ignore_eos=req.ignore_eos,
        priority=req.priority if allow_priority else 0,
        max_time_s=max_time_s,
    )
    # Range and context checks are the engine's (SamplingParams.validate, validate_prompt, the scheduler), so
    # every edge reports the same field and message; only truncation needs to know the context here.
    room = limits.max_context - params.max_new_tokens
    if req.truncation == pb.TRUNCATION_LEFT and 0 < room < len(prompt) and not req.context_id:
        prompt = prompt[-room:]
    return prompt, params


def check_text_size(field: str, text: str, limit: int | None) -> None:
    """Refuse a text of more than `limit` UTF-8 bytes (a Tokenize input, a prompt) before encoding it."""
    if limit is None:
        return
    # at least one byte per character: a text with more characters than the limit is refused unencoded
    size = len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidRequestError(
            field, f"text of {size} bytes is larger than this server's limit of {limit} bytes (--max-prompt-bytes)"
        )


def _check_prompt_size(req: pb.GenerateRequest, limit: int | None) -> None:
    """Refuse an oversized prompt before any work is done on it: text in UTF-8 bytes (whatever the tokenizer makes
    of it), token ids by count. The context limit is checked later, in tokens, by the engine."""
    if limit is None:
        return
    field, size = ("text", len(req.text.encode())) if req.text else ("token_ids", len(req.token_ids))
    if size > limit:
        raise InvalidRequestError(
            field, f"prompt of {size} bytes is larger than this server's limit of {limit} bytes (--max-prompt-bytes)"
        )


_FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.ABORTED: pb.FINISH_REASON_CANCELLED,
}


def finish_reason_to_proto(ev: FinishEvent) -> int:
    """Engine finish reason -> pb.FinishReason (an ERROR that is a time limit ends normally)."""
    if ev.finish_reason is FinishReason.ERROR:
        return pb.FINISH_REASON_TIME_LIMIT if ev.error_kind == "timeout" else pb.FINISH_REASON_UNSPECIFIED
    return _FINISH_REASONS[ev.finish_reason]


def finish_reason_label(ev: FinishEvent) -> str:
    """Lower-case finish reason as used in metric labels and the SDK ('length', 'cancelled', ...)."""
    name = pb.FinishReason.Name(finish_reason_to_proto(ev))
    return ev.finish_reason.value if name == "FINISH_REASON_UNSPECIFIED" else name.removeprefix("FINISH_REASON_").lower()


def _logprobs_to_proto(items: Sequence[TokenLogprob], piece: PieceOf) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=p, token=piece(t)) for t, p in lp.top],
            token=piece(lp.token_id),
        )
        for lp in items
    ]


def _usage(ev: FinishEvent) -> pb.Usage:
    return pb.Usage(prompt_tokens=ev.prompt_tokens, generated_tokens=ev.generated_tokens,
                    cached_tokens=ev.cached_tokens)


def _timings(ev: FinishEvent) -> pb.Timings:
    return pb.Timings(
        queue_seconds=ev.queue_time_s,
        prefill_seconds=ev.prefill_time_s,
        first_token_seconds=ev.first_token_time_s,
        total_seconds=ev.total_time_s,
    )


def event_to_stream_response(
    ev: PrefillProgress | TokenEvent | FinishEvent, request_id: str, piece: PieceOf = _no_piece
) -> pb.GenerateStreamResponse:
    """One engine event -> one stream message (`piece` spells logprobs' tokens)."""
    if isinstance(ev, TokenEvent):
        return pb.GenerateStreamResponse(
            request_id=request_id,
            token_ids=ev.token_ids,
            text=ev.text,
            logprobs=_logprobs_to_proto(ev.logprobs, piece),
        )
    if isinstance(ev, PrefillProgress):
        return pb.GenerateStreamResponse(
            request_id=request_id,
            prefill_progress=pb.PrefillProgress(done_tokens=ev.done_tokens, total_tokens=ev.total_tokens),
        )
    return pb.GenerateStreamResponse(
        request_id=request_id,
        text=ev.text,
        finish_reason=finish_reason_to_proto(ev),
        usage=_usage(ev),
        timings=_timings(ev),
        peak_cache_bytes=ev.peak_cache_bytes,
    )


class ResponseAccumulator:
    """Collects the events of one request into the unary GenerateResponse."""

    def __init__(self, request_id: str, piece: PieceOf = _no_piece) -> None:
        self.request_id = request_id
        self._piece = piece
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []

    def add(self, ev: TokenEvent) -> None:
        self._text.append(ev.text)
        self._token_ids.extend(ev.token_ids)
        self._logprobs.extend(ev.logprobs)

    def finish(self, ev: FinishEvent) -> pb.GenerateResponse:
        self._text.append(ev.text)
        return pb.GenerateResponse(
            request_id=self.request_id,
            text="".join(self._text),
            token_ids=self._token_ids,
            logprobs=_logprobs_to_proto(self._logprobs, self._piece),
            finish_reason=finish_reason_to_proto(ev),
            usage=_usage(ev),
            timings=_timings(ev),
            peak_cache_bytes=ev.peak_cache_bytes,
        )


def model_info_to_proto(desc: ModelDescription) -> pb.GetModelInfoResponse:
    c = desc.config
    buckets = c.get("num_buckets", 0)
    return pb.GetModelInfoResponse(
        model_name=desc.name,
        config=pb.ModelConfig(
            vocab_size=c.get("vocab_size", 0),
            hidden_size=c.get("hidden_size", 0),
            attn_layers=list(c.get("attn_layers", [])),
            num_attention_heads=c.get("num_attention_heads", 0),
            attention_head_size=c.get("attention_head_size", 0),
            num_hashes=c.get("num_hashes", 0),
            # A factorised bucket count (a list) is reported as the product, the number of buckets in effect.
            num_buckets=buckets if isinstance(buckets, int) else _product(buckets),
            lsh_attn_chunk_length=c.get("lsh_attn_chunk_length", 0),
            local_attn_chunk_length=c.get("local_attn_chunk_length", 0),
            max_position_embeddings=c.get("max_position_embeddings", 0),
            axial_pos_shape=list(c.get("axial_pos_shape", [])),
            eos_token_id=c.get("eos_token_id", 0),
            pad_token_id=c.get("pad_token_id", 0),
        ),
        config_json=desc.config_json,
        rotation_fingerprint=desc.rotation_fingerprint,
        device=desc.device,
        dtype=desc.dtype,
        backend=desc.backend,
        limits=pb.ServerLimits(
            max_context=desc.max_context,
            max_new_tokens=desc.max_new_tokens_limit,
            max_batch=desc.max_batch,
            max_queue=desc.max_queue,
            cache_memory_bytes=desc.cache_memory_bytes,
            max_logprobs=MAX_LOGPROBS,
            max_receive_message_bytes=desc.max_message_bytes,
            context_memory_bytes=desc.context_memory_bytes,
            max_context_ttl_seconds=desc.max_context_ttl_s,
            default_context_ttl_seconds=desc.default_context_ttl_s,
            prefix_caching=desc.prefix_caching,
        ),
        defaults=pb.GenerationDefaults(
            max_new_tokens=desc.default_max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0
        ),
        server_version=desc.server_version,
        num_parameters=desc.num_parameters,
        tokenizer=pb.TokenizerInfo(kind=desc.tokenizer.kind, vocab_size=desc.tokenizer.vocab_size,
                                   file=desc.tokenizer.file),
    )


def create_context_input(req: pb.CreateContextRequest, tokenizer: TextEncoder, limits: RequestLimits
                         ) -> tuple[list[int], float | None]:
    """Validate a CreateContextRequest: (the context's token ids, its ttl or None for the default)."""
    if req.text and len(req.token_ids):
        raise InvalidRequestError("token_ids", "give either text or token_ids, not both")
    if not req.text and not len(req.token_ids):
        raise InvalidRequestError("text", "the context is empty: give text or token_ids")
    limit = limits.max_prompt_bytes
    if limit is not None:
        field, size = ("text", len(req.text.encode())) if req.text else ("token_ids", len(req.token_ids))
        if size > limit:
            raise InvalidRequestError(field, f"context of {size} bytes is larger than this server's limit of {limit} "
                                      "bytes (--max-prompt-bytes)")
    tokens = tokenizer.encode(req.text) if req.text else list(req.token_ids)
    return tokens, (req.ttl_seconds if req.HasField("ttl_seconds") else None)


def context_progress(context_id: str, ev: PrefillProgress) -> pb.CreateContextResponse:
    return pb.CreateContextResponse(
        context_id=context_id,
        prefill_progress=pb.PrefillProgress(done_tokens=ev.done_tokens, total_tokens=ev.total_tokens))


def context_created(ev: ContextCreated) -> pb.CreateContextResponse:
    return pb.CreateContextResponse(context_id=ev.context_id, prompt_tokens=ev.prompt_tokens,
                                    cache_bytes=ev.cache_bytes, ttl_seconds=ev.ttl_s)


def contexts_to_proto(infos: Sequence[ContextInfo]) -> pb.ListContextsResponse:
    return pb.ListContextsResponse(contexts=[
        pb.ContextInfo(context_id=c.context_id, prompt_tokens=c.prompt_tokens, cache_bytes=c.cache_bytes,
                       expires_in_seconds=max(c.expires_in_s, 0.0), active_requests=c.active_requests)
        for c in infos])


def _product(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out
