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

--sample T adds the sampling of the token (temperature T, top-p 0.95, seeded; T = 0: greedy) the way the
checkout's engine does it: the step's on-device sampling (`step_graphs.decode_and_sample`, the sampled id
fed back as the next input) and its one download where the checkout has it, else `decode_step` and
`sampling.sample_batch` with the id uploaded from the host.
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
    ap.add_argument("--sample", type=float, default=None, metavar="T", help="sample each token (see above)")
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
    step = lambda: model.decode_step(tok, cache)  # noqa: E731
    if args.sample is not None:
        step = _sampled_step(model, cache, args.sample)
    times = []
    with torch.inference_mode():
        for _ in range(args.steps + 2):
            t0 = time.thread_time()
            step()
            times.append((time.thread_time() - t0) * 1e3)
    print(f"{statistics.median(times[2:]):.3f}")


def _sampled_step(model, cache, temperature: float):
    """One engine-style decode + sampling step of the checkout's own API (see the module docstring)."""
    import torch

    from reformer_infer.requests import SamplingParams

    params = SamplingParams(temperature=temperature, top_p=0.95, seed=1)
    seq = cache.sequences[0]
    try:
        from reformer_infer.sampling import SlotSampler, download, unpack
        from reformer_infer.step_graphs import decode_and_sample
    except ImportError:  # a checkout from before sampling moved into the step
        from reformer_infer.sampling import RequestSampler, sample_batch

        sampler = RequestSampler(params, [65], vocab_size=model.config.vocab_size)
        state = {"tok": 65}

        def old() -> None:
            logits, _ = model.decode_step(torch.tensor([[state["tok"]]]), cache)
            state["tok"] = sample_batch(logits[:, -1], [sampler]).tokens[0]

        return old
    sampler = SlotSampler(2, model.config.vocab_size)
    row = sampler.take_row()
    sampler.join(row, params, [65])

    def new() -> None:
        unpack(download(decode_and_sample(model, seq.pool, [seq.slot], sampler, [row])), [0])

    return new


if __name__ == "__main__":
    main()
