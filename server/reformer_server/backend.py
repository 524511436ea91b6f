"""Execution backends: how a checkpoint directory becomes a model object the engine can drive.

The engine only needs the model API (`prefill`, `prefill_iter`, `decode_step`, `cache_bytes`, `config`).
`eager` loads the PyTorch module itself; exported backends (TorchScript / ONNX) can register a loader
here with the same signature and become selectable with `--backend` without touching the server.
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


_BACKENDS: dict[str, Loader] = {"eager": _load_eager}


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


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CUDA (halves weight and cache bytes), float32 on CPU (bf16 matmuls are slow there)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def load_backend(name: str, model_dir: Path, device: str, dtype: str) -> Any:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(_BACKENDS)}")
    logger.info("loading %s on %s (%s, backend %s)", model_dir, device, dtype, name)
    return _BACKENDS[name](model_dir, device, dtype)
