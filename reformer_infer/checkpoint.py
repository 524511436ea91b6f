"""Loading and saving weights: the project's own format and Hugging Face `ReformerModelWithLMHead` dirs.

Project format: a directory with `config.json` (our `ReformerConfig`) and `model.safetensors` (state dict
including each LSH layer's `rotations` buffer). Hugging Face format: `config.json` plus `model.safetensors`
(optionally sharded with an index) or `pytorch_model.bin`. Loading never executes code from a file:
safetensors, or `torch.load(weights_only=True)`.

The tokenizer travels with the weights: `load_model` attaches the directory's tokenizer as `model.tokenizer`
(tokenizer.json, spiece.model, or the byte-level convention; see reformer_infer.tokenizer) and `save_model`
copies its files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, ReformerConfig
from .model import ReformerLM
from .tokenizer import TokenizerError, copy_tokenizer_files, load_tokenizer

logger = logging.getLogger(__name__)

HF_PREFIX = "reformer."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file or key and why."""


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    st = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    binf = path / "pytorch_model.bin"
    if st.exists():
        return load_file(str(st))
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(path / f)))
        return out
    if binf.exists():
        try:
            return torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - surface any unpickling refusal as a checkpoint error
            raise CheckpointError(f"{binf}: cannot be loaded safely (weights_only=True): {e}") from e
    raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _is_hf(config: dict, weights: dict[str, torch.Tensor]) -> bool:
    return "architectures" in config or any(k.startswith(HF_PREFIX) for k in weights)


def _convert_hf_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in weights.items():
        if k.startswith(HF_PREFIX):
            out[k[len(HF_PREFIX):]] = v
        elif k == "lm_head.decoder.bias":
            # transformers 4.x tied the output bias here (the trained bias of converted Trax checkpoints)
            out.setdefault("lm_head.bias", v)
        else:
            out[k] = v
    return out


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    num_hashes: int | None = None,
) -> ReformerLM:
    """Load a project-format or Hugging Face Reformer checkpoint directory.

    `num_hashes` overrides the hash rounds at load time (rotations are re-drawn from the recorded
    `hash_seed`, as transformers would draw them for that many rounds).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected config.json + weights)")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: missing")
    try:
        raw_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
    weights = _read_weights(path)
    hf = _is_hf(raw_cfg, weights)
    try:
        config = ReformerConfig.from_hf_dict(raw_cfg) if hf else ReformerConfig.from_dict(raw_cfg)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e
    try:  # before the weights are built: a tokenizer that does not fit the vocab is refused at once
        tokenizer = load_tokenizer(path, config.vocab_size)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e
    if hf:
        weights = _convert_hf_weights(weights)
    saved_hashes = config.num_hashes
    if num_hashes is not None:
        config.num_hashes = num_hashes
        config.validate()
    with torch.device("meta"):  # no random init: every tensor comes from the file (or the hash seed)
        model = ReformerLM(config)
    model.to_empty(device="cpu")
    expected = model.state_dict()
    rotation_keys = {k for k in expected if k.endswith(".rotations")}
    have_rotations = rotation_keys <= set(weights)
    missing = sorted(set(expected) - set(weights) - rotation_keys)
    unknown = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unknown:
        raise CheckpointError(f"{path}: unknown weights {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    for k, v in weights.items():
        if k in rotation_keys and (num_hashes not in (None, saved_hashes)):
            continue
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{path}: weight {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}"
            )
    state = {k: v for k, v in weights.items() if not (k in rotation_keys and not have_rotations)}
    if num_hashes not in (None, saved_hashes):
        state = {k: v for k, v in state.items() if k not in rotation_keys}
    model.load_state_dict(state, strict=False)
    if not have_rotations or num_hashes not in (None, saved_hashes):
        model.reset_rotations()  # from config.hash_seed, exactly as transformers draws them
    model.eval()
    model.to(device=device, dtype=dtype)
    for layer in model.lsh_layers():  # hashing always runs in fp32
        layer.rotations = layer.rotations.float()
    model.tokenizer = tokenizer
    logger.info(
        "loaded %s checkpoint %s: %d layers (%s), rotations %s, tokenizer %s",
        "Hugging Face" if hf else "reformer-serve", path, config.num_hidden_layers,
        ",".join(config.attn_layers), model.rotation_fingerprint(), tokenizer.kind,
    )
    return model


def save_model(model: ReformerLM, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write the project format: config.json + model.safetensors (rotations included), plus the files of the
    model's tokenizer when it was loaded with one (tokenizer.json / spiece.model and their side files)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / "config.json")
    state = {}
    for k, v in model.state_dict().items():
        t = v.detach().cpu()
        if dtype is not None and t.is_floating_point() and not k.endswith(".rotations"):
            t = t.to(dtype)
        state[k] = t.contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "reformer-serve/1"})
    copy_tokenizer_files(getattr(model, "tokenizer", None), path)
