"""Plain-data contract between the engine and whatever serves it (no torch, grpc or protobuf here).

The engine (`reformer_infer.engine`) consumes `SamplingParams` and emits the events below; the gRPC
server converts them to protobuf messages in exactly one module, and the metrics adapter reads
`EngineStats`. Validation lives here so that every edge reports the same message for the same field.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field


class RequestError(Exception):
    """Base class for errors that belong to one request (never to the engine as a whole)."""


class InvalidRequestError(RequestError, ValueError):
    """A request parameter is invalid; `field` names it (maps to INVALID_ARGUMENT)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class TokenizerUnavailableError(RequestError):
    """Text was asked of a model that has no tokenizer (token ids only); maps to FAILED_PRECONDITION."""


class OverloadedError(RequestError):
    """The waiting queue is full or the cache budget cannot take the request now (RESOURCE_EXHAUSTED)."""


class OutOfMemoryError(RequestError):
    """The device ran out of memory while serving this request; only this request failed."""


class EngineStoppedError(RequestError):
    """The engine is shutting down or has stopped and admits no new work (UNAVAILABLE)."""


class FinishReason(str, enum.Enum):
    """Why a request ended."""

    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop string or stop token id matched
    EOS = "eos"  # the model emitted its end-of-sequence token
    ABORTED = "aborted"  # aborted by the caller (client gone, deadline, shutdown)
    ERROR = "error"  # this request failed (see FinishEvent.error)


@dataclass(frozen=True)
class RequestBounds:
    """Server-set bounds on the size of one request's parameters, so no request can make the engine do
    unbounded work per token (stop matching) or hold unbounded memory. Checked before any work is done."""

    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256  # UTF-8 bytes of one stop string
    max_stop_token_ids: int = 64


def validate_stops(stop: Sequence[str], stop_token_ids: Sequence[int], bounds: RequestBounds) -> None:
    """Raise InvalidRequestError when the stop conditions pass `bounds` (counts first: O(1) on any input)."""
    if len(stop) > bounds.max_stop_strings:
        raise InvalidRequestError(
            "stop", f"{len(stop)} stop strings given; the limit is {bounds.max_stop_strings} (--max-stop-strings)"
        )
    if len(stop_token_ids) > bounds.max_stop_token_ids:
        raise InvalidRequestError(
            "stop_token_ids",
            f"{len(stop_token_ids)} stop token ids given; the limit is {bounds.max_stop_token_ids} "
            "(--max-stop-token-ids)",
        )
    for s in stop:
        # len(s) chars >= 1 byte each: a string with more characters than the limit is refused unencoded
        size = len(s) if len(s) > bounds.max_stop_string_bytes else len(s.encode("utf-8", "surrogatepass"))
        if size > bounds.max_stop_string_bytes:
            raise InvalidRequestError(
                "stop", f"a stop string of {size} bytes is longer than the limit of {bounds.max_stop_string_bytes} "
                "bytes (--max-stop-string-bytes)"
            )


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters. `temperature == 0` means greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # 1.0 = disabled
    repetition_penalty: float = 1.0  # 1.0 = disabled (CTRL-style: logits of seen tokens divided/multiplied)
    seed: int | None = None  # per-request torch.Generator seed; None = nondeterministic
    stop: tuple[str, ...] = ()  # stop strings (matched on the decoded text, never emitted)
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = 0  # top-N log-probabilities per generated token (0 = none)
    ignore_eos: bool = False
    priority: int = 0  # larger runs earlier; FIFO within a priority
    max_time_s: float | None = None  # per-request wall-clock limit on generation

    def validate(
        self, *, vocab_size: int, max_new_tokens_limit: int | None = None, bounds: RequestBounds | None = None
    ) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        validate_stops(self.stop, self.stop_token_ids, bounds or RequestBounds())
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise InvalidRequestError(
                "max_new_tokens", f"must be <= {max_new_tokens_limit}, got {self.max_new_tokens}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0, got {self.top_k}")
        if not math.isfinite(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequestError(
                "repetition_penalty", f"must be a finite number > 0, got {self.repetition_penalty}"
            )
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequestError("seed", f"must be in [0, 2**63), got {self.seed}")
        for s in self.stop:
            if not s:
                raise InvalidRequestError("stop", "stop strings must be non-empty")
        for t in self.stop_token_ids:
            if not (0 <= t < vocab_size):
                raise InvalidRequestError("stop_token_ids", f"token id {t} outside [0, {vocab_size})")
        if not (0 <= self.logprobs <= 20):
            raise InvalidRequestError("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if self.max_time_s is not None and not (self.max_time_s > 0 and math.isfinite(self.max_time_s)):
            raise InvalidRequestError("max_time_s", f"must be > 0, got {self.max_time_s}")


def validate_prompt(prompt_ids: list[int], *, vocab_size: int) -> None:
    """Raise InvalidRequestError for an empty prompt or a token id outside the vocabulary."""
    if len(prompt_ids) == 0:
        raise InvalidRequestError("prompt", "must contain at least one token")
    for t in prompt_ids:
        if not (0 <= t < vocab_size):
            raise InvalidRequestError("token_ids", f"token id {t} outside [0, {vocab_size})")


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of the chosen token and the top-N alternatives at one step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first


@dataclass(frozen=True)
class PrefillProgress:
    """Emitted while a long prompt is prefilled chunk by chunk."""

    request_id: str
    done_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class TokenEvent:
    """New tokens for one request. `text` is a UTF-8-safe delta that never holds a possible stop-string prefix."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class FinishEvent:
    """The last event of every request, whatever happened."""

    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    text: str = ""  # any final text delta not yet released (stop-string hold-back resolved)
    queue_time_s: float = 0.0  # admitted - arrived
    prefill_time_s: float = 0.0  # first token ready - admitted (includes interleaved decode steps)
    first_token_time_s: float = 0.0  # first token ready - arrived
    total_time_s: float = 0.0
    peak_cache_bytes: int = 0
    error: str | None = None  # set when finish_reason is ERROR
    error_kind: str | None = None  # "oom" | "internal" | "timeout" | None
    cached_tokens: int = 0  # prompt tokens whose state came from a context (counted in prompt_tokens too)


@dataclass(frozen=True)
class ContextCreated:
    """A context's prefill is done and it is live (`Engine.create_context`); a FinishEvent follows."""

    request_id: str
    context_id: str
    prompt_tokens: int
    cache_bytes: int
    ttl_s: float


Event = PrefillProgress | TokenEvent | ContextCreated | FinishEvent


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine, for metrics and health."""

    running: int = 0
    waiting: int = 0
    cache_bytes_in_use: int = 0
    cache_bytes_budget: int = 0
    steps_total: int = 0
    prefill_tokens_total: int = 0
    decode_tokens_total: int = 0
    last_step_time_s: float = 0.0
    last_step_tokens: int = 0
    alive: bool = True  # False once the engine loop has died (health turns NOT_SERVING)
    extra: dict[str, float] = field(default_factory=dict)
