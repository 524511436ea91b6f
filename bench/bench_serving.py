"""Serving-overhead benchmark (not a test): generated tokens/s through gRPC vs through the engine directly.

    python bench/bench_serving.py                        # random "small" model, 1 and 16 streams
    python bench/bench_serving.py --model DIR --streams 1 4 16 --new-tokens 256

For each stream count N, N requests (prompt --prompt-len random bytes, --new-tokens each, sampled with
per-request seeds, eos ignored) start at once; aggregate tokens/s = all generated tokens / wall time from
the first submission to the last final event (prefills included); the best of --repeat rounds is kept.

  engine-direct: `Engine.add_request` in this process, events consumed by asyncio tasks;
  gRPC:          the real `reformer-server` in a subprocess (same engine settings), consumed by the SDK's
                 `AsyncClient.generate_stream` over loopback.

The two phases run one after the other (the engine is shut down before the server starts), each after a
warm-up round. Client and server share the machine's cores, as an application on the same host would.
Prints a markdown table; every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "server", ROOT / "clients" / "python", ROOT / "tests"):
    if str(_p) not in sys.path:  # a plain checkout works without `pip install -e`
        sys.path.append(str(_p))

import torch  # noqa: E402
from reformer_client import AsyncClient, Finished, TextChunk  # noqa: E402

from reformer_infer import ReformerConfig, ReformerLM, load_model, save_model  # noqa: E402
from reformer_infer.engine import Engine, EngineConfig, RequestStream  # noqa: E402
from reformer_infer.requests import SamplingParams, TokenEvent  # noqa: E402

logger = logging.getLogger("bench_serving")

# A 6-layer model at a quarter of enwik8's width: big enough that a step costs what a step costs (matmuls,
# not Python), small enough to run in minutes on a 2-core CPU.
SMALL = ReformerConfig(
    attn_layers=["local", "lsh", "local", "lsh", "local", "lsh"],
    hidden_size=256,
    feed_forward_size=1024,
    num_attention_heads=4,
    attention_head_size=64,
    num_hashes=2,
    num_buckets=64,
    lsh_attn_chunk_length=64,
    local_attn_chunk_length=64,
    axial_pos_shape=[64, 64],
    axial_pos_embds_dim=[64, 192],
    max_position_embeddings=4096,
    vocab_size=258,
)
CACHE_BUDGET = 2**31


def random_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 258) for _ in range(n)]


async def engine_direct(model_dir: Path, streams: list[int], prompt_len: int, new_tokens: int,
                        device: str, repeat: int) -> dict[int, float]:
    model = load_model(model_dir, device=device)
    engine = Engine(model, EngineConfig(max_batch=max(streams), max_queue=max(streams),
                                        cache_memory_bytes=CACHE_BUDGET, prefill_chunk_tokens=512))
    engine.start()

    async def round_(n: int) -> float:
        t0 = time.perf_counter()
        handles = [engine.add_request(random_prompt(prompt_len, i),
                                      SamplingParams(max_new_tokens=new_tokens, seed=i, ignore_eos=True))
                   for i in range(n)]

        async def consume(stream: RequestStream) -> int:
            return sum([len(ev.token_ids) async for ev in stream if isinstance(ev, TokenEvent)])

        tokens = sum(await asyncio.gather(*(consume(h) for h in handles)))
        return tokens / (time.perf_counter() - t0)

    await round_(2)  # warm-up
    out = {n: max([await round_(n) for _ in range(repeat)]) for n in streams}
    await engine.shutdown(drain=False)
    return out


async def through_grpc(
    target: str, streams: list[int], prompt_len: int, new_tokens: int, repeat: int
) -> dict[int, float]:
    async with AsyncClient(target) as client:

        async def one(i: int) -> int:
            n = 0
            async for ev in client.generate_stream(random_prompt(prompt_len, i), max_new_tokens=new_tokens,
                                                   seed=i, ignore_eos=True):
                if isinstance(ev, TextChunk):
                    n += len(ev.token_ids)
                elif isinstance(ev, Finished):
                    assert ev.usage.generated_tokens == n == new_tokens
            return n

        async def round_(n: int) -> float:
            t0 = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(i) for i in range(n))))
            return tokens / (time.perf_counter() - t0)

        await round_(2)  # warm-up
        return {n: max([await round_(n) for _ in range(repeat)]) for n in streams}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint directory (default: a random SMALL model)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="rounds per stream count; the best is reported "
                   "(the least disturbed by other processes)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from server_fixtures import start_server  # the tests' subprocess launcher: ephemeral ports, health wait

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            torch.manual_seed(0)
            model_dir = Path(tmp) / "small"
            save_model(ReformerLM(SMALL).eval(), model_dir)
        logger.info("engine-direct ...")
        direct = asyncio.run(engine_direct(model_dir, args.streams, args.prompt_len, args.new_tokens, args.device,
                                           args.repeat))
        logger.info("gRPC ...")
        srv = start_server(model_dir, Path(tmp) / "server", "--device", args.device, "--max-batch",
                           str(max(args.streams)), "--max-queue", str(max(args.streams)), "--cache-memory",
                           str(CACHE_BUDGET), "--prefill-chunk-tokens", "512", "--log-level", "WARNING")
        try:
            grpc_ = asyncio.run(through_grpc(srv.target, args.streams, args.prompt_len, args.new_tokens,
                                              args.repeat))
        finally:
            srv.stop()

    single_direct, single_grpc = direct[min(args.streams)], grpc_[min(args.streams)]
    print(f"\nServing overhead: {args.prompt_len}-token prompts, {args.new_tokens} new tokens each, "
          f"{'random SMALL model' if args.model is None else args.model}, {args.device}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})\n")
    print("| streams | engine-direct tok/s | gRPC tok/s | gRPC / direct | gRPC vs 1-stream gRPC |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.streams:
        print(f"| {n} | {direct[n]:.1f} | {grpc_[n]:.1f} | {grpc_[n] / direct[n]:.2f} | "
              f"{grpc_[n] / single_grpc:.1f}x |")
    print(f"\n(engine-direct {max(args.streams)}-stream scaling: {direct[max(args.streams)] / single_direct:.1f}x)")


if __name__ == "__main__":
    main()
