"""Export benchmark: eager PyTorch vs the exported graphs (TorchScript, ONNX Runtime, torch.export .pt2).

One process, one model (random init, exported once to a temporary directory, export time not counted), every
backend measured in this run on the same prompt: prefill seconds (median of --repeats, last-token logits) and
decode ms/token (median over --new-tokens steps after that prefill), both also as ratios to eager. ONNX
Runtime runs with the same number of intra-op threads as torch (default 1) and spinning off.

  python bench/bench_export.py                        # small: hidden 256, 4 layers, contexts 1K and 4K
  python bench/bench_export.py --contexts 2048 --formats torchscript onnx
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from reformer_infer import ReformerConfig, ReformerLM
from reformer_infer.export import export_model
from reformer_infer.exported import ExportedModel

logger = logging.getLogger("bench_export")

SMALL = dict(
    attn_layers=["local", "lsh", "local", "lsh"], hidden_size=256, feed_forward_size=1024, num_attention_heads=4,
    attention_head_size=64, num_hashes=2, num_buckets=64, lsh_attn_chunk_length=64, local_attn_chunk_length=64,
    axial_pos_shape=[64, 128], axial_pos_embds_dim=[64, 192], max_position_embeddings=8192, vocab_size=258,
)


def measure(backends: dict[str, object], ids: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{backend: (prefill seconds, decode ms/token)} on `ids` (1, T), medians. Backends take turns at every
    repetition and every decode step, so load from other processes on the machine hits them alike."""
    prefill: dict[str, list[float]] = {name: [] for name in backends}
    decode: dict[str, list[float]] = {name: [] for name in backends}
    for model in backends.values():  # warm-up (allocations, graph executors' first runs)
        _, cache = model.prefill(ids[:, : min(ids.shape[1], 256)], last_only=True)
        model.decode_step(torch.tensor([[5]]), cache)
    for _ in range(repeats):
        for name, model in backends.items():
            t0 = time.perf_counter()
            model.prefill(ids, last_only=True)
            prefill[name].append(time.perf_counter() - t0)
    caches = {name: m.prefill(ids, capacity=ids.shape[1] + new_tokens + 1, last_only=True)[1]
              for name, m in backends.items()}
    toks = torch.randint(3, 258, (new_tokens, 1, 1), generator=torch.Generator().manual_seed(1))
    for i in range(new_tokens):
        for name, model in backends.items():
            t0 = time.perf_counter()
            model.decode_step(toks[i], caches[name])
            if i:  # the first step after a prefill is a warm-up
                decode[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(prefill[name]), 1000 * statistics.median(decode[name])) for name in backends}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--formats", nargs="+", default=["torchscript", "onnx"], choices=["torchscript", "onnx", "pt2"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    # One thread by default: on a shared 2-core machine torch's OpenMP workers wait for a core at every op
    # (a 0.1 ms matmul took 7 ms), which measures the neighbours, not the backends.
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**SMALL)).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        backends: dict[str, object] = {"eager": model}
        for fmt in args.formats:
            t0 = time.perf_counter()
            export_model(model, tmp, fmt)
            logger.warning("exported %s in %.1f s", fmt, time.perf_counter() - t0)
            backends[fmt] = ExportedModel(Path(tmp), fmt, num_threads=args.threads)
        for T in args.contexts:
            ids = torch.randint(3, 258, (1, T), generator=torch.Generator().manual_seed(T))
            results = measure(backends, ids, args.new_tokens, args.repeats)
            base = results["eager"]
            for name, (prefill_s, decode_ms) in results.items():
                rows.append((T, name, prefill_s, prefill_s / base[0], decode_ms, decode_ms / base[1]))
    cfg = model.config
    print(f"model: {cfg.num_hidden_layers} layers ({','.join(cfg.attn_layers)}), hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads}x{cfg.attention_head_size} heads, {cfg.num_hashes} hashes, "
          f"chunks {cfg.lsh_attn_chunk_length}/{cfg.local_attn_chunk_length}; torch {torch.__version__}, "
          f"{args.threads} threads, batch 1, fp32")
    print()
    print("| context | backend | prefill s | prefill vs eager | decode ms/token | decode vs eager |")
    print("|---|---|---|---|---|---|")
    for T, name, ps, pr, dm, dr in rows:
        print(f"| {T} | {name} | {ps:.3f} | {pr:.2f}x | {dm:.2f} | {dr:.2f}x |")


if __name__ == "__main__":
    main()
