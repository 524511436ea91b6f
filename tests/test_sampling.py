"""Sampling on the device: greedy, filters, penalty, the counter-based seeded draw (independent of the
batch), ids written back as the next input, logprobs of the raw distribution."""

from __future__ import annotations

import math

import pytest
import torch

from reformer_infer.requests import SamplingParams
from reformer_infer.sampling import (
    SlotSampler,
    apply_repetition_penalty,
    filter_top_k_top_p,
    split_seed,
    uniforms,
)

V = 32


def joined(sampler: SlotSampler, prompt: list[int] | None = None, **kw: object) -> int:
    row = sampler.take_row()
    sampler.join(row, SamplingParams(**kw), prompt or [])
    return row


def one(prompt: list[int] | None = None, **kw: object) -> tuple[SlotSampler, int]:
    s = SlotSampler(1, V)
    return s, joined(s, prompt, **kw)


def random_logits(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, generator=g) * 3


def test_greedy_rows_take_argmax_and_become_the_next_input() -> None:
    logits = random_logits(3)
    s = SlotSampler(3, V)
    rows = [joined(s, temperature=0.0) for _ in range(3)]
    out = s.sample_now(logits, rows)
    assert out.tokens == logits.argmax(-1).tolist()
    assert s.next_ids[rows].tolist() == out.tokens  # the next step reads them from the device


def test_top_k_one_equals_greedy_even_at_high_temperature() -> None:
    logits = random_logits(4, seed=1)
    s = SlotSampler(4, V)
    rows = [joined(s, temperature=5.0, top_k=1, seed=i) for i in range(4)]
    assert s.sample_now(logits, rows).tokens == logits.argmax(-1).tolist()


def test_greedy_and_sampled_rows_mix_in_one_step() -> None:
    """Greedy rows (temperature 0) are picked by a mask, not a branch: in a step with sampled rows they still
    take the argmax of their (penalised) logits, while the sampled rows draw."""
    logits = torch.zeros(4, V)
    logits[:, 3] = 1.0
    logits[:, 4] = 0.9
    s = SlotSampler(4, V)
    rows = [joined(s, temperature=0.0), joined(s, [3], temperature=0.0, repetition_penalty=2.0),
            joined(s, temperature=50.0, seed=1), joined(s, temperature=50.0, seed=2)]
    got = [s.sample_now(logits, rows).tokens for _ in range(8)]
    assert all(t[0] == 3 for t in got)
    # penalised: 3 (prompt) 0.5 < 4 0.9; then 4 is seen too: 3 0.5 > 4 0.45
    assert [t[1] for t in got] == [4] + [3] * 7
    assert len({t[2] for t in got} | {t[3] for t in got}) > 4  # near-uniform draws over 32 ids


def test_filter_keeps_top_k_and_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = filter_top_k_top_p(logits, torch.tensor([0, 3]), torch.tensor([0.7, 1.0]))
    # Row 0: top_p 0.7 keeps 0.5 and 0.3 (mass before 0.3 is 0.5 < 0.7; before 0.15 is 0.8).
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    # Row 1: top_k 3.
    assert torch.isfinite(out[1]).tolist() == [True, True, True, False]


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_frequencies_follow_the_filtered_distribution() -> None:
    """4000 tokens of one seeded stream (the draw counter advancing) and one token from each of 4000 seeds:
    both follow the renormalised nucleus (chi-square with 2 degrees of freedom under 13.8, p = 0.001; a
    stream that ignored p, e.g. uniform over the three, scores in the hundreds), nothing outside it."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = probs.clamp_min(1e-30).log().unsqueeze(0)
    expected = torch.tensor([0.5, 0.3, 0.15]) / 0.95  # top_p 0.9 keeps the first three
    n = 4000
    s, row = one(temperature=1.0, top_p=0.9, seed=123)
    stream = torch.tensor([s.sample_now(logits, [row]).tokens[0] for _ in range(n)])
    many = SlotSampler(n, V)
    rows = [joined(many, temperature=1.0, top_p=0.9, seed=seed) for seed in range(n)]
    across = torch.tensor(many.sample_now(logits.expand(n, V), rows).tokens)
    for tokens in (stream, across):
        counts = torch.bincount(tokens, minlength=V).float()
        assert counts[3:].sum() == 0
        assert chi_square(counts[:3], expected * n) < 13.8, counts[:3]
        assert chi_square(counts[:3], torch.full((3,), n / 3)) > 100  # the test can fail


def test_uniforms_are_uniform_and_unrelated_across_entries_rows_and_counters() -> None:
    """The counter-based hash: U(0, 1) strictly inside, flat (chi-square over 50 bins, 49 degrees of
    freedom, under 85, p = 0.001), and neighbouring vocabulary entries, seeds and counters uncorrelated."""
    vocab = torch.arange(1000).unsqueeze(0)
    k = torch.arange(200).unsqueeze(1)
    zero = torch.zeros_like(k)
    for lo, hi, counter in ((k, zero, zero), (zero, k, zero), (zero + 7, zero, k)):
        u = uniforms(lo, hi, counter, vocab)  # (200, 1000)
        assert 0 < u.min().item() and u.max().item() < 1
        bins = torch.histc(u, 50, 0, 1)
        assert chi_square(bins, torch.full((50,), u.numel() / 50)) < 85
        for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):
            assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01


def test_a_draw_is_the_documented_function_of_seed_counter_and_entry() -> None:
    """Token i of a seeded request is argmax(filtered logits / T - log(-log U(seed, i, v))) (docs/semantics.md),
    for seeds using all 63 bits."""
    seed = 2**62 + 12345
    s, row = one(temperature=0.7, top_p=0.95, seed=seed)
    lo, hi = (torch.tensor([[x]]) for x in split_seed(seed))
    for i in range(40):
        logits = random_logits(1, seed=i)
        got = s.sample_now(logits, [row]).tokens[0]
        filtered = filter_top_k_top_p(logits / 0.7, torch.tensor([0]), torch.tensor([0.95]))
        u = uniforms(lo, hi, torch.tensor([[i]]), torch.arange(V).unsqueeze(0))
        assert got == int((filtered - u.log().neg().log()).argmax(-1)), i


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_repetition_penalty_covers_prompt_and_generated_ids() -> None:
    """The seen mask is the row's device buffer: the prompt's ids go in when the request joins, each sampled
    id inside the step that samples it."""
    logits = torch.zeros(1, V)
    logits[0, 5] = 1.0
    logits[0, 6] = 0.9
    s, row = one([5], temperature=0.0, repetition_penalty=2.0)
    assert s.sample_now(logits, [row]).tokens == [6]  # 5 was in the prompt: 1.0 / 2 < 0.9
    logits[0, 7] = 0.8
    assert s.sample_now(logits, [row]).tokens == [7]  # 6 was generated: 0.45 < 0.8
    assert s.seen[row].nonzero().flatten().tolist() == [5, 6, 7]


def test_same_seed_gives_same_tokens_regardless_of_batch_composition() -> None:
    steps = 20
    base = [random_logits(1, seed=100 + t)[0] for t in range(steps)]

    alone, row = one(temperature=1.0, top_k=10, seed=42)
    solo_tokens = [alone.sample_now(base[t].unsqueeze(0), [row]).tokens[0] for t in range(steps)]

    s = SlotSampler(2, V)  # grows to fit the rows below
    others = [joined(s, temperature=0.8, top_p=0.9, seed=7), joined(s, temperature=0.0),
              joined(s, temperature=1.3)]
    target = joined(s, temperature=1.0, top_k=10, seed=42)
    batched_tokens = []
    for t in range(steps):
        # The target sits at a different row each step, next to rows with other parameters.
        rows = others[: t % 4]
        logits = torch.stack([random_logits(1, seed=999 + t * 7 + j)[0] for j in range(len(rows))] + [base[t]])
        batched_tokens.append(s.sample_now(logits, [*rows, target]).tokens[-1])
    assert batched_tokens == solo_tokens
    assert s.S == 4 and s.generation == 2  # grew once (a captured step would be recorded again)


def test_different_seeds_give_different_streams() -> None:
    logits = torch.zeros(1, V)
    (a, ra), (b, rb) = one(seed=1), one(seed=2)
    ta = [a.sample_now(logits, [ra]).tokens[0] for _ in range(20)]
    tb = [b.sample_now(logits, [rb]).tokens[0] for _ in range(20)]
    assert ta != tb


def test_a_rejoined_row_starts_its_new_request_afresh() -> None:
    """A row given back and taken by the next request: counter, seen ids and parameters are its own."""
    logits = random_logits(1, seed=5)
    s = SlotSampler(1, V)
    row = joined(s, [1, 2], temperature=1.0, repetition_penalty=1.5, seed=9)
    first = [s.sample_now(logits, [row]).tokens[0] for _ in range(5)]
    s.free_row(row)
    again = joined(s, [1, 2], temperature=1.0, repetition_penalty=1.5, seed=9)
    assert again == row
    assert [s.sample_now(logits, [row]).tokens[0] for _ in range(5)] == first


def test_logprobs_are_raw_model_logprobs_with_top_n() -> None:
    logits = random_logits(2, seed=3)
    s = SlotSampler(2, V)
    rows = [joined(s, temperature=0.0, logprobs=3), joined(s, temperature=0.0)]
    out = s.sample_now(logits, rows)
    lp = logits.log_softmax(-1)
    first = out.logprobs[0]
    assert first is not None and out.logprobs[1] is None
    assert first.token_id == out.tokens[0]
    assert first.logprob == pytest.approx(lp[0, out.tokens[0]].item(), abs=1e-6)
    assert [t for t, _ in first.top] == lp[0].topk(3).indices.tolist()
    assert math.isclose(first.top[0][1], lp[0].max().item(), abs_tol=1e-6)
    # with a penalty and a temperature, still the raw distribution's
    s2, r2 = one([int(out.tokens[0])], temperature=2.0, repetition_penalty=3.0, seed=1, logprobs=2)
    got = s2.sample_now(logits[:1], [r2]).logprobs[0]
    assert got.logprob == pytest.approx(lp[0, got.token_id].item(), abs=1e-6)
    assert [t for t, _ in got.top] == lp[0].topk(2).indices.tolist()
