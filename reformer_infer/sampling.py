"""Next-token sampling on the device, inside the decode step.

Every request holds a *row* of a `SlotSampler` while it generates: its parameters (temperature, top-k,
top-p, repetition penalty, seed), the ids it has seen (for the penalty), a draw counter and its next input
id live in preallocated device tensors, written once when the request joins (one upload). A step samples
every row of its batch with tensor math on those per-row values (no Python branching on them: greedy rows,
temperature 0, are picked by `torch.where`), writes each sampled id back into its row (the next step's
input: nothing is uploaded per step) and returns the ids (and logprobs) packed in one tensor, which the host
downloads once (`download`: pinned memory, asynchronous, on CUDA).

Order (as Hugging Face applies it): repetition penalty -> temperature -> top-k -> top-p -> draw.
Logprobs are those of the model's raw distribution (before penalty, temperature and filtering).

The draw is an exponential race, argmax(log p - log E), E ~ Exp(1) iid per vocabulary entry: it samples
exactly from p. E = -log U with U from a counter-based hash (`uniforms`): U for vocabulary entry v of a
request's i-th generated token is a fixed function of (seed, i, v), so a seeded request yields the same
tokens alone or batched with others, and no per-request generator state exists (a captured step replays
it). The hash is integer tensor math (xor-shift-multiply rounds on 32-bit values held in int64, each product
below 2^63), so the stream of a seed is the same on every device for the same logits; logits differ between
a CPU and a GPU (and between dtypes), so their sampled streams differ (docs/semantics.md).
"""

from __future__ import annotations

import copy
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from reformer_infer.pool import upload
from reformer_infer.requests import SamplingParams, TokenLogprob

# Top log-probabilities computed in a step that asks for any (the most a request may ask for, see
# `SamplingParams.validate`); the host keeps each row's own N of them.
TOP_LOGPROBS = 20

_M32 = 0xFFFFFFFF
# Odd multipliers below 2^31 (a product with a 32-bit value stays below 2^63: no int64 overflow anywhere).
# The first is lowbias32's (Wellons, "Hash Prospector"); the others are odd fractional digits of sqrt(2)
# and sqrt(3), rounded.
_MUL = (0x7FEB352D, 0x6A09E667, 0x3C6EF373)
_GOLDEN = 0x1E3779B9  # added per round, so a zero key does not hash to zero


def _mix32(x: Tensor, mul: int = _MUL[0], mul2: int = _MUL[1]) -> Tensor:
    """A bijective 32-bit mix (xor-shift-multiply, as lowbias32) of int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * mul) & _M32
    x = x ^ (x >> 15)
    x = (x * mul2) & _M32
    return x ^ (x >> 16)


def row_keys(seed_lo: Tensor, seed_hi: Tensor, counter: Tensor) -> tuple[Tensor, Tensor]:
    """Two 32-bit keys of a row's draw: (seed, counter) -> (k1, k2); int64 tensors of any shape."""
    c = _mix32((counter & _M32) + _GOLDEN, _MUL[2], _MUL[0])
    k1 = _mix32(seed_lo ^ c)
    k2 = _mix32(((seed_hi ^ k1) + _GOLDEN) & _M32, _MUL[1], _MUL[2])
    return k1, k2


def uniforms(seed_lo: Tensor, seed_hi: Tensor, counter: Tensor, vocab: Tensor) -> Tensor:
    """U(0, 1) float32 (n, V) for rows of keys (n, 1) and vocabulary indices `vocab` (1, V) int64.

    U = (2m + 1) / 2^24 for m the top 23 bits of hash(seed, counter, v): strictly inside (0, 1), exactly
    representable, so -log U is finite and positive."""
    k1, k2 = row_keys(seed_lo, seed_hi, counter)
    x = _mix32((vocab + k1) & _M32)  # (n, V)
    x = _mix32(x ^ k2, _MUL[2], _MUL[1])
    return ((x >> 9) * 2 + 1).float() * (1.0 / (1 << 24))


def split_seed(seed: int) -> tuple[int, int]:
    """A 63-bit seed as the (low, high) 32-bit halves the hash takes."""
    return seed & _M32, (seed >> 32) & _M32


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """CTRL-style penalty (Keskar et al. 2019, as in HF): seen logits > 0 are divided, < 0 multiplied.

    logits (B, V) float, seen (B, V) bool, penalty (B, 1).
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
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


@dataclass(frozen=True)
class StepMode:
    """What a step's sampling computes (known on the host from its rows' parameters; one captured step per
    mode): `full` when some row samples or has a repetition penalty (else an argmax is the whole of it),
    `top_n` top logprobs when some row asks for any (else none)."""

    full: bool
    top_n: int


@dataclass
class SampleOutput:
    tokens: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # per row, None where the request asked for none


class SlotSampler:
    """Per-row sampling state on the device for up to `rows` requests (see the module docstring).

    Rows are taken when a request samples its first token and given back when it finishes; a row given back
    is rewritten only by the next `join` (host side, between steps). `pad_row` is a row no request owns, for
    the extra rows of a padded batch (greedy, no penalty). The tensors grow (doubling) only when every row
    is taken; `generation` then changes (a captured step must be recorded again).
    """

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.generation = 0
        self.S = 0
        self._free: list[int] = []
        self._pad: int | None = None
        self._lock = threading.Lock()
        # host mirrors of what a step's mode depends on
        self._full: list[bool] = []
        self._top_n: list[int] = []
        self._step_key: tuple[int, ...] = ()
        self._step_rows: Tensor | None = None
        self.vocab = torch.arange(self.vocab_size, device=self.device).unsqueeze(0)  # (1, V)
        self._alloc(max(1, rows))

    @torch.inference_mode(False)  # normal tensors: updated in place in and out of inference mode
    def _alloc(self, S: int) -> None:
        dev, V = self.device, self.vocab_size
        new = {
            # temperature, top_p, repetition penalty
            "fparams": torch.tensor([[0.0, 1.0, 1.0]], device=dev).repeat(S, 1),  # (S, 3) float32
            # top_k, seed low 32 bits, seed high 32 bits, tokens drawn so far (the hash's counter)
            "iparams": torch.zeros(S, 4, dtype=torch.long, device=dev),  # (S, 4)
            "seen": torch.zeros(S, V, dtype=torch.bool, device=dev),  # (S, V) ids of prompt and output
            "next_ids": torch.zeros(S, dtype=torch.long, device=dev),  # (S,) the next step's input
        }
        for name, t in new.items():
            if self.S:
                t[: self.S] = getattr(self, name)
            setattr(self, name, t)
        self._full += [False] * (S - self.S)
        self._top_n += [0] * (S - self.S)
        self._free = sorted(self._free + list(range(self.S, S)), reverse=True)
        self.S = S
        self.generation += 1

    STATE = ("fparams", "iparams", "seen", "next_ids", "vocab")  # what a step reads and writes

    def buffers(self) -> tuple[Tensor, ...]:
        """The tensors a step reads and writes, in the order of `STATE` (a captured step keeps their addresses)."""
        return tuple(getattr(self, name) for name in self.STATE)

    def with_tensors(self, *tensors: Tensor) -> SlotSampler:
        """This sampler's rows and modes over other state tensors (`STATE`'s, same layout): a recorded step
        takes them as explicit inputs (`step_graphs.StepModule`)."""
        view = copy.copy(self)
        for name, t in zip(self.STATE, tensors, strict=True):
            setattr(view, name, t)
        return view

    # ---- rows (host side, between steps) --------------------------------------------------------
    def take_row(self) -> int:
        with self._lock:
            if not self._free:
                self._alloc(2 * self.S)
            return self._free.pop()  # the lowest free row

    def free_row(self, row: int) -> None:
        with self._lock:
            if row == self._pad or row in self._free:
                raise ValueError(f"row {row} is not taken")
            self._free.append(row)
            self._free.sort(reverse=True)

    def pad_row(self) -> int:
        if self._pad is None:
            self._pad = self.take_row()  # zero-initialised: greedy, no penalty, no logprobs
        return self._pad

    def join(self, row: int, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        """Write a request's parameters into `row` (one upload): seed (unseeded: one from the OS), counter
        0, and the prompt's ids as seen when it has a repetition penalty."""
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        lo, hi = split_seed(seed)
        penalised = params.repetition_penalty != 1.0
        floats = torch.tensor([params.temperature, params.top_p, params.repetition_penalty], dtype=torch.float32)
        # one host tensor: the float parameters' bits, the integer ones, then the prompt ids (if penalised)
        head = [params.top_k, lo, hi, 0] + floats.view(torch.int32).tolist()
        dev = upload(head + (list(prompt_ids) if penalised else []), self.device)
        self.iparams[row] = dev[:4]
        self.fparams[row] = dev[4:7].to(torch.int32).view(torch.float32)
        self.seen[row] = False
        if penalised:
            self.seen[row].index_fill_(0, dev[7:], True)
        self._full[row] = params.temperature != 0.0 or penalised
        self._top_n[row] = params.logprobs

    def set_next(self, row: int, token: int) -> None:
        """Set a row's next input id instead of its last sample (a prompt token fed after a context:
        `Engine._feed_next`; callers that drive steps themselves)."""
        self.next_ids[row] = token

    def rows_tensor(self, rows: list[int], out: Tensor | None = None) -> Tensor:
        """The rows of a step as a device tensor: uploaded only when they change (or copied into `out`, a
        captured step's static buffer whose extra rows take the pad row)."""
        key = tuple(rows)
        if out is not None:
            if key != self._step_key or self._step_rows is not out:
                full = rows + [self.pad_row()] * (out.numel() - len(rows))
                out.copy_(upload(full, self.device))
                self._step_key, self._step_rows = key, out
            return out
        if key != self._step_key or self._step_rows is None or self._step_rows.numel() != len(rows):
            self._step_key, self._step_rows = key, upload(rows, self.device)
        return self._step_rows

    def mode(self, rows: Sequence[int]) -> StepMode:
        full = any(self._full[r] for r in rows)
        top_n = min(TOP_LOGPROBS, self.vocab_size) if any(self._top_n[r] for r in rows) else 0
        return StepMode(full, top_n)

    def wants(self, rows: Sequence[int]) -> list[int]:
        return [self._top_n[r] for r in rows]

    # ---- the device part (inside a step) ---------------------------------------------------------
    def next_input(self, rows: Tensor) -> Tensor:
        """(n,) the rows' next input ids (what their last step sampled)."""
        return self.next_ids.index_select(0, rows)

    def sample(self, logits: Tensor, rows: Tensor, mode: StepMode) -> Tensor:
        """Sample one token per row of `logits` (n, V) with the parameters of `rows` (n,); write the ids
        back (next input, seen, counter) and return them packed (`unpack`): (n, 1) int64, or with logprobs
        (n, 2 + 2N): id, top-N ids, then float32 bits of the id's logprob and of the top-N logprobs."""
        raw = logits.float()
        if mode.full:
            fp = self.fparams.index_select(0, rows)  # (n, 3)
            ip = self.iparams.index_select(0, rows)  # (n, 4)
            temperature, top_p, penalty = fp[:, 0:1], fp[:, 1], fp[:, 2:3]
            x = apply_repetition_penalty(raw, self.seen.index_select(0, rows), penalty)
            greedy = x.argmax(dim=-1)  # (n,)
            # greedy rows divide by 1 (their draw is discarded below): no Python branch on a row's values
            hot = temperature > 0  # (n, 1)
            x = x / torch.where(hot, temperature, torch.ones_like(temperature))
            x = filter_top_k_top_p(x, ip[:, 0], top_p)
            u = uniforms(ip[:, 1:2], ip[:, 2:3], ip[:, 3:4], self.vocab)  # (n, V)
            # Exponential race: argmax(log p - log E), E = -log U, is a sample from p; log p differs from the
            # filtered logits by one constant per row (its normaliser), which the argmax does not see; -inf
            # entries (filtered out) never win.
            drawn = (x - u.log().neg().log()).argmax(dim=-1)  # (n,)
            ids = torch.where(hot.squeeze(1), drawn, greedy)
            self.seen.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.bool))
            self.iparams[:, 3].index_add_(0, rows, torch.ones_like(rows))
        else:
            ids = raw.argmax(dim=-1)  # (n,)
        self.next_ids.index_copy_(0, rows, ids)
        if not mode.top_n:
            return ids.unsqueeze(1)
        lp = raw.log_softmax(dim=-1)  # (n, V)
        top_vals, top_idx = lp.topk(mode.top_n, dim=-1)  # (n, N)
        chosen = lp.gather(1, ids.unsqueeze(1))  # (n, 1)
        bits = torch.cat([chosen, top_vals], dim=1).view(torch.int32).long()  # (n, 1 + N)
        return torch.cat([ids.unsqueeze(1), top_idx, bits], dim=1)  # (n, 2 + 2N)

    def sample_now(self, logits: Tensor, rows: list[int]) -> SampleOutput:
        """Sample `rows` from `logits` (n, V) outside a decode step (a prefill's first token, `generate`):
        the same device function, then the download."""
        packed = self.sample(logits, upload(rows, self.device), self.mode(rows))
        return unpack(download(packed), self.wants(rows))


def download(packed: Tensor) -> Tensor:
    """The step's packed output on the host: on CUDA one asynchronous copy into pinned memory and a wait
    for it (the step's one sync); on a CPU the tensor itself."""
    if packed.device.type != "cuda":
        return packed
    host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host


def unpack(host: Tensor, wants: Sequence[int]) -> SampleOutput:
    """Tokens and logprobs from a step's downloaded output (`SlotSampler.sample`); `wants` is each row's
    number of top logprobs (0: none)."""
    rows = host.tolist()  # a host tensor: no device sync
    tokens = [r[0] for r in rows]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if host.shape[1] > 1:
        n = (host.shape[1] - 2) // 2
        floats = host[:, 1 + n:].to(torch.int32).view(torch.float32).tolist()  # (B, 1 + N)
        for b, (row, want) in enumerate(zip(rows, wants, strict=True)):
            if want > 0:
                top = tuple(zip(row[1 : 1 + want], floats[b][1 : 1 + want], strict=True))
                out[b] = TokenLogprob(token_id=tokens[b], logprob=floats[b][0], top=top)
    return SampleOutput(tokens=tokens, logprobs=out)
