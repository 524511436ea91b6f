"""Execution backends: how a checkpoint directory becomes a model object the engine can drive.

The engine only needs the model API (`prefill`, `prefill_iter`, `decode_step`, `cache_bytes`, `config`).
`eager` loads the PyTorch module itself; `torchscript`, `onnx` and `pt2` run the prefill / decode graphs of
a `reformer-export` directory (reformer_infer.exported). Another backend registers a loader with the same
signature (`register_backend`) and becomes selectable with `--backend`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Loader = Callable[[Path, str, str], Any]  # (model_dir, device, dtype name) -> model


def _load_eager(model_dir: Path, device: str, dtype: str) -> Any:
    import torch

    import reformer_infer

    return reformer_infer.load_model(model_dir, device=device, dtype=getattr(torch, dtype))


def _exported(kind: str) -> Loader:
    """A loader for a `reformer-export` output directory (see docs/export.md); fp32 graphs. The tokenizer files
    that reformer-export copied beside the graphs are attached as `model.tokenizer`, as `load_model` does."""

    def load(model_dir: Path, device: str, dtype: str) -> Any:
        from reformer_infer.exported import load_exported
        from reformer_infer.tokenizer import load_tokenizer

        model = load_exported(model_dir, kind, device, dtype)
        model.tokenizer = load_tokenizer(model_dir, int(model.config.vocab_size))
        return model

    return load


_BACKENDS: dict[str, Loader] = {
    "eager": _load_eager,
    "torchscript": _exported("torchscript"),
    "onnx": _exported("onnx"),
    "pt2": _exported("pt2"),
}


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def register_backend(name: str, loader: Loader) -> None:
    """Make `--backend name` available (call before the server parses its flags)."""
    _BACKENDS[name] = loader


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str, backend: str = "eager") -> str:
    """'auto' -> bfloat16 on CUDA (halves weight and cache bytes), float32 on CPU (bf16 matmuls are slow there)
    and for exported graphs (exported and checked in float32)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") and backend == "eager" else "float32"


def load_backend(name: str, model_dir: Path, device: str, dtype: str) -> Any:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(_BACKENDS)}")
    logger.info("loading %s on %s (%s, backend %s)", model_dir, device, dtype, name)
    return _BACKENDS[name](model_dir, device, dtype)
