"""Inference-core benchmark: reformer-serve vs transformers' Reformer on the same random-init weights.

Prints one markdown table, every row measured in this run, each (implementation, context) in a fresh
process so peak RSS is its own: prefill seconds and peak RSS, decode ms/token (median) and cache bytes at
each context, plus a dense reference of the same widths (transformers GPT2LMHeadModel, SDPA, KV cache) at
1K — close to the weight-read floor of a decode step on this machine.

  python bench/bench_core.py                      # enwik8 shape, contexts 1K 4K 16K 64K
  python bench/bench_core.py --small              # hidden 256 / ff 1024 / 4 heads: a quick run
  python bench/bench_core.py --contexts 1024 4096 --hf-max-prefill 4096

transformers' prefill beyond --hf-max-prefill (default 16K: at 64K it takes ~10 minutes and ~23 GB) is not
run; its decode there is timed on a synthetic cache of the right shapes (random hidden states and bucket
ids: a decode step's cost does not depend on their values), and its prefill cell says "not run".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ENWIK8 = dict(
    attn_layers=["local", "local", "lsh", "local", "local", "local", "lsh", "local", "local", "local", "lsh", "local"],
    hidden_size=1024, feed_forward_size=4096, num_attention_heads=8, attention_head_size=128, num_hashes=4,
    num_buckets=512, lsh_attn_chunk_length=256, local_attn_chunk_length=128, axial_pos_shape=[128, 512],
    axial_pos_embds_dim=[256, 768], max_position_embeddings=65536, vocab_size=258, hidden_act="relu",
    is_decoder=True, hash_seed=None, layer_norm_eps=1e-12, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
    local_num_chunks_before=1, local_num_chunks_after=0, hidden_dropout_prob=0.0,
    lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0, chunk_size_feed_forward=0,
)
SMALL = dict(ENWIK8, hidden_size=256, feed_forward_size=1024, num_attention_heads=4, attention_head_size=64,
             axial_pos_embds_dim=[64, 192])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ids(T: int) -> torch.Tensor:
    return torch.randint(3, 258, (1, T), generator=torch.Generator().manual_seed(T))


def _median_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def worker_ours(model_dir: str, T: int, steps: int) -> dict:
    from reformer_infer import load_model

    model = load_model(model_dir)
    ids = _ids(T)
    t0 = time.perf_counter()
    _, cache = model.prefill(ids, capacity=T + steps + 2, last_only=True)
    prefill_s = time.perf_counter() - t0
    rss = peak_rss_bytes()
    tok = torch.tensor([[65]])
    model.decode_step(tok, cache)  # warm-up

    def step():
        model.decode_step(tok, cache)

    ms = _median_ms(step, steps)
    return dict(prefill_s=prefill_s, peak_rss=rss, decode_ms=ms, cache_bytes=model.cache_bytes(T))


def _hf_synthetic_cache(model, T: int):
    from transformers.models.reformer.modeling_reformer import ReformerDynamicCache

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    cache = ReformerDynamicCache()
    nb = cfg.num_buckets if isinstance(cfg.num_buckets, int) else int(torch.tensor(cfg.num_buckets).prod())
    for i, kind in enumerate(cfg.attn_layers):
        states = torch.randn(1, T, cfg.hidden_size, generator=g)
        if kind == "lsh":
            b = torch.randint(0, nb, (1, cfg.num_attention_heads, cfg.num_hashes, T), generator=g)
            b = b + (torch.arange(cfg.num_hashes) * nb).view(1, 1, -1, 1)
        else:
            b = None
        cache.update(b, states, i)
    return cache


def worker_hf(model_dir: str, T: int, steps: int, max_prefill: int) -> dict:
    from transformers import ReformerModelWithLMHead

    model = ReformerModelWithLMHead.from_pretrained(model_dir).eval()
    out = {}
    with torch.no_grad():
        if T <= max_prefill:
            t0 = time.perf_counter()
            past = model(_ids(T), use_cache=True).past_buckets_states
            out["prefill_s"] = time.perf_counter() - t0
            out["peak_rss"] = peak_rss_bytes()
        else:
            past = _hf_synthetic_cache(model, T)
        nbytes = sum(t.nbytes for t in past.states_cache) + sum(t.nbytes for t in past.buckets_cache)
        tok = torch.tensor([[65]])
        state = {"past": past}

        def step():
            o = model(tok, past_buckets_states=state["past"], use_cache=True)
            state["past"] = o.past_buckets_states

        step()
        out["decode_ms"] = _median_ms(step, steps)
        out["cache_bytes"] = nbytes
    return out


def worker_dense(spec: dict, T: int, steps: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=258, n_positions=max(T + steps + 8, 1024), n_embd=spec["hidden_size"],
                     n_layer=len(spec["attn_layers"]), n_head=spec["num_attention_heads"],
                     n_inner=spec["feed_forward_size"], attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(_ids(T), use_cache=True)
        prefill_s = time.perf_counter() - t0
        rss = peak_rss_bytes()
        state = {"past": out.past_key_values}
        tok = torch.tensor([[65]])

        def step():
            o = model(tok, past_key_values=state["past"], use_cache=True)
            state["past"] = o.past_key_values

        step()
        ms = _median_ms(step, steps)
    kv = 2 * len(spec["attn_layers"]) * T * spec["hidden_size"] * 4
    return dict(prefill_s=prefill_s, peak_rss=rss, decode_ms=ms, cache_bytes=kv)


def run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def fmt_bytes(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="narrow widths for a quick run")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--hf-max-prefill", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per context")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    if args.worker:
        kind, model_dir, T, steps = args.worker[0], args.worker[1], int(args.worker[2]), int(args.worker[3])
        if kind == "ours":
            r = worker_ours(model_dir, T, steps)
        elif kind == "hf":
            r = worker_hf(model_dir, T, steps, int(args.worker[4]))
        else:
            r = worker_dense(json.loads(Path(model_dir).read_text()), T, steps)
        print(json.dumps(r))
        return

    from transformers import ReformerConfig, ReformerModelWithLMHead

    spec = SMALL if args.small else ENWIK8
    tmp = Path(tempfile.mkdtemp(prefix="bench_core_"))
    torch.manual_seed(0)
    hf = ReformerModelWithLMHead(ReformerConfig(**spec)).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    hf.save_pretrained(tmp / "hf")
    del hf
    (tmp / "spec.json").write_text(json.dumps(spec))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    print(f"# bench_core: {'small' if args.small else 'enwik8'} widths, {n_params / 1e6:.0f}M params, "
          f"fp32, batch 1, {args.threads} threads, torch {torch.__version__}")
    print("| context | impl | prefill s | prefill peak RSS | decode ms/token (median) | cache |")
    print("|---|---|---|---|---|---|")
    rows = []
    dense = run_worker(["dense", str(tmp / "spec.json"), "1024", str(args.steps)])
    for T in args.contexts:
        steps = args.steps if T <= 16384 else max(4, args.steps // 2)
        ours = run_worker(["ours", str(tmp / "hf"), str(T), str(steps)])
        ref = run_worker(["hf", str(tmp / "hf"), str(T), str(steps), str(args.hf_max_prefill)])
        rows.append((T, ours, ref))
        for name, r in (("reformer-serve", ours), ("transformers", ref)):
            if "error" in r:
                print(f"| {T} | {name} | error: {r['error']} | | | |")
                continue
            pre = f"{r['prefill_s']:.1f}" if "prefill_s" in r else "not run"
            print(f"| {T} | {name} | {pre} | {fmt_bytes(r.get('peak_rss'))} | {r['decode_ms']:.1f} | "
                  f"{fmt_bytes(r['cache_bytes'])} |", flush=True)
    if "error" not in dense:
        print(f"| 1024 | dense GPT-2 (SDPA, KV cache) | {dense['prefill_s']:.1f} | {fmt_bytes(dense['peak_rss'])} | "
              f"{dense['decode_ms']:.1f} | {fmt_bytes(dense['cache_bytes'])} |")
    print()
    print("Ratios (same run):")
    base = next((o for T, o, _ in rows if "decode_ms" in o), None)
    for T, o, r in rows:
        if "decode_ms" not in o:
            continue
        parts = [f"ours/ours@{rows[0][0]} decode {o['decode_ms'] / base['decode_ms']:.2f}x"]
        if "decode_ms" in r:
            parts.append(f"transformers/ours decode {r['decode_ms'] / o['decode_ms']:.1f}x")
            parts.append(f"ours/transformers cache {o['cache_bytes'] / r['cache_bytes']:.2f}x")
        if "prefill_s" in r:
            parts.append(f"ours/transformers prefill time {o['prefill_s'] / r['prefill_s']:.2f}x")
        if "decode_ms" in dense:
            parts.append(f"ours/dense@1K decode {o['decode_ms'] / dense['decode_ms']:.2f}x")
        print(f"- {T}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
