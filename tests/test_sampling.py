"""Per-row batched sampling: greedy, filters, penalty, seeded generators independent of the batch."""

from __future__ import annotations

import math

import pytest
import torch

from reformer_infer.requests import SamplingParams
from reformer_infer.sampling import (
    RequestSampler,
    apply_repetition_penalty,
    filter_top_k_top_p,
    sample_batch,
)

V = 32


def sampler(prompt: list[int] | None = None, **kw: object) -> RequestSampler:
    return RequestSampler(SamplingParams(**kw), prompt or [], vocab_size=V)


def random_logits(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, generator=g) * 3


def test_greedy_rows_take_argmax() -> None:
    logits = random_logits(3)
    out = sample_batch(logits, [sampler(temperature=0.0) for _ in range(3)])
    assert out.tokens == logits.argmax(-1).tolist()


def test_top_k_one_equals_greedy_even_at_high_temperature() -> None:
    logits = random_logits(4, seed=1)
    out = sample_batch(logits, [sampler(temperature=5.0, top_k=1, seed=i) for i in range(4)])
    assert out.tokens == logits.argmax(-1).tolist()


def test_filter_keeps_top_k_and_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = filter_top_k_top_p(logits, torch.tensor([0, 3]), torch.tensor([0.7, 1.0]))
    # Row 0: top_p 0.7 keeps 0.5 and 0.3 (mass before 0.3 is 0.5 < 0.7; before 0.15 is 0.8).
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    # Row 1: top_k 3.
    assert torch.isfinite(out[1]).tolist() == [True, True, True, False]


def test_sampled_frequencies_follow_filtered_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = probs.clamp_min(1e-30).log().unsqueeze(0)
    s = sampler(temperature=1.0, top_p=0.9, seed=123)
    counts = torch.zeros(V)
    n = 4000
    for _ in range(n):
        counts[sample_batch(logits, [s]).tokens[0]] += 1
    # top_p 0.9 keeps the first three: renormalised 0.5/0.95, 0.3/0.95, 0.15/0.95.
    expected = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3] / n, expected, atol=0.03)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_repetition_penalty_covers_prompt_and_generated_ids() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5] = 1.0
    logits[0, 6] = 0.9
    s = sampler(prompt=[5], temperature=0.0, repetition_penalty=2.0)
    assert sample_batch(logits, [s]).tokens == [6]  # 5 was in the prompt: 1.0 / 2 < 0.9
    s.observe(6)
    logits[0, 7] = 0.8
    assert sample_batch(logits, [s]).tokens == [7]  # 6 was generated: 0.45 < 0.8


def test_same_seed_gives_same_tokens_regardless_of_batch_composition() -> None:
    steps = 20
    base = [random_logits(1, seed=100 + t)[0] for t in range(steps)]

    alone = sampler(temperature=1.0, top_k=10, seed=42)
    solo_tokens = [sample_batch(base[t].unsqueeze(0), [alone]).tokens[0] for t in range(steps)]

    target = sampler(temperature=1.0, top_k=10, seed=42)
    others = [sampler(temperature=0.8, top_p=0.9, seed=7), sampler(temperature=0.0), sampler(temperature=1.3)]
    batched_tokens = []
    for t in range(steps):
        # The target sits at a different row each step, next to rows with other parameters.
        rows = others[: t % 4]
        batch = [*rows, target]
        logits = torch.stack(
            [random_logits(1, seed=999 + t * 7 + j)[0] for j in range(len(rows))] + [base[t]]
        )
        batched_tokens.append(sample_batch(logits, batch).tokens[-1])
    assert batched_tokens == solo_tokens


def test_different_seeds_give_different_streams() -> None:
    logits = torch.zeros(1, V)
    a, b = sampler(seed=1), sampler(seed=2)
    ta = [sample_batch(logits, [a]).tokens[0] for _ in range(20)]
    tb = [sample_batch(logits, [b]).tokens[0] for _ in range(20)]
    assert ta != tb


def test_logprobs_are_raw_model_logprobs_with_top_n() -> None:
    logits = random_logits(2, seed=3)
    out = sample_batch(logits, [sampler(temperature=0.0, logprobs=3), sampler(temperature=0.0)])
    lp = logits.log_softmax(-1)
    first = out.logprobs[0]
    assert first is not None and out.logprobs[1] is None
    assert first.token_id == out.tokens[0]
    assert first.logprob == pytest.approx(lp[0, out.tokens[0]].item(), abs=1e-6)
    assert [t for t, _ in first.top] == lp[0].topk(3).indices.tolist()
    assert math.isclose(first.top[0][1], lp[0].max().item(), abs_tol=1e-6)


def test_race_draws_in_blocks_equal_one_draw_per_token() -> None:
    """A request draws its exponential race a block of tokens at a time; the tokens equal those of drawing
    one row per token from the same seeded generator (the block changes the cost, not the stream)."""
    steps = 40  # crosses two block boundaries (16 rows per block at V = 32)
    s = sampler(temperature=0.7, top_p=0.95, seed=3)
    got = [sample_batch(random_logits(1, seed=t), [s]).tokens[0] for t in range(steps)]
    g = torch.Generator().manual_seed(3)
    want = []
    for t in range(steps):
        logits = filter_top_k_top_p(random_logits(1, seed=t) / 0.7, torch.tensor([0]), torch.tensor([0.95]))
        race = -torch.empty(1, V).uniform_(generator=g).log()  # E ~ Exp(1)
        want.append(int((logits.log_softmax(-1) - race.log()).argmax(-1)))  # log p, normalised
    assert got == want
