"""Batched next-token sampling where every row carries its own parameters and its own RNG.

One call samples a whole decode batch: repetition penalty, temperature, top-k and top-p are applied as
batched tensor ops with per-row values, and only the final random draw is done row by row, each with the
request's own `torch.Generator`. That draw is an exponential race (argmax of log p - log E, E ~ Exp(1)),
which samples exactly from p and consumes the same amount of randomness whatever else is in the batch,
so a seeded request yields the same tokens alone or batched with others. E is -log U for uniform U (torch's
`exponential_` is ~6x slower per element on CPU), and each request draws its rows a block of tokens at a
time (one (k, V) draw; on CPU it yields exactly the values of k draws of (V,)), so a step does not pay a
generator call per request.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reformer_infer.requests import SamplingParams, TokenLogprob

# Rows of a request's block of race draws: up to 16 tokens' worth, at most ~64 KB (large vocabularies
# draw one row at a time).
RACE_BLOCK_ELEMENTS = 16384
RACE_BLOCK_ROWS = 16


class RequestSampler:
    """Per-request sampling state: parameters, seeded generator, ids seen so far (for the penalty)."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        *,
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.params = params
        self.device = torch.device(device)
        # An unseeded request still gets its own generator (seeded from the OS), never the global RNG.
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.seen: torch.Tensor | None = None
        self._vocab = vocab_size
        self._log_race: torch.Tensor | None = None  # (k, V) log E of the current block
        self._race_row = 0
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)  # (V,)
            if len(prompt_ids):
                self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)] = True

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0.0

    def log_race(self) -> torch.Tensor:
        """log E (V,) for the next sampled token, E = -log U ~ Exp(1) with U uniform from the request's
        generator (drawn a block of rows at a time; rows are used in order, so the draws do not depend on
        when or with whom)."""
        if self._log_race is None or self._race_row == self._log_race.shape[0]:
            rows = max(1, min(RACE_BLOCK_ROWS, RACE_BLOCK_ELEMENTS // max(self._vocab, 1)))
            u = torch.empty(rows, self._vocab, device=self.device).uniform_(generator=self.generator)
            # U = 0 (probability 2^-24) would make E infinite: the smallest normal float stands in for it
            self._log_race = u.clamp_(min=torch.finfo(u.dtype).tiny).log_().neg_().log_()
            self._race_row = 0
        row = self._log_race[self._race_row]
        self._race_row += 1
        return row

    def observe(self, token_id: int) -> None:
        """Record a generated token (the penalty applies to prompt and generated ids)."""
        if self.seen is not None:
            self.seen[token_id] = True


@dataclass
class SampleOutput:
    tokens: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # per row, None where the request asked for none


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019, as in HF): seen logits > 0 are divided, < 0 multiplied.

    logits (B, V) float, seen (B, V) bool, penalty (B, 1).
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus (HF order).

    logits (B, V); top_k (B,) long with 0 = off; top_p (B,) float with 1.0 = off.
    """
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # (1, V)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)  # (B, 1)
    remove = ranks >= k
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass strictly before it is below top_p, so the top token always survives.
    mass_before = probs.cumsum(dim=-1) - probs
    remove = remove | (mass_before >= top_p.unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def sample_batch(logits: torch.Tensor, samplers: Sequence[RequestSampler]) -> SampleOutput:
    """Sample one token per row of `logits` (B, V) with each row's own parameters and generator."""
    batch = logits.shape[0]
    assert batch == len(samplers), (batch, len(samplers))
    device = logits.device
    logits = logits.float()
    raw_logits = logits

    penalties = [s.params.repetition_penalty for s in samplers]
    if any(p != 1.0 for p in penalties):
        vocab = logits.shape[-1]
        no_seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen = torch.stack([s.seen if s.seen is not None else no_seen for s in samplers])  # (B, V)
        penalty = torch.tensor(penalties, dtype=logits.dtype, device=device).unsqueeze(1)  # (B, 1)
        logits = apply_repetition_penalty(logits, seen, penalty)

    sampled_rows = [i for i, s in enumerate(samplers) if not s.greedy]
    if not sampled_rows:
        tokens = logits.argmax(dim=-1)  # (B,)
    else:
        every = len(sampled_rows) == batch  # the common case: no row copies, no greedy pass
        rows = None if every else torch.tensor(sampled_rows, dtype=torch.long, device=device)
        sub = logits if rows is None else logits.index_select(0, rows)  # (b, V)
        temps = [samplers[i].params.temperature for i in sampled_rows]
        if any(t != 1.0 for t in temps):
            sub = sub / torch.tensor(temps, dtype=sub.dtype, device=device).unsqueeze(1)
        top_k = [samplers[i].params.top_k for i in sampled_rows]
        top_p = [samplers[i].params.top_p for i in sampled_rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            sub = filter_top_k_top_p(
                sub,
                torch.tensor(top_k, dtype=torch.long, device=device),
                torch.tensor(top_p, dtype=sub.dtype, device=device),
            )
        log_race = torch.stack([samplers[i].log_race() for i in sampled_rows]).to(sub.dtype)  # (b, V)
        # Exponential race: argmax(log p - log E) is a sample from p, and log p differs from the scaled
        # logits by one constant per row (its log-normaliser), which the argmax does not see; -inf entries
        # (filtered) never win.
        choice = (sub - log_race).argmax(dim=-1)  # (b,)
        tokens = choice if rows is None else logits.argmax(dim=-1).index_copy(0, rows, choice)

    token_list = tokens.tolist()  # the one host sync of the step
    want = [s.params.logprobs for s in samplers]
    out_logprobs: list[TokenLogprob | None] = [None] * batch
    if any(n > 0 for n in want):
        out_logprobs = _logprobs(raw_logits, token_list, want)
    return SampleOutput(tokens=token_list, logprobs=out_logprobs)


def _logprobs(raw_logits: torch.Tensor, tokens: list[int], want: list[int]) -> list[TokenLogprob | None]:
    """Log-probabilities under the model's raw distribution (before penalty, temperature and filtering)."""
    lp = raw_logits.log_softmax(dim=-1)  # (B, V)
    top_n = max(want)
    top_vals, top_idx = lp.topk(top_n, dim=-1)  # (B, N)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
    top_vals_l, top_idx_l = top_vals.tolist(), top_idx.tolist()
    out: list[TokenLogprob | None] = []
    for i, n in enumerate(want):
        if n <= 0:
            out.append(None)
            continue
        top = tuple(zip(top_idx_l[i][:n], top_vals_l[i][:n], strict=True))
        out.append(TokenLogprob(token_id=tokens[i], logprob=chosen[i], top=top))
    return out
