"""A light streaming client (not a test): N concurrent greedy streams against a running reformer-server,
round after round; prints the median aggregate tokens/s of the rounds after the first two, tokens per
message, and, given the server's pid, each of its threads' CPU share over the middle of the run.

    python -m reformer_server --port 50051 --stream-interval 4 &      # the server under test
    python bench/stream_load.py 127.0.0.1:50051 --streams 16 --rounds 16 --server-pid $!

Unlike bench/bench_serving.py, whose client shares a process with an engine (torch, a model), this process
holds only the SDK, as a client application would (docs/benchmarks.md section 7, "Stream interval").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "clients" / "python"))
from reformer_client import AsyncClient, TextChunk  # noqa: E402


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of process `pid` so far (Linux /proc)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


async def main(args: argparse.Namespace) -> None:
    rates: list[float] = []
    tokens = messages = 0
    cpu_before = cpu_after = None
    async with AsyncClient(args.target) as client:

        async def one(i: int) -> tuple[int, int]:
            rng = random.Random(i)
            got = chunks = 0
            async for ev in client.generate_stream([rng.randrange(3, 258) for _ in range(args.prompt_len)],
                                                   max_new_tokens=args.new_tokens, temperature=0.0,
                                                   ignore_eos=True):
                if isinstance(ev, TextChunk) and ev.token_ids:
                    got, chunks = got + len(ev.token_ids), chunks + 1
            return got, chunks

        for r in range(args.rounds):
            if args.server_pid and r == args.rounds // 4:
                cpu_before, t_before = thread_cpu(args.server_pid), time.perf_counter()
            t0 = time.perf_counter()
            done = await asyncio.gather(*(one(i) for i in range(args.streams)))
            wall = time.perf_counter() - t0
            if args.server_pid and r == (3 * args.rounds) // 4:
                cpu_after, t_after = thread_cpu(args.server_pid), time.perf_counter()
            if r >= 2:  # the first rounds warm up
                rates.append(sum(g for g, _ in done) / wall)
                tokens += sum(g for g, _ in done)
                messages += sum(c for _, c in done)
    print(f"{args.streams} streams: median {statistics.median(rates):.1f} tok/s over {len(rates)} rounds, "
          f"{tokens / max(messages, 1):.2f} tokens/message")
    if cpu_before is not None and cpu_after is not None:
        span = t_after - t_before
        shares = sorted(((cpu_after[t] - cpu_before.get(t, 0.0)) / span for t in cpu_after), reverse=True)
        print("server threads' CPU share: " + ", ".join(f"{100 * s:.0f}%" for s in shares if s >= 0.005))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="host:port of a running reformer-server")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--server-pid", type=int, help="report the server's threads' CPU shares (Linux)")
    args = p.parse_args()
    if args.rounds < 3:
        p.error("--rounds must be >= 3 (the first two warm up)")
    asyncio.run(main(args))
