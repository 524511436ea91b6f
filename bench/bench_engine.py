"""Engine benchmark (not a test): aggregate throughput vs concurrent streams, and decode latency under a
long chunked prefill. Prints one markdown table per part, every figure measured in this run.

  python bench/bench_engine.py                                   # small model, 1/4/16/64 streams, 64K prompt
  python bench/bench_engine.py --streams 1 4 --long-prompt 8192  # quicker

Part 1: N streams (prompt --prompt-len random bytes, --new-tokens each, sampled with per-request seeds,
eos ignored) are submitted at once to an engine with max_batch = N; aggregate tokens/s = generated tokens /
wall time from submission to the last FinishEvent (prefills included). --repeat rounds each run every N in
turn; the table gives medians over rounds and the median of the per-round ratios to the first N.

Part 2: --running streams decode while one --long-prompt prompt is prefilled in chunks of
--prefill-chunk work units; we record, on the consumer side, the gaps between consecutive tokens of the
running streams from the long request's submission to its first token, and compare the largest gap with
the mean engine step time during that prefill (one decode step + one prefill chunk); --long-repeat runs
on one engine, one row each (the largest gap is a single sample, sensitive to the machine's hiccups). The
first run writes the long prompt's state into decode-pool pages never touched before, so it also pays
their first-touch page faults (~10 us a page on this VM: ~16 ms in some steps); later runs reuse the pages
the previous long request gave back, as a server does once it has served one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import time

import torch

from reformer_infer.cache import ReformerCache
from reformer_infer.config import ReformerConfig
from reformer_infer.engine import Engine, EngineConfig, RequestStream
from reformer_infer.memory import freeze_startup_objects, release_large_buffers_promptly
from reformer_infer.model import ReformerLM
from reformer_infer.requests import FinishEvent, PrefillProgress, SamplingParams, TokenEvent

logger = logging.getLogger("bench_engine")

# Two small shapes with 64K positions. "small" follows google/reformer-crime-and-punishment (6 layers
# alternating local/lsh, hidden 256, 2 x 64 heads, chunks 64/64, 1 hash) with factorised buckets sized for
# 64K; "enwik8-small" is the google/reformer-enwik8 layout (12 layers, 4 hashes, 512 buckets, chunks
# 256/128) at a quarter of its width.
PRESETS: dict[str, dict] = {
    "small": dict(
        attn_layers=["local", "lsh"] * 3,
        hidden_size=256,
        feed_forward_size=512,
        num_attention_heads=2,
        attention_head_size=64,
        num_hashes=1,
        num_buckets=[32, 64],
        lsh_attn_chunk_length=64,
        local_attn_chunk_length=64,
        axial_pos_shape=[128, 512],
        axial_pos_embds_dim=[64, 192],
        max_position_embeddings=65536,
        vocab_size=258,
    ),
    "enwik8-small": dict(
        attn_layers=[
            "local",
            "local",
            "lsh",
            "local",
            "local",
            "local",
            "lsh",
            "local",
            "local",
            "local",
            "lsh",
            "local",
        ],
        hidden_size=256,
        feed_forward_size=1024,
        num_attention_heads=4,
        attention_head_size=64,
        num_hashes=4,
        num_buckets=512,
        lsh_attn_chunk_length=256,
        local_attn_chunk_length=128,
        axial_pos_shape=[128, 512],
        axial_pos_embds_dim=[64, 192],
        max_position_embeddings=65536,
        vocab_size=258,
    ),
}


TEMPERATURE = 1.0  # of part 1's streams (--temperature)


def random_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 258) for _ in range(n)]


def model_decode_ms(model: ReformerLM, batch: int, prompt_len: int, steps: int = 7) -> float:
    """Fastest of `steps` bare `decode_step`s over `batch` sequences (no engine), for comparison."""
    caches = [
        model.prefill(torch.tensor([random_prompt(prompt_len, i)]), capacity=prompt_len + steps + 1)[1]
        for i in range(batch)
    ]
    cache = ReformerCache.batch(caches)
    ids = torch.randint(3, 258, (batch, 1), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.decode_step(ids, cache)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


async def throughput(model: ReformerLM, streams: int, prompt_len: int, new_tokens: int, chunk: int) -> dict:
    engine = Engine(
        model,
        EngineConfig(
            max_batch=streams, max_queue=streams, cache_memory_bytes=2**34, prefill_chunk_tokens=chunk
        ),
    )
    engine.start()
    params = [SamplingParams(max_new_tokens=new_tokens, seed=i, ignore_eos=True, temperature=TEMPERATURE)
              for i in range(streams)]
    t0 = time.perf_counter()
    handles = [engine.add_request(random_prompt(prompt_len, i), p) for i, p in enumerate(params)]

    async def consume(stream: RequestStream) -> int:
        n = 0
        async for ev in stream:
            if isinstance(ev, TokenEvent):
                n += len(ev.token_ids)
        return n

    counts = await asyncio.gather(*(consume(h) for h in handles))
    wall = time.perf_counter() - t0
    stats = engine.stats()
    await engine.shutdown()
    return {
        "streams": streams,
        "tokens": sum(counts),
        "wall_s": wall,
        "tok_s": sum(counts) / wall,
        "steps": stats.steps_total,
    }


async def latency_runs(
    model: ReformerLM, runs: int, running: int, long_len: int, chunk: int, prompt_len: int, running_tokens: int
) -> list[dict]:
    """`runs` runs of part 2 on one engine, as a server would serve them: the first finds the engine's decode
    pool fresh (the long prompt's state is first written into pages never touched before), the later ones
    reuse the pages the earlier long request gave back."""
    engine = Engine(
        model,
        EngineConfig(
            max_batch=running + 1,
            cache_memory_bytes=2**36,
            prefill_chunk_tokens=chunk,
            max_new_tokens_limit=model.config.max_context,
        ),
    )
    engine.start()
    try:
        return [
            await latency_under_prefill(engine, running, long_len, prompt_len, running_tokens) for _ in range(runs)
        ]
    finally:
        await engine.shutdown()


async def latency_under_prefill(
    engine: Engine, running: int, long_len: int, prompt_len: int, running_tokens: int
) -> dict:
    model = engine.model
    # Enough tokens for the running streams to outlast the prefill (one per engine step); they are aborted
    # once it is done, and the table says if one ran out first.
    budget = min(model.config.max_context - prompt_len, running_tokens)
    streams = [
        engine.add_request(
            random_prompt(prompt_len, 100 + i), SamplingParams(max_new_tokens=budget, seed=i, ignore_eos=True)
        )
        for i in range(running)
    ]
    arrivals: list[list[float]] = [[] for _ in range(running)]
    window: dict[str, float] = {}
    progress = 0

    async def consume(i: int, stream: RequestStream) -> None:
        async for ev in stream:
            if isinstance(ev, TokenEvent):
                arrivals[i].append(time.perf_counter())

    consumers = [asyncio.create_task(consume(i, s)) for i, s in enumerate(streams)]
    while min(len(a) for a in arrivals) < 3:  # all running streams are decoding
        await asyncio.sleep(0.01)
    # built before the window opens: drawing 64K random ids in Python holds the GIL for ~40 ms, which the
    # engine thread would wait for (a cost of this script, not of serving); add_request's own validation of
    # the prompt stays inside the window
    long_prompt = random_prompt(long_len, 7)
    steps_before = engine.stats().steps_total
    window["start"] = time.perf_counter()
    long = engine.add_request(long_prompt, SamplingParams(max_new_tokens=1))
    fin: FinishEvent | None = None
    async for ev in long:
        if isinstance(ev, PrefillProgress):
            progress += 1
        elif "end" not in window:  # the first token (or the finish, if the prefill failed)
            window["end"] = time.perf_counter()
        if isinstance(ev, FinishEvent):
            fin = ev
    assert fin is not None
    steps = engine.stats().steps_total - steps_before
    outlasted = all(s.finished is False for s in streams)
    for s in streams:
        engine.abort(s.request_id)
    await asyncio.gather(*consumers)

    gaps = []
    for a in arrivals:
        inside = [t for t in a if window["start"] <= t <= window["end"]]
        gaps += [(b - x) for x, b in zip(inside, inside[1:], strict=False)]
    prefill_s = window["end"] - window["start"]
    return {
        "long_len": long_len,
        "prefill_s": prefill_s,
        "steps": steps,
        "step_ms": 1e3 * prefill_s / max(steps, 1),
        "progress_events": progress,
        "gap_p50_ms": 1e3 * statistics.median(gaps) if gaps else float("nan"),
        "gap_p99_ms": 1e3 * sorted(gaps)[int(0.99 * (len(gaps) - 1))] if gaps else float("nan"),
        "gap_max_ms": 1e3 * max(gaps) if gaps else float("nan"),
        "tokens_during": len(gaps) + running,
        "finish": fin.finish_reason.value,
        "outlasted": outlasted,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--model", help="a checkpoint directory instead of a random preset ('default': the bundled model)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--repeat", type=int, default=5, help="rounds of throughput runs over every stream count")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=4096, help="prefill work units per engine step")
    ap.add_argument("--long-prompt", type=int, default=65536, help="0 skips part 2")
    ap.add_argument("--long-repeat", type=int, default=3, help="runs of part 2")
    ap.add_argument("--running", type=int, default=4, help="streams decoding during the long prefill")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="GIL switch interval in seconds (default: Python's 0.005; the server uses 0.0005)")
    ap.add_argument("--running-tokens", type=int, default=8000, help="max_new_tokens of those streams")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--temperature", type=float, default=1.0, help="of part 1's streams (0: greedy)")
    args = ap.parse_args()
    global TEMPERATURE
    TEMPERATURE = args.temperature
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        from reformer_infer import default_model_path, load_model

        path = default_model_path() if args.model == "default" else args.model
        model, name = load_model(path, device=args.device), str(path)
        cfg = model.config
    else:
        cfg = ReformerConfig(**PRESETS[args.preset])
        model = ReformerLM(cfg).eval().to(args.device)  # random init: speed does not depend on the weights
        name = f"preset {args.preset}"
    # process tuning as the server does it: large buffers on mmap (returned at once, no heap ratchet), and
    # startup objects out of the cyclic GC (no full-GC pauses inside engine steps)
    release_large_buffers_promptly()
    freeze_startup_objects()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {name}, {len(cfg.attn_layers)} layers, hidden {cfg.hidden_size} "
        f"({n_params / 1e6:.1f}M params), device {args.device}, torch threads {torch.get_num_threads()}, "
        f"prompt {args.prompt_len} + {args.new_tokens} new tokens per stream, prefill chunk {args.prefill_chunk} units\n"
    )

    # --repeat rounds, each running every stream count in turn, so a ratio compares runs taken moments
    # apart: the machine is shared and its speed drifts. Reported: medians over the rounds, and the median
    # of the per-round ratios to the first stream count.
    rounds = [
        {n: asyncio.run(throughput(model, n, args.prompt_len, args.new_tokens, args.prefill_chunk)) for n in args.streams}
        for _ in range(args.repeat)
    ]
    first = args.streams[0]
    print(
        f"| streams | generated tokens | engine steps | wall s (median) | aggregate tok/s (median) "
        f"| vs {first} stream (median of {args.repeat} rounds) | per round | bare decode_step ms at this batch (min) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for n in args.streams:
        runs = [r[n] for r in rounds]
        ratios = [r[n]["tok_s"] / r[first]["tok_s"] for r in rounds]
        bare = model_decode_ms(model, n, args.prompt_len + args.new_tokens)
        print(
            f"| {n} | {runs[0]['tokens']} | {statistics.median(r['steps'] for r in runs):.0f} | "
            f"{statistics.median(r['wall_s'] for r in runs):.2f} | {statistics.median(r['tok_s'] for r in runs):.1f} | "
            f"{statistics.median(ratios):.2f}× | {' '.join(f'{x:.2f}' for x in ratios)} | {bare:.1f} |"
        )

    if args.long_prompt:
        # prompt + max_new_tokens (1) must fit the context: a "64K" prompt is 65535 tokens here.
        args.long_prompt = min(args.long_prompt, cfg.max_context - 1)
        print()
        print(
            "| run | long prompt | prefill s | engine steps | mean step ms | progress events | running streams | "
            "inter-token p50 ms | p99 ms | max gap ms | max gap / mean step |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        finishes = []
        # the largest gap is one sample: a few runs show its spread (on one engine: run 1 on a fresh pool)
        results = asyncio.run(
            latency_runs(model, args.long_repeat, args.running, args.long_prompt, args.prefill_chunk,
                         args.prompt_len, args.running_tokens)
        )
        for run, r in enumerate(results, start=1):
            label = f"{run} (fresh pool)" if run == 1 else str(run)
            print(
                f"| {label} | {r['long_len']} | {r['prefill_s']:.1f} | {r['steps']} | {r['step_ms']:.1f} | "
                f"{r['progress_events']} | {args.running} | {r['gap_p50_ms']:.1f} | {r['gap_p99_ms']:.1f} | "
                f"{r['gap_max_ms']:.1f} | {r['gap_max_ms'] / r['step_ms']:.2f} |"
            )
            finishes.append(f"{r['finish']}, running streams {'outlasted it' if r['outlasted'] else 'ran out first (raise --running-tokens)'}")
        print(f"\nlong requests: {'; '.join(finishes)}")


if __name__ == "__main__":
    main()
