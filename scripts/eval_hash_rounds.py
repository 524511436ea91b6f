"""Held-out bits/byte of one trained model with 1, 2, 4, 8 LSH hash rounds and with full attention.

Reproduces the shape of the Reformer paper's hash-rounds comparison (Kitaev et al. 2020, Table 2 /
Figure 4: LSH attention approaches full attention as rounds grow) on the bundled model. The weights
are the same in every row; only the attention of the LSH layers changes at load time:

* ``lsh-R``: `load_model(path, num_hashes=R)` (rotations re-drawn from the recorded `hash_seed`).
* ``none`` (optional ablation): the LSH layers' output is zeroed, to show how much they carry.
* ``full``: the LSH layers attend densely and causally over the whole context, with the same shared-QK
  projection, key normalisation and self-mask rule (`ReformerLM.set_full_attention(True)`: what the
  reference computes for a sequence that fits in one chunk). Exact but unfused: slow at 64K on CPU.
* ``full-sdpa``: the same attention computed by this script with fused
  `scaled_dot_product_attention` in query blocks (swapped in for the LSH layers' forward), fast
  enough for 64K on CPU; run it beside ``full`` at a short context to see that the two agree.

Each context is scored as consecutive non-overlapping windows of held-out text (Persuasion), every
byte predicted from the bytes before it inside its window.

    python scripts/eval_hash_rounds.py --context 4096 --windows 8
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import types
from collections.abc import Generator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reformer_infer import default_model_path, load_model
from reformer_infer.model import Emit, LSHSelfAttention, ReformerLM, len_norm
from reformer_infer.train import heldout_bits_per_byte, read_bytes_as_ids

logger = logging.getLogger("eval_hash_rounds")

QUERY_BLOCK = 1024  # dense attention is computed this many queries at a time: fused SDPA, bounded memory


def dense_forward_work(
    self: LSHSelfAttention,
    h: Tensor,
    layer_norm: nn.Module,
    n_padded: int,
    state: object,
    score_budget: int,
    emit: Emit,
    step: int | None = None,
) -> Generator[int, None, None]:
    """Full causal shared-QK attention over LN(h) (B, T, E) in place of LSH; output rows (B, t, H*D) go to
    `emit(s0, s1, o)` one query block at a time, as the model's attention hands them over."""
    x = layer_norm(h)
    B, T, _ = x.shape
    H, D = self.H, self.D
    qk = self.query_key(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    v = self.value(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = len_norm(qk) / math.sqrt(D)  # keys length-normalised, queries not (as in LSH attention)
    pos = torch.arange(T, device=x.device)
    for q0 in range(0, T, QUERY_BLOCK):
        q1 = min(q0 + QUERY_BLOCK, T)
        qp, kp = pos[q0:q1, None], pos[None, :q1]
        # Causal, and the self-mask rule: a query sees itself only when nothing else is visible
        # (-1e5 against real scores underflows to weight 0), i.e. only at position 0.
        visible = (kp < qp) | ((qp == 0) & (kp == 0))  # (Q, q1)
        # Keys are pre-scaled by 1/sqrt(D) (as in the model), hence scale=1.
        out = F.scaled_dot_product_attention(
            qk[:, :, q0:q1], k[:, :, :q1], v[:, :, :q1], attn_mask=visible, scale=1.0
        )
        emit(q0, q1, out.transpose(1, 2).reshape(B, q1 - q0, H * D))
        yield q1 - q0


def no_attention_work(
    self: LSHSelfAttention,
    h: Tensor,
    layer_norm: nn.Module,
    n_padded: int,
    state: object,
    score_budget: int,
    emit: Emit,
    step: int | None = None,
) -> Generator[int, None, None]:
    """Ablation: the LSH layers contribute nothing (their residual update is zero)."""
    emit(0, h.shape[1], h.new_zeros(h.shape[0], h.shape[1], self.H * self.D))
    yield h.shape[1]


def use_no_attention(model: ReformerLM) -> None:
    for layer in model.lsh_layers():
        layer.forward_work = types.MethodType(no_attention_work, layer)


def use_fused_full_attention(model: ReformerLM) -> None:
    for layer in model.lsh_layers():
        layer.forward_work = types.MethodType(dense_forward_work, layer)


def evaluate(path: Path, heldout: Tensor, context: int, windows: int, setting: str) -> tuple[float, float]:
    """(bits/byte, seconds) of one setting: 'lsh-R', 'full', 'full-sdpa' or 'none' (LSH layers ablated)."""
    if setting == "full":
        model = load_model(path)
        model.set_full_attention(True)  # the model's own dense baseline (exact, unfused)
    elif setting == "full-sdpa":
        model = load_model(path)
        use_fused_full_attention(model)
    elif setting == "none":
        model = load_model(path)
        use_no_attention(model)
    else:
        model = load_model(path, num_hashes=int(setting.split("-")[1]))
    t0 = time.monotonic()
    bpb = heldout_bits_per_byte(model, heldout, context, windows)
    return bpb, time.monotonic() - t0


def label(setting: str) -> str:
    if setting == "full":
        return "full attention"
    if setting == "full-sdpa":
        return "full attention (fused SDPA)"
    if setting == "none":
        return "LSH layers removed (ablation)"
    rounds = int(setting.split("-")[1])
    return f"LSH, {rounds} round{'s' if rounds > 1 else ''}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--heldout", type=Path, default=Path("data/austen/heldout.txt"))
    parser.add_argument("--context", type=int, action="append", help="window length (repeatable)")
    parser.add_argument("--windows", type=int, default=8, help="windows per context")
    parser.add_argument("--settings", default="lsh-1,lsh-2,lsh-4,lsh-8,full")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    heldout = read_bytes_as_ids(args.heldout)
    rows: list[tuple[int, str, float, float]] = []
    for context in args.context or [4096]:
        n = min(args.windows, (heldout.numel() - 1) // context)
        for setting in args.settings.split(","):
            bpb, secs = evaluate(args.model, heldout, context, n, setting)
            logger.info("context %d x %d windows, %s: %.4f bits/byte (%.0f s)", context, n, setting, bpb, secs)
            rows.append((context, setting, bpb, secs))
    # The CLI's own output: a Markdown table for docs/quality.md.
    print("| context | windows | attention | held-out bits/byte | vs full |")
    print("|---|---|---|---|---|")
    for context, setting, bpb, _ in rows:
        full = next((b for c, s, b, _ in rows if c == context and s.startswith("full")), None)
        rel = f"{100 * (bpb - full) / full:+.2f}%" if full else "n/a"
        n = min(args.windows, (heldout.numel() - 1) // context)
        print(f"| {context} | {n} | {label(setting)} "
              f"| {bpb:.4f} | {rel} |")


if __name__ == "__main__":
    main()
