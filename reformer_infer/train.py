"""Train a byte-level Reformer language model on plain text (the bundled default model's recipe).

The network is the inference model itself (`ReformerLM`), trained through its plain full forward
with ordinary autograd: at a few million parameters, activation memory is small enough that the
reversible-backprop trick of the paper (Kitaev et al. 2020, section 3) is not needed.

Recipe: AdamW, linear warmup then cosine decay to `min_lr_ratio * lr`, gradient-norm clipping,
next-byte cross-entropy on random windows of the training text, held-out bits/byte at regular
intervals, periodic checkpoints (`ckpt.pt`, with optimizer state and RNG) and `--resume`.
`--init-from` starts a new phase (e.g. the long-sequence fine-tune) from a checkpoint's weights.

The first axial position axis is tied across rows during training (`--tie-axial-rows`, default
on): training windows are far shorter than the 65,536 positions the table covers, so untied rows
beyond the training length would stay at their random init. Tied, every position p gets
E1[shared] ++ E2[p mod n2], all of which training has seen.

    python -m reformer_infer.train --data-dir data/austen --out runs/austen --steps 3000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reformer_infer.config import ReformerConfig
from reformer_infer.model import ReformerLM
from reformer_infer.tokenizer import BYTE_OFFSET

logger = logging.getLogger("reformer_infer.train")

# The bundled model's shape; see reformer_infer/models/austen/MODEL_CARD.md. Sized for CPU training:
# on one shared core this model trains at ~4K bytes/s, and at ~20M training bytes a ~1M-parameter
# model is near compute-optimal (Hoffmann et al. 2022: ~20 tokens per parameter).
DEFAULT_MODEL: dict[str, Any] = {
    "attn_layers": ["local", "lsh", "local", "lsh"],
    "hidden_size": 128,
    "num_attention_heads": 4,
    "attention_head_size": 32,
    "feed_forward_size": 512,
    "hidden_act": "relu",
    "axial_pos_shape": [256, 256],
    "axial_pos_embds_dim": [32, 96],
    "max_position_embeddings": 65536,
    "lsh_attn_chunk_length": 64,
    "local_attn_chunk_length": 64,
    # Training windows of 1024 bytes are 16 chunks: 16 buckets put about one chunk in each.
    "num_buckets": 16,
    "num_hashes": 2,
    "chunk_size_feed_forward": 512,
}


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    best_heldout_bpb: float = float("inf")
    train_seconds: float = 0.0  # wall-clock seconds in this phase, accumulated across resumes


def read_bytes_as_ids(path: Path) -> torch.Tensor:
    """The file's bytes as a uint8 tensor (ids are byte + BYTE_OFFSET, added per batch)."""
    data = path.read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of seq_len + 1 bytes -> token ids (B, T + 1)."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]  # (B, T+1)
    return data[idx].long() + BYTE_OFFSET


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ids (B, T + 1)."""
    logits = model(ids[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_bits_per_byte(
    model: nn.Module, data: torch.Tensor, seq_len: int, max_windows: int, batch_size: int = 1
) -> float:
    """Bits per byte over consecutive non-overlapping windows from the start of `data`.

    Every window is scored from its own first byte (no carried context), so the figure includes
    the cost of short contexts at window starts; longer `seq_len` therefore scores lower.
    """
    was_training = model.training
    model.eval()
    num_windows = min(max_windows, (data.numel() - 1) // seq_len)
    if num_windows < 1:
        raise ValueError(f"held-out text ({data.numel()} bytes) is shorter than one window of {seq_len}")
    device = next(model.parameters()).device
    total_nats, total_tokens = 0.0, 0
    for first in range(0, num_windows, batch_size):
        rows = range(first, min(first + batch_size, num_windows))
        ids = torch.stack([data[r * seq_len : r * seq_len + seq_len + 1] for r in rows]).long() + BYTE_OFFSET
        ids = ids.to(device)
        logits = model(ids[:, :-1])  # (B, T, V)
        nats = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nats += float(nats)
        total_tokens += ids[:, 1:].numel()
    model.train(was_training)
    return total_nats / total_tokens / math.log(2)


def lr_at(step: int, args: argparse.Namespace, time_fraction: float = 0.0) -> float:
    """Linear warmup to args.lr, then cosine decay to args.lr * args.min_lr_ratio at args.steps.

    With a time budget, the decay follows whichever is further along, steps or wall-clock time
    (`time_fraction` of the budget), so a run cut short by the clock still ends at the floor.
    """
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, max((step - args.warmup) / max(1, args.steps - args.warmup), time_fraction))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def axial_row_table(model: nn.Module, config: ReformerConfig) -> nn.Parameter | None:
    """The first axial position table (n1 rows over dim d1), found by shape."""
    n1, d1 = config.axial_pos_shape[0], config.axial_pos_embds_dim[0]
    for name, p in model.named_parameters():
        if "pos" in name and p.numel() == n1 * d1 and p.shape[0] == n1:
            return p
    return None


def tie_axial_rows(model: nn.Module, config: ReformerConfig) -> None:
    """Make all rows of the first axial table equal and keep them equal (gradient averaged over rows)."""
    table = axial_row_table(model, config)
    if table is None:
        raise RuntimeError("could not find the first axial position table to tie")
    with torch.no_grad():
        table.copy_(table.mean(dim=0, keepdim=True).expand_as(table))
    # Identical rows, identical (averaged) gradients and AdamW's per-element update keep them identical.
    table.register_hook(lambda g: g.mean(dim=0, keepdim=True).expand_as(g).contiguous())


def init_weights(model: ReformerLM, gen: torch.Generator) -> None:
    """GPT-2-style init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2L).

    ReformerLM's own constructor only allocates (inference loads every tensor from a file), so
    training sets the initial values here, from a seeded generator rather than the global RNG.
    """
    num_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            if p.dim() == 1:
                p.zero_()
                continue
            std = 0.02 / math.sqrt(2 * num_layers) if name.endswith("output.dense.weight") else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def redraw_rotations(model: ReformerLM, gen: torch.Generator) -> None:
    """Fresh random LSH rotations for every layer, as at every step in the paper's training.

    The QK projection then cannot adapt to one particular set of hyperplanes, so the exported
    rotations (drawn from `hash_seed`) and a different number of hash rounds chosen at load time
    are all in-distribution.
    """
    for layer in model.lsh_layers():
        rot = layer.rotations
        layer.rotations = torch.randn(rot.shape, generator=gen).to(rot.device)


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # Weight decay on matrices only; not on biases, norms, the token embedding or position tables
    # (nanoGPT's split).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_table = "emb" in name or "pos" in name
        (decay if p.dim() >= 2 and not is_table else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, state: TrainState,
                    gen: torch.Generator, args: argparse.Namespace) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "state": state.__dict__,
            "rng": gen.get_state(),
            "config": model.config.to_dict(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        },
        tmp,
    )
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a truncated checkpoint


def export(model: nn.Module, path: Path, dtype: str) -> None:
    """Write the project format (config.json + model.safetensors), optionally in fp16 storage."""
    from reformer_infer import save_model

    model.reset_rotations()  # the shipped rotations come from config.hash_seed, reproducibly
    save_model(model, path, dtype=torch.float16 if dtype == "float16" else None)
    logger.info("exported %s (%s) to %s", type(model).__name__, dtype, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a byte-level Reformer LM.")
    p.add_argument("--data-dir", type=Path, default=Path("data/austen"))
    p.add_argument("--out", type=Path, default=Path("runs/austen"))
    p.add_argument("--model-config", type=Path, help="JSON of ReformerConfig fields (default: DEFAULT_MODEL)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows of --seq-len per eval")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt (weights, optimizer, step)")
    p.add_argument("--init-from", type=Path, help="start a new phase from this ckpt.pt's weights")
    p.add_argument("--time-budget-min", type=float, default=0.0, help="stop (and export) after this many minutes")
    p.add_argument("--no-tie-axial-rows", dest="tie_axial_rows", action="store_false")
    p.add_argument("--export", type=Path, help="write the final model here (config.json + model.safetensors)")
    p.add_argument("--export-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> TrainState:
    """Run (or resume) one training phase; returns the final state."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "ckpt.pt"
    train_data = read_bytes_as_ids(args.data_dir / "train.txt")
    heldout = read_bytes_as_ids(args.data_dir / "heldout.txt")

    resume_ckpt = torch.load(ckpt_path, weights_only=False) if args.resume else None
    init_ckpt = torch.load(args.init_from, weights_only=False) if args.init_from else None
    source = resume_ckpt or init_ckpt
    if source is not None:
        config = ReformerConfig.from_dict(source["config"])
    elif args.model_config:
        config = ReformerConfig.from_dict({**DEFAULT_MODEL, **json.loads(args.model_config.read_text())})
    else:
        config = ReformerConfig.from_dict(dict(DEFAULT_MODEL))

    gen = torch.Generator().manual_seed(args.seed)
    with torch.device("meta"):  # allocate without drawing from the global RNG; values set below
        model = ReformerLM(config)
    model.to_empty(device="cpu")
    model.reset_rotations()
    if source is not None:
        model.load_state_dict(source["model"])
    else:
        init_weights(model, gen)
    model.to(args.device).train()
    if args.tie_axial_rows and config.axial_pos_embds:
        tie_axial_rows(model, config)
    opt = build_optimizer(model, args)
    state = TrainState()
    if resume_ckpt is not None:
        opt.load_state_dict(resume_ckpt["optimizer"])
        state = TrainState(**resume_ckpt["state"])
        gen.set_state(resume_ckpt["rng"])
        logger.info("resumed from %s at step %d (%d tokens seen)", ckpt_path, state.step, state.tokens_seen)
    elif init_ckpt is not None:
        state.tokens_seen = init_ckpt["state"]["tokens_seen"]  # cumulative across phases, for the card
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %s, %.2fM parameters; config %s", type(model).__name__, num_params / 1e6, config.to_dict())

    t_start = time.monotonic() - state.train_seconds
    t_last, tokens_last = time.monotonic(), state.tokens_seen
    budget_s = args.time_budget_min * 60
    while state.step < args.steps:
        state.train_seconds = time.monotonic() - t_start
        time_fraction = state.train_seconds / budget_s if budget_s > 0 else 0.0
        lr = lr_at(state.step, args, time_fraction)
        for group in opt.param_groups:
            group["lr"] = lr
        ids = sample_batch(train_data, args.batch_size, args.seq_len, gen).to(args.device)
        redraw_rotations(model, gen)
        loss = lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        state.step += 1
        state.tokens_seen += args.batch_size * args.seq_len

        if state.step % args.log_every == 0 or state.step == args.steps:
            now = time.monotonic()
            tok_s = (state.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, state.tokens_seen
            logger.info(
                "step %d/%d loss %.4f (%.3f bits/byte) lr %.2e grad_norm %.2f %.0f tok/s elapsed %.1f min",
                state.step, args.steps, loss.item(), loss.item() / math.log(2), lr, float(grad_norm),
                tok_s, (now - t_start) / 60,
            )
        state.train_seconds = time.monotonic() - t_start
        out_of_time = budget_s > 0 and state.train_seconds >= budget_s
        last = state.step == args.steps or out_of_time
        if state.step % args.eval_every == 0 or last:
            model.reset_rotations()  # evaluate with the rotations that will ship
            bpb = heldout_bits_per_byte(model, heldout, args.seq_len, args.eval_windows)
            state.best_heldout_bpb = min(state.best_heldout_bpb, bpb)
            logger.info("step %d held-out %.4f bits/byte (%d tokens seen)", state.step, bpb, state.tokens_seen)
        if state.step % args.ckpt_every == 0 or last:
            save_checkpoint(ckpt_path, model, opt, state, gen, args)
        if out_of_time:
            logger.info("time budget of %.1f min reached at step %d", args.time_budget_min, state.step)
            break

    (args.out / "train_state.json").write_text(json.dumps(state.__dict__, indent=2) + "\n")
    if args.export:
        export(model, args.export, args.export_dtype)
    return state


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
