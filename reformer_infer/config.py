"""The model config: a typed dataclass that travels with the weights (config.json beside model.safetensors).

Field names follow Hugging Face `ReformerConfig` where they overlap, so a converted checkpoint's
config.json reads the same. Runtime knobs (device, dtype, slots, memory budget) are not here.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh")

# Seed recorded in a converted config when the source has `hash_seed: null`, so the rotations
# (drawn once at conversion and saved with the weights) are reproducible from the config alone.
DEFAULT_HASH_SEED = 0


class ConfigError(ValueError):
    """An unsupported or inconsistent config value; the message names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"config.{field_name}: {message}")
        self.field = field_name


@dataclass
class ReformerConfig:
    attn_layers: list[str] = field(default_factory=lambda: ["local", "lsh", "local", "lsh"])
    hidden_size: int = 256
    num_attention_heads: int = 4
    attention_head_size: int = 64
    feed_forward_size: int = 512
    hidden_act: str = "relu"
    axial_pos_embds: bool = True
    axial_pos_shape: list[int] = field(default_factory=lambda: [64, 64])
    axial_pos_embds_dim: list[int] = field(default_factory=lambda: [64, 192])
    max_position_embeddings: int = 4096
    lsh_attn_chunk_length: int = 64
    local_attn_chunk_length: int = 64
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    local_num_chunks_before: int = 1
    local_num_chunks_after: int = 0
    num_buckets: int | list[int] = 32
    num_hashes: int = 1
    hash_seed: int = DEFAULT_HASH_SEED
    chunk_size_feed_forward: int = 0  # 0 = no chunking; otherwise FF runs over this many positions at a time
    vocab_size: int = 258
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    eos_token_id: int = 2
    model_type: str = "reformer"

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.attn_layers)

    @property
    def all_head_size(self) -> int:
        return self.num_attention_heads * self.attention_head_size

    @property
    def bucket_factors(self) -> list[int]:
        return [self.num_buckets] if isinstance(self.num_buckets, int) else list(self.num_buckets)

    @property
    def total_buckets(self) -> int:
        return math.prod(self.bucket_factors)

    @property
    def rotation_size(self) -> int:
        return sum(self.bucket_factors)

    @property
    def chunk_lcm(self) -> int:
        """Lengths are padded to a multiple of this (as transformers does) before a full forward."""
        kinds = set(self.attn_layers)
        if kinds == {"lsh"}:
            return self.lsh_attn_chunk_length
        if kinds == {"local"}:
            return self.local_attn_chunk_length
        return math.lcm(self.lsh_attn_chunk_length, self.local_attn_chunk_length)

    @property
    def local_ring_size(self) -> int:
        """Positions a local layer's decode state keeps: every key the next token can still attend to."""
        return (self.local_num_chunks_before + 1) * self.local_attn_chunk_length

    def padded_length(self, n: int) -> int:
        """Length transformers pads a full forward to: a multiple of `chunk_lcm` once n > min chunk."""
        lcm = self.chunk_lcm
        if n % lcm != 0 and n > self.min_chunk_length:
            return n + lcm - n % lcm
        return n

    def check_prompt_length(self, n: int) -> None:
        """Raise ValueError where `prompt_length_error` names a reason (the model's own context)."""
        err = self.prompt_length_error(n)
        if err is not None:
            raise ValueError(err)

    def prompt_length_error(self, n: int, context: int | None = None) -> str | None:
        """Why a prompt of n tokens cannot be prefilled within `context` (default: the model's), or None.
        The prefill pads the prompt as transformers does, so the padded length must fit too."""
        context = self.max_context if context is None else context
        if n < 1:
            return "input_ids must hold at least one token"
        if n > context:
            return f"sequence of {n} tokens exceeds the context of {context}"
        padded = self.padded_length(n)
        if padded > context:
            return f"sequence of {n} tokens is padded to {padded} for prefill, beyond the context of {context}"
        return None

    @property
    def min_chunk_length(self) -> int:
        kinds = set(self.attn_layers)
        lens = []
        if "lsh" in kinds:
            lens.append(self.lsh_attn_chunk_length)
        if "local" in kinds:
            lens.append(self.local_attn_chunk_length)
        return min(lens)

    @property
    def max_context(self) -> int:
        """Longest sequence the position embeddings cover."""
        if self.axial_pos_embds:
            return min(self.max_position_embeddings, math.prod(self.axial_pos_shape))
        return self.max_position_embeddings

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> ReformerConfig:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(name, f"must be a positive integer, got {v!r}")

        def non_negative(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(name, f"must be a non-negative integer, got {v!r}")

        if not self.attn_layers:
            raise ConfigError("attn_layers", "must name at least one layer")
        for kind in self.attn_layers:
            if kind not in ("lsh", "local"):
                raise ConfigError("attn_layers", f"unknown layer type {kind!r} (expected 'lsh' or 'local')")
        for name in ("hidden_size", "num_attention_heads", "attention_head_size", "feed_forward_size",
                     "max_position_embeddings", "lsh_attn_chunk_length", "local_attn_chunk_length",
                     "num_hashes", "vocab_size"):
            positive(name)
        for name in ("lsh_num_chunks_before", "lsh_num_chunks_after", "local_num_chunks_before",
                     "local_num_chunks_after", "chunk_size_feed_forward", "hash_seed"):
            non_negative(name)
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError("hidden_act", f"unsupported activation {self.hidden_act!r}; one of {ACTIVATIONS}")
        factors = self.bucket_factors
        if not factors or any(not isinstance(f, int) or f < 2 or f % 2 for f in factors):
            raise ConfigError("num_buckets", f"must be an even integer >= 2 or a list of them, got {self.num_buckets!r}")
        if self.axial_pos_embds:
            if len(self.axial_pos_shape) != 2 or len(self.axial_pos_embds_dim) != 2:
                raise ConfigError("axial_pos_shape", "only two-axis axial position embeddings are supported")
            if sum(self.axial_pos_embds_dim) != self.hidden_size:
                raise ConfigError(
                    "axial_pos_embds_dim",
                    f"must sum to hidden_size={self.hidden_size}, got {self.axial_pos_embds_dim}",
                )
            if math.prod(self.axial_pos_shape) < self.chunk_lcm:
                raise ConfigError("axial_pos_shape", "must cover at least one chunk")
        if not (0 <= self.pad_token_id < self.vocab_size):
            raise ConfigError("pad_token_id", f"must be in [0, vocab_size), got {self.pad_token_id}")
        if not (0 <= self.eos_token_id < self.vocab_size):
            raise ConfigError("eos_token_id", f"must be in [0, vocab_size), got {self.eos_token_id}")
        if not (self.layer_norm_eps > 0):
            raise ConfigError("layer_norm_eps", f"must be > 0, got {self.layer_norm_eps}")
        return self

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown config field(s) {unknown}")
        kw = dict(d)
        for name in ("attn_layers", "axial_pos_shape", "axial_pos_embds_dim"):
            if name in kw:
                kw[name] = list(kw[name])
        if isinstance(kw.get("num_buckets"), (list, tuple)):
            kw["num_buckets"] = list(kw["num_buckets"])
        return cls(**kw).validate()

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ReformerConfig:
        """Map a Hugging Face ReformerConfig dict onto ours (HF-only fields like dropouts are dropped)."""
        if d.get("model_type", "reformer") != "reformer":
            raise ConfigError("model_type", f"expected 'reformer', got {d.get('model_type')!r}")
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        if d.get("is_decoder") is False:
            logger.warning("config.is_decoder is false; reformer-serve always runs the model causally")
        if d.get("lsh_attention_probs_dropout_prob", 0) or d.get("hidden_dropout_prob", 0):
            logger.info("dropout probabilities are ignored at inference")
        num_buckets = d.get("num_buckets")
        if num_buckets is None:
            num_buckets = _default_num_buckets(d)
            logger.warning("config.num_buckets is null; fixing it to %s (recorded in the converted config)", num_buckets)
        kw["num_buckets"] = num_buckets
        if d.get("hash_seed") is None:
            kw["hash_seed"] = DEFAULT_HASH_SEED
            logger.warning(
                "config.hash_seed is null (transformers re-draws rotations on every call); using fixed seed %d, "
                "recorded in the converted config",
                DEFAULT_HASH_SEED,
            )
        eos = d.get("eos_token_id")
        kw["eos_token_id"] = 2 if eos is None else (eos[0] if isinstance(eos, list) else eos)
        if d.get("pad_token_id") is None:
            kw["pad_token_id"] = 0
        kw["model_type"] = "reformer"
        return cls.from_dict(kw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ReformerConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _default_num_buckets(d: dict[str, Any]) -> int | list[int]:
    """What transformers' `_set_num_buckets` would choose for a sequence of max_position_embeddings tokens."""
    chunk = int(d.get("lsh_attn_chunk_length", 64))
    max_pos = int(d.get("max_position_embeddings", 4096))
    pow2 = (2 * (max_pos // chunk)).bit_length() - 1
    num = 2**pow2
    limit = 2 * max(int((max_pos // chunk) ** 0.5), chunk)
    if num > limit:
        return [2 ** (pow2 // 2), 2 ** (pow2 - pow2 // 2)]
    return num
