"""A plain description of the loaded model and serving setup (what GetModelInfo and the info metric report)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TokenizerDescription:
    kind: str  # "tokenizers" | "sentencepiece" | "byte" | "none"
    vocab_size: int
    file: str  # the tokenizer file's name ("" for byte and none)


@dataclass(frozen=True)
class ModelDescription:
    name: str
    config: dict[str, Any]
    config_json: str
    rotation_fingerprint: str
    device: str
    dtype: str
    backend: str
    max_context: int
    max_new_tokens_limit: int
    default_max_new_tokens: int
    max_batch: int
    max_queue: int
    cache_memory_bytes: int
    max_message_bytes: int
    num_parameters: int
    server_version: str
    tokenizer: TokenizerDescription = TokenizerDescription("byte", 258, "")
    context_memory_bytes: int = 0  # 0: contexts are off
    max_context_ttl_s: float = 0.0
    default_context_ttl_s: float = 0.0
    prefix_caching: bool = False


def server_version() -> str:
    try:
        return metadata.version("reformer-serve")
    except metadata.PackageNotFoundError:  # running from a source checkout
        return "0.0.0+source"


def rotation_fingerprint(model: Any) -> str:
    """A hash of the model's LSH random rotations: equal fingerprints mean two servers hash tokens into the same
    buckets (rotations are state saved with the weights, ARCHITECTURE.md).

    The model's own `rotation_fingerprint()` (also logged by the checkpoint loader) when it has one; for
    other backends, SHA-256 over the buffers named like rotations (name, shape, float32 bytes).
    """
    own = getattr(model, "rotation_fingerprint", None)
    if callable(own):
        return str(own())
    import torch

    h = hashlib.sha256()
    named = getattr(model, "named_buffers", None)
    buffers = sorted(named()) if named is not None else []
    for name, buf in buffers:
        if "rotation" not in name:
            continue
        h.update(name.encode())
        h.update(str(tuple(buf.shape)).encode())
        h.update(buf.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def config_dict(model: Any, model_dir: Path) -> tuple[dict[str, Any], str]:
    """The config as a dict and the checkpoint's config.json text (rebuilt from the model if absent)."""
    path = model_dir / "config.json"
    if path.exists():
        text = path.read_text()
        return json.loads(text), text
    cfg = model.config.to_dict()
    return cfg, json.dumps(cfg, indent=2)


def tokenizer_info(tokenizer: Any) -> TokenizerDescription:
    """What GetModelInfo says of the engine's tokenizer (reformer_infer.tokenizer)."""
    files = tuple(tokenizer.files)
    return TokenizerDescription(tokenizer.kind, int(tokenizer.vocab_size), files[0].name if files else "")


def num_parameters(model: Any) -> int:
    params = getattr(model, "parameters", None)
    return sum(p.numel() for p in params()) if params is not None else 0
