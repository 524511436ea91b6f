"""Where the bundled default model lives.

The package ships one small trained checkpoint (a byte-level Reformer trained on Jane Austen's
novels; see models/austen/MODEL_CARD.md) so that `reformer-server` with no `--model` serves a real
model offline. Nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

_DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "austen"


def default_model_path() -> Path:
    """Directory (config.json + model.safetensors) of the bundled Austen model."""
    return _DEFAULT_MODEL_DIR
