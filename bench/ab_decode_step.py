"""A/B worker: median CPU time of one decode step of a checkout's model on a synthetic enwik8-shape cache.

Runs the code of the checkout given (its `reformer_infer` and its `bench/bench_core._ours_synthetic_cache`,
so an old commit is measured with its own API), one thread, and prints the median per-step thread CPU time
in ms (CPU time, not wall time: on a shared machine other processes' load does not enter it). Alternate two
checkouts in one shell loop for an A/B:

  git worktree add --detach /tmp/base fc82212
  python bench/ab_decode_step.py --make-model /tmp/enwik8           # random-init enwik8 shape, saved once
  for i in 1 2 3; do for r in /tmp/base .; do
    OMP_NUM_THREADS=1 python bench/ab_decode_step.py --repo $r --model /tmp/enwik8 --context 65500 --steps 12
  done; done
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=".", help="the checkout whose code is measured")
    ap.add_argument("--model", help="checkpoint directory (an enwik8-shape one: see --make-model)")
    ap.add_argument("--make-model", metavar="DIR", help="save a random-init enwik8-shape checkpoint and exit")
    ap.add_argument("--context", type=int, default=1024, help="cached positions")
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed (after 2 warm-up steps)")
    args = ap.parse_args()
    repo = str(Path(args.repo).resolve())
    sys.path[:0] = [repo, repo + "/bench"]
    import torch

    torch.set_num_threads(1)
    import bench_core

    if args.make_model:
        from transformers import ReformerConfig, ReformerModelWithLMHead

        torch.manual_seed(0)
        ReformerModelWithLMHead(ReformerConfig(**bench_core.ENWIK8)).eval().save_pretrained(args.make_model)
        return
    from reformer_infer import load_model

    assert bench_core.__file__.startswith(repo), bench_core.__file__
    model = load_model(args.model)
    cache = bench_core._ours_synthetic_cache(model, args.context, args.steps + 4)
    tok = torch.tensor([[65]])
    times = []
    with torch.inference_mode():
        for _ in range(args.steps + 2):
            t0 = time.thread_time()
            model.decode_step(tok, cache)
            times.append((time.thread_time() - t0) * 1e3)
    print(f"{statistics.median(times[2:]):.3f}")


if __name__ == "__main__":
    main()
