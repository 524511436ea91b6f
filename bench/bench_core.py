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


def worker_prefill_ours(model_dir: str, T: int) -> dict:
    from reformer_infer import load_model

    model = load_model(model_dir)
    t0 = time.perf_counter()
    _, cache = model.prefill(_ids(T), last_only=True)
    return dict(prefill_s=time.perf_counter() - t0, peak_rss=peak_rss_bytes(), cache_bytes=cache.nbytes)


def worker_prefill_hf(model_dir: str, T: int) -> dict:
    from transformers import ReformerModelWithLMHead

    model = ReformerModelWithLMHead.from_pretrained(model_dir).eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        past = model(_ids(T), use_cache=True).past_buckets_states
        dt = time.perf_counter() - t0
    nbytes = sum(t.nbytes for t in past.states_cache) + sum(t.nbytes for t in past.buckets_cache)
    return dict(prefill_s=dt, peak_rss=peak_rss_bytes(), cache_bytes=nbytes)


def _ours_synthetic_cache(model, T: int, extra: int):
    """A cache of T positions with random keys/values and bucket ids (decode cost does not depend on them),
    written into a decode pool through the pool's own prefill interface."""
    g = torch.Generator().manual_seed(0)
    pool = model.new_decode_pool(1, T + extra)
    seq = pool.allocate(T + extra)
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.attention_head_size
    rows = pool.rows_of([seq.slot], T)[0]  # (T,) pool rows
    for i, kind in enumerate(cfg.attn_layers):
        k = torch.randn(H, T, D, generator=g) / D**0.5
        v = torch.randn(H, T, D, generator=g)
        if kind == "local":
            pool.write_ring(pool.local_index[i], seq, k, v, T)
        else:
            j = pool.lsh_index[i]
            pool.keys[j].index_copy_(1, rows, k)
            pool.values[j].index_copy_(1, rows, v)
            b = torch.randint(0, cfg.total_buckets, (1, H, pool.R, T), generator=g)
            pool.set_order(j, [seq.slot], torch.argsort(b * T + torch.arange(T), dim=-1), b)
    pool.finish_prefill([seq], T, hashed=T > cfg.lsh_attn_chunk_length)
    from reformer_infer import ReformerCache

    return ReformerCache([seq])


def worker_decode(model_dir: str, T: int, steps: int, spec_file: str, amortized: int = 0) -> dict:
    """Decode ms/token of ours, transformers (and at 1K the dense reference), interleaved step by step in
    one process so machine load hits all of them alike; each on a synthetic cache of T positions."""
    from transformers import ReformerModelWithLMHead

    from reformer_infer import load_model

    ours = load_model(model_dir)
    hf = ReformerModelWithLMHead.from_pretrained(model_dir).eval()
    cache = _ours_synthetic_cache(ours, T, steps + amortized + 2)
    state = {"past": _hf_synthetic_cache(hf, T)}
    hf_bytes = sum(t.nbytes for t in state["past"].states_cache) + sum(t.nbytes for t in state["past"].buckets_cache)
    tok = torch.tensor([[65]])
    fns = {}

    def ours_step():
        ours.decode_step(tok, cache)

    def hf_step():
        with torch.no_grad():
            state["past"] = hf(tok, past_buckets_states=state["past"], use_cache=True).past_buckets_states

    fns["ours"], fns["hf"] = ours_step, hf_step
    if T <= 1024:
        from transformers import GPT2Config, GPT2LMHeadModel

        spec = json.loads(Path(spec_file).read_text())
        gcfg = GPT2Config(vocab_size=258, n_positions=T + steps + 8, n_embd=spec["hidden_size"],
                          n_layer=len(spec["attn_layers"]), n_head=spec["num_attention_heads"],
                          n_inner=spec["feed_forward_size"], attn_implementation="sdpa")
        dense = GPT2LMHeadModel(gcfg).eval()
        with torch.no_grad():
            dstate = {"past": dense(_ids(T), use_cache=True).past_key_values}

        def dense_step():
            with torch.no_grad():
                dstate["past"] = dense(tok, past_key_values=dstate["past"], use_cache=True).past_key_values

        fns["dense"] = dense_step
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(steps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {f"{k}_decode_ms": statistics.median(v) for k, v in times.items()}
    if amortized:
        # ours alone over more steps than the median above sees: the delta order merges once per 128 tokens
        # (O(T) each), so the mean over >= 2 merges is the honest per-token cost
        t0 = time.perf_counter()
        worst = 0.0
        for _ in range(amortized):
            t1 = time.perf_counter()
            ours_step()
            worst = max(worst, time.perf_counter() - t1)
        out["ours_decode_mean_ms"] = (time.perf_counter() - t0) * 1e3 / amortized
        out["ours_decode_max_ms"] = worst * 1e3
    out["ours_cache_bytes"] = ours.cache_bytes(T)
    out["hf_cache_bytes"] = hf_bytes
    if "dense" in fns:
        out["dense_cache_bytes"] = 2 * gcfg.n_layer * T * gcfg.n_embd * 4
    return out


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


def run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--threads", os.environ.get("OMP_NUM_THREADS", "2"), "--worker", *args]
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
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per context and implementation")
    ap.add_argument("--amortized-steps", type=int, default=256,
                    help="further decode steps of ours alone, for the mean per-token cost including merges")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)

    if args.worker:
        from reformer_infer.memory import release_large_buffers_promptly

        release_large_buffers_promptly()  # as the server does
        kind, model_dir, T = args.worker[0], args.worker[1], int(args.worker[2])
        if kind == "prefill-ours":
            r = worker_prefill_ours(model_dir, T)
        elif kind == "prefill-hf":
            r = worker_prefill_hf(model_dir, T)
        else:
            r = worker_decode(model_dir, T, int(args.worker[3]), args.worker[4], int(args.worker[5]))
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
    model_dir = str(tmp / "hf")

    print(f"bench_core: {'small' if args.small else 'enwik8'} widths, {n_params / 1e6:.0f}M params, fp32, batch 1, "
          f"{args.threads} threads, torch {torch.__version__}; decode timed interleaved step by step "
          f"({args.steps} steps each) on synthetic caches of the given length\n")
    print("| context | impl | prefill s | prefill peak RSS | decode ms/token (median) | cache |")
    print("|---|---|---|---|---|---|")
    results = []
    for T in args.contexts:
        po = run_worker(["prefill-ours", model_dir, str(T)])
        ph = run_worker(["prefill-hf", model_dir, str(T)]) if T <= args.hf_max_prefill else {}
        # at the very end of the context, leave room for the timed steps
        T_dec = min(T, spec["max_position_embeddings"] - args.steps - args.amortized_steps - 2)
        dec = run_worker(["decode", model_dir, str(T_dec), str(args.steps), str(tmp / "spec.json"),
                          str(args.amortized_steps)])
        results.append((T, po, ph, dec))
        err = dec.get("error")
        for name, pre, key in (("reformer-serve", po, "ours"), ("transformers", ph, "hf")):
            pre_s = f"{pre['prefill_s']:.1f}" if "prefill_s" in pre else (pre.get("error") or "not run")
            ms = f"{dec[key + '_decode_ms']:.1f}" if not err else f"error: {err}"
            cache = dec.get(f"{key}_cache_bytes", pre.get("cache_bytes"))
            print(f"| {T} | {name} | {pre_s} | {fmt_bytes(pre.get('peak_rss'))} | {ms} | {fmt_bytes(cache)} |",
                  flush=True)
        if "dense_decode_ms" in dec:
            print(f"| {T} | dense GPT-2 (SDPA, KV cache) | – | – | {dec['dense_decode_ms']:.1f} | "
                  f"{fmt_bytes(dec['dense_cache_bytes'])} |", flush=True)
    print("\nRatios (each from one run):")
    dense = next((d["dense_decode_ms"] for _, _, _, d in results if "dense_decode_ms" in d), None)
    base = next((d["ours_decode_ms"] for _, _, _, d in results if "ours_decode_ms" in d), None)
    for T, po, ph, d in results:
        if "ours_decode_ms" not in d:
            continue
        parts = [f"ours decode vs ours at {results[0][0]}: {d['ours_decode_ms'] / base:.2f}x",
                 f"transformers/ours decode: {d['hf_decode_ms'] / d['ours_decode_ms']:.1f}x",
                 f"ours/transformers cache: {d['ours_cache_bytes'] / d['hf_cache_bytes']:.2f}x"]
        if dense:
            parts.append(f"ours/dense-at-1K decode: {d['ours_decode_ms'] / dense:.2f}x")
        if "ours_decode_mean_ms" in d:
            parts.append(f"ours over {args.amortized_steps} more steps (merges included): mean "
                         f"{d['ours_decode_mean_ms']:.1f} ms, max {d['ours_decode_max_ms']:.1f} ms")
        if "prefill_s" in po and "prefill_s" in ph:
            parts.append(f"ours/transformers prefill time: {po['prefill_s'] / ph['prefill_s']:.2f}x")
        print(f"- {T}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
