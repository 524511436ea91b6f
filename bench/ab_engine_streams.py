"""A/B worker: the engine alone (no server), N streams of the bundled model (64-token prompts, eos ignored);
prints the median over 3 rounds (after a warm-up round) of aggregate tokens/s (wall) and of the process's CPU
ms per generated token (both threads: engine and event loop; CPU time moves less with other processes' load
than wall time does), then the warm-up round's seconds (where a compiled step compiles) and a hash of the
tokens (greedy runs of two checkouts must print the same). Runs the checkout given, so two checkouts
alternate in one shell loop:

  for i in 1 2 3 4 5; do for r in /tmp/base .; do
    OMP_NUM_THREADS=1 python bench/ab_engine_streams.py $r 1 128 0     # repo, streams, new tokens, temperature
  done; done
  OMP_NUM_THREADS=1 python bench/ab_engine_streams.py . 1 128 0 1     # 5th: EngineConfig(compile_step=True)
"""

import asyncio
import statistics
import sys
import time

repo, streams, tokens, temp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
compile_step = len(sys.argv) > 5 and sys.argv[5] == "1"
sys.path[:0] = [repo]  # the checkout measured
import torch  # noqa: E402

from reformer_infer import load_model  # noqa: E402
from reformer_infer.defaults import default_model_path  # noqa: E402
from reformer_infer.engine import Engine, EngineConfig  # noqa: E402
from reformer_infer.requests import SamplingParams, TokenEvent  # noqa: E402


async def main() -> None:
    model = load_model(str(default_model_path()))
    extra = {"compile_step": True} if compile_step else {}  # older checkouts have no such field
    eng = Engine(model, EngineConfig(max_batch=streams, max_queue=streams, cache_memory_bytes=2**30, **extra))
    eng.start()
    out, warm_s, tokens_hash = [], 0.0, 0
    for k in range(4):
        t0, c0 = time.perf_counter(), time.process_time()
        hs = [eng.add_request([3 + (7 * i + j) % 250 for j in range(64)],
                              SamplingParams(max_new_tokens=tokens, seed=i, ignore_eos=True, temperature=temp))
              for i in range(streams)]

        async def consume(h) -> tuple[int, ...]:
            return tuple([t async for e in h if isinstance(e, TokenEvent) for t in e.token_ids])

        got = await asyncio.gather(*(consume(h) for h in hs))
        n = sum(map(len, got))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens_hash = hash(tuple(got))
        if k:  # round 0 warms up
            out.append((n / wall, 1e3 * cpu / n))
        else:
            warm_s = wall
    await eng.shutdown()
    print(f"{statistics.median(o[0] for o in out):.1f} {statistics.median(o[1] for o in out):.3f} {warm_s:.1f}"
          f" {tokens_hash}")


if __name__ == "__main__":
    assert __import__("reformer_infer").__file__.startswith(str(__import__("pathlib").Path(repo).resolve()))
    torch.set_num_threads(1)
    sys.setswitchinterval(0.0005)  # as the server sets it
    asyncio.run(main())
