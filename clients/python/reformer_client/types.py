"""The SDK's public data types: plain frozen dataclasses, no protobuf anywhere in the public API."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    """Why a generation ended (mirrors reformer.v1.FinishReason)."""

    LENGTH = "length"  # max_new_tokens generated
    STOP = "stop"  # a stop string or stop token id matched
    EOS = "eos"  # the model produced end-of-sequence
    CANCELLED = "cancelled"  # cancelled by Cancel or by the server shutting down
    TIME_LIMIT = "time_limit"  # max_time_seconds elapsed
    UNSPECIFIED = "unspecified"  # the server sent no reason (a newer server's value this SDK does not know)


class HealthStatus(str, enum.Enum):
    """grpc.health.v1 serving status."""

    UNKNOWN = "UNKNOWN"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float
    token: str = ""  # as the model's tokenizer spells it ("\u2581word", "<0xE2>"; "" without a tokenizer)


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token and the best alternatives at that step."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    token: str = ""  # as the model's tokenizer spells it (see TopLogprob.token)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    # Prompt tokens whose decode state came from a context (explicit `context=`, or found by the server's
    # automatic prefix caching) instead of being processed for this request; counted in prompt_tokens too.
    cached_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    """Seconds, measured by the server's engine from the request's arrival."""

    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    first_token_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass(frozen=True)
class TextChunk:
    """New tokens and the text they complete (whole characters only; never a possible stop-string prefix)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PrefillProgress:
    """Progress of processing a long prompt."""

    request_id: str
    done_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Finished:
    """The last event of a stream; `text` is any final delta that was held back until the end."""

    request_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    peak_cache_bytes: int = 0


StreamEvent = TextChunk | PrefillProgress | Finished


@dataclass(frozen=True)
class GenerateResult:
    """A whole generation."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    peak_cache_bytes: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Context:
    """A prompt prefilled once and pinned on the server (`create_context`): pass it, or its id, as
    `context=` to generate, which then continues after its tokens. It lives `ttl_seconds` from its creation
    or until `delete_context`."""

    context_id: str
    prompt_tokens: int
    cache_bytes: int  # cache bytes it pins on the server
    ttl_seconds: float


@dataclass(frozen=True)
class ContextInfo:
    """One of the caller's live contexts, as `list_contexts` reports it."""

    context_id: str
    prompt_tokens: int
    cache_bytes: int
    expires_in_seconds: float
    active_requests: int  # requests generating on it now


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    attn_layers: tuple[str, ...]
    num_attention_heads: int
    attention_head_size: int
    num_hashes: int
    num_buckets: int
    lsh_attn_chunk_length: int
    local_attn_chunk_length: int
    max_position_embeddings: int
    axial_pos_shape: tuple[int, ...]
    eos_token_id: int
    pad_token_id: int


@dataclass(frozen=True)
class ServerLimits:
    max_context: int
    max_new_tokens: int
    max_batch: int
    max_queue: int
    cache_memory_bytes: int
    max_logprobs: int
    max_receive_message_bytes: int
    context_memory_bytes: int = 0  # cache bytes contexts may pin in total (--context-memory); 0: contexts off
    max_context_ttl_seconds: float = 0.0  # longest TTL a context may ask for
    default_context_ttl_seconds: float = 0.0  # TTL of a context created without ttl_seconds
    prefix_caching: bool = False  # prompts that start with a live context's tokens reuse it automatically


@dataclass(frozen=True)
class GenerationDefaults:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer that came with the model's weights."""

    kind: str  # "tokenizers" (tokenizer.json), "sentencepiece" (spiece.model), "byte", or "none" (token ids only)
    vocab_size: int
    file: str = ""  # the tokenizer file's name in the checkpoint ("" for byte and none)


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    config: ModelConfig
    config_json: str
    rotation_fingerprint: str
    device: str
    dtype: str
    backend: str
    limits: ServerLimits
    defaults: GenerationDefaults
    server_version: str
    num_parameters: int
    tokenizer: TokenizerInfo = TokenizerInfo("", 0)  # kind "" from a server that does not report it
    extra: dict[str, str] = field(default_factory=dict)
