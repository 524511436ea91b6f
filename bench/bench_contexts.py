"""Context-caching benchmark (issue 19; not a test): prefill a long document once, generate from it many times.
Prints markdown tables, every figure measured in this run, on the engine in-process (no gRPC), random-init
weights of the enwik8 shape (bench_core.ENWIK8), fp32, prefix caching off (so the baselines prefill).

Part 1, time to first token at --context tokens: a request on a context (CreateContext done before) with a
--prompt-token prompt, vs a request that sends context + prompt as one prompt. --rounds rounds alternate the
two; the table gives each median and the ratio of the medians.

Part 2, aggregate tokens/s at --fork-context tokens: --streams requests on one context (each its own
--prompt-token prompt, --new-tokens sampled tokens with its own seed), submitted at once, vs --streams
independent requests sending context + the same prompts (each prefills the whole context). Tokens/s =
generated tokens / wall time from submission to the last token; the forks' figure is also given with the
context's own prefill added to their wall time.

  python bench/bench_contexts.py --threads 1 --context 16384 --fork-context 4096 --streams 16
  python bench/bench_contexts.py --small --context 2048 --fork-context 1024 --rounds 1   # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import ENWIK8, SMALL  # noqa: E402

from reformer_infer.config import ReformerConfig  # noqa: E402
from reformer_infer.engine import Engine, EngineConfig, RequestStream  # noqa: E402
from reformer_infer.memory import freeze_startup_objects, release_large_buffers_promptly  # noqa: E402
from reformer_infer.model import ReformerLM  # noqa: E402
from reformer_infer.requests import ContextCreated, FinishEvent, SamplingParams, TokenEvent  # noqa: E402

logger = logging.getLogger("bench_contexts")


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 258) for _ in range(n)]


def build(spec: dict) -> ReformerLM:
    names = {f.name for f in dataclasses.fields(ReformerConfig)}
    torch.manual_seed(0)
    return ReformerLM(ReformerConfig(**{k: v for k, v in spec.items() if k in names and v is not None})).eval()


def new_engine(model: ReformerLM, streams: int) -> Engine:
    engine = Engine(model, EngineConfig(max_batch=streams, max_queue=4 * streams, cache_memory_bytes=2**36,
                                        context_memory_bytes=2**35, prefix_caching=False))
    engine.start()
    return engine


async def create(engine: Engine, doc: list[int]) -> tuple[str, float]:
    t0 = time.perf_counter()
    made = None
    async for ev in engine.create_context(doc):
        if isinstance(ev, ContextCreated):
            made = ev
        elif isinstance(ev, FinishEvent) and made is None:
            raise RuntimeError(f"context failed: {ev}")
    return made.context_id, time.perf_counter() - t0


async def first_token_s(stream: RequestStream, t0: float) -> float:
    first = None
    async for ev in stream:
        if isinstance(ev, TokenEvent) and first is None:
            first = time.perf_counter() - t0
        if isinstance(ev, FinishEvent) and ev.error:
            raise RuntimeError(ev.error)
    return first


async def part1(model: ReformerLM, n: int, prompt_len: int, rounds: int) -> list[str]:
    engine = new_engine(model, 2)
    doc = tokens(n, 1)
    cid, made_s = await create(engine, doc)
    on_ctx, whole = [], []
    for r in range(rounds):
        prompt = tokens(prompt_len, 100 + r)
        params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        for kind in ("context", "whole") if r % 2 == 0 else ("whole", "context"):
            t0 = time.perf_counter()
            if kind == "context":
                on_ctx.append(await first_token_s(engine.add_request(prompt, params, context_id=cid), t0))
            else:
                whole.append(await first_token_s(engine.add_request(doc + prompt, params), t0))
            logger.info("round %d %s: %.3f s", r, kind, (on_ctx if kind == "context" else whole)[-1])
    await engine.shutdown()
    a, b = statistics.median(on_ctx), statistics.median(whole)
    return [
        "| context tokens | prompt | CreateContext (prefill) s | TTFT on the context s | TTFT context + prompt "
        "as one prompt s | ratio |",
        "|---|---|---|---|---|---|",
        f"| {n} | {prompt_len} | {made_s:.1f} | {a:.3f} ({', '.join(f'{x:.3f}' for x in on_ctx)}) | {b:.1f} "
        f"({', '.join(f'{x:.1f}' for x in whole)}) | {a / b:.2%} |",
    ]


async def run_streams(engine: Engine, make, streams: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    handles = [make(i) for i in range(streams)]

    async def consume(stream: RequestStream) -> int:
        k = 0
        async for ev in stream:
            if isinstance(ev, TokenEvent):
                k += len(ev.token_ids)
            elif isinstance(ev, FinishEvent) and ev.error:
                raise RuntimeError(ev.error)
        return k

    counts = await asyncio.gather(*(consume(h) for h in handles))
    return sum(counts), time.perf_counter() - t0


async def part2(model: ReformerLM, n: int, prompt_len: int, streams: int, new_tokens: int) -> list[str]:
    doc = tokens(n, 2)
    prompts = [tokens(prompt_len, 200 + i) for i in range(streams)]
    params = [SamplingParams(max_new_tokens=new_tokens, seed=i, ignore_eos=True) for i in range(streams)]
    engine = new_engine(model, streams)
    cid, made_s = await create(engine, doc)
    fork_tok, fork_s = await run_streams(
        engine, lambda i: engine.add_request(prompts[i], params[i], context_id=cid), streams)
    await engine.shutdown()
    logger.info("forks: %d tokens in %.2f s (context %.1f s)", fork_tok, fork_s, made_s)
    engine = new_engine(model, streams)
    ind_tok, ind_s = await run_streams(engine, lambda i: engine.add_request(doc + prompts[i], params[i]), streams)
    await engine.shutdown()
    logger.info("independent: %d tokens in %.2f s", ind_tok, ind_s)
    return [
        f"| {streams} streams, {n}-token context, {prompt_len}-token prompts, {new_tokens} new tokens each | "
        "generated | wall s | tokens/s |",
        "|---|---|---|---|",
        f"| forks of one context | {fork_tok} | {fork_s:.2f} | {fork_tok / fork_s:.1f} |",
        f"| forks, the context's prefill ({made_s:.1f} s) included | {fork_tok} | {fork_s + made_s:.2f} | "
        f"{fork_tok / (fork_s + made_s):.2f} |",
        f"| independent requests (context + prompt each) | {ind_tok} | {ind_s:.2f} | {ind_tok / ind_s:.2f} |",
        f"| ratio forks / independent (prefill included) | | | {(fork_tok / fork_s) / (ind_tok / ind_s):.1f}x "
        f"({(fork_tok / (fork_s + made_s)) / (ind_tok / ind_s):.1f}x) |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="hidden 256 widths (bench_core.SMALL)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=16384, help="part 1's context tokens (0: skip part 1)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fork-context", type=int, default=4096, help="part 2's context tokens (0: skip part 2)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    release_large_buffers_promptly()
    model = build(SMALL if args.small else ENWIK8)
    freeze_startup_objects()
    print(f"bench_contexts: {'small' if args.small else 'enwik8'} shape, random init, fp32, "
          f"{args.threads} thread(s), torch {torch.__version__}\n")
    if args.context:
        print("\n".join(asyncio.run(part1(model, args.context, args.prompt, args.rounds))) + "\n", flush=True)
    if args.fork_context:
        print("\n".join(asyncio.run(part2(model, args.fork_context, args.prompt, args.streams, args.new_tokens))))


if __name__ == "__main__":
    main()
