"""The Reformer language model for inference (Kitaev, Kaiser, Levskaya, ICLR 2020), bottom-up.

Computes what Hugging Face `ReformerModelWithLMHead` computes (its state-dict names are kept, minus the
`reformer.` prefix) with three differences of form, not of result:
  * LSH rotations are fixed buffers (`rotations`), never re-drawn: hashing is state, not a side effect.
  * Prefill runs in bounded memory: every layer works on slices of positions (attention on groups of
    chunks, all hash rounds accumulated online with logsumexp weights), never all score blocks at once;
    at inference each slice's output is added into the two residual streams in place, so beyond the
    streams and the cache a layer's largest buffer is an LSH layer's (T, H*D) round accumulator.
  * Decode keeps an explicit per-sequence cache (keys/values, bucket bookkeeping for LSH layers; a ring of
    the attendable window for local layers) so a step's work does not grow with the context.

Dimension letters used in shape comments:
  B batch, T tokens, H heads, D head dim, R hash rounds, K buckets, C chunk, W window (C x chunks seen),
  G chunks in a group, E hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import ReformerCache, SequenceCache
from .config import ReformerConfig
from .pool import DecodePool, StepBatch, StepPlan, StepUpdates, cache_bytes, head_rows
from .step_graphs import StepGraphs

# Mask values of the reference implementation (fp32 / fp16). They are finite on purpose: a query whose
# window holds nothing visible but itself attends to itself (self mask -1e5 beats mask -1e9).
MASK_VALUE = {torch.float32: -1e9, torch.float16: -1e4, torch.bfloat16: -1e9}
SELF_MASK_VALUE = {torch.float32: -1e5, torch.float16: -1e3, torch.bfloat16: -1e5}
# Below this, fp32 exp underflows (to a denormal or 0), and torch's CPU exp takes a slow path: 40-130x
# slower per element than for ordinary inputs (measured on torch 2.13). Masked scores sit far below it.
EXP_FLOOR = -87.0


def exp_shifted(x: Tensor) -> Tensor:
    """exp of scores already shifted to <= 0 (x - row max), with every score below EXP_FLOOR giving exactly
    0: masked keys keep their zero weight, and the arithmetic never reaches the slow underflow path.
    In place at inference (x is a temporary); out of place when autograd records."""
    low = x < EXP_FLOOR
    if torch.is_grad_enabled():
        return torch.exp(x.clamp(min=EXP_FLOOR)).masked_fill(low, 0.0)
    return x.clamp_(min=EXP_FLOOR).exp_().masked_fill_(low, 0.0)


# Upper bound on the elements of one group's score block (B*H*G*C*W): bounds prefill memory.
DEFAULT_SCORE_ELEMENTS = 1 << 23
# Positions per slice of the position-wise work (layer norms, projections, feed-forward) of an inference
# prefill: at 64K x 4096 the feed-forward's intermediate alone would be 1 GiB in one piece.
MEMORY_SLICE = 4096

ACT = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}

Work = Generator[int, None, None]  # a resumable unit of prefill; yields positions done
Emit = Callable[[int, int, Tensor], None]  # takes attention output rows [s0, s1): (B, s1 - s0, H*D)


def _drain(gen: Generator[int, None, Tensor | None]) -> Tensor | None:
    """Run a work generator to completion and return its value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def len_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Length normalisation of shared-QK keys: x / sqrt(mean(x^2) + eps)."""
    return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------
class AxialPositionEmbeddings(nn.Module):
    """Position p = i * n2 + j gets concat(E1[i], E2[j]) (Reformer paper, section 'Axial positional encodings')."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        n1, n2 = config.axial_pos_shape
        d1, d2 = config.axial_pos_embds_dim
        self.n2 = n2
        # Shapes follow transformers so checkpoints load unchanged: (n1, 1, d1) and (1, n2, d2).
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(n1, 1, d1)), nn.Parameter(torch.zeros(1, n2, d2))])

    def forward(self, positions: Tensor) -> Tensor:  # positions (...,) int64 -> (..., E)
        e1 = self.weights[0][:, 0, :][positions // self.n2]
        e2 = self.weights[1][0][positions % self.n2]
        return torch.cat([e1, e2], dim=-1)


class PositionEmbeddings(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, positions: Tensor) -> Tensor:
        return self.embedding(positions)


class Embeddings(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (
            AxialPositionEmbeddings(config) if config.axial_pos_embds else PositionEmbeddings(config)
        )

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)


# ---------------------------------------------------------------------------------------------------
# Attention helpers shared by both kinds
# ---------------------------------------------------------------------------------------------------
def _attend_window(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, self_mask: bool, causal: bool = True
) -> tuple[Tensor, Tensor]:
    """Masked softmax attention of query rows over their own key windows.

    q (..., Q, D), k/v (..., W, D), q_pos (..., Q), k_pos (..., W) -> out (..., Q, D), lse (..., Q).
    Keys at positions after the query are masked (causal); with `self_mask` a query's own position gets
    the self-mask value (it is seen only when nothing else is).
    """
    # scores, softmax and log-normaliser in fp32 whatever the storage dtype (a no-op for fp32 inputs)
    e, s, m = _window_softmax(torch.matmul(q, k.transpose(-1, -2)).float(), q_pos, k_pos, self_mask, causal)
    out = (torch.matmul(e.to(v.dtype), v) / s).to(q.dtype)
    return out, (m + torch.log(s)).squeeze(-1)


def _window_softmax(dots: Tensor, q_pos: Tensor | None, k_pos: Tensor | None, self_mask: bool, causal: bool,
                    is_self: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The masks of `_attend_window` on scores dots (..., Q, W), and a softmax with its log-normaliser in
    one exp pass: returns e, s, m with probs = e / s and lse = m + log s (s and m (..., Q, 1)). `is_self`
    (broadcastable to dots), when given, says where a key is the query's own (instead of comparing positions)."""
    if causal or (self_mask and is_self is None):
        qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    if causal:
        dots = dots.masked_fill(kp > qp, MASK_VALUE.get(dots.dtype, -1e9))
    if self_mask:
        dots = dots.masked_fill(kp == qp if is_self is None else is_self, SELF_MASK_VALUE.get(dots.dtype, -1e5))
    m = dots.amax(dim=-1, keepdim=True).detach()
    e = exp_shifted(dots - m if torch.is_grad_enabled() else dots.sub_(m))
    return e, e.sum(dim=-1, keepdim=True), m


def _bag_offsets(memo: dict, n: int, L: int, device: torch.device) -> Tensor:
    """Offsets (n,) of n bags of L rows each (memoised in `memo`, a step's: n is the same for all its layers)."""
    key = ("bag offsets", L)
    if key not in memo:
        memo[key] = torch.arange(0, n * L, L, device=device)
    return memo[key]


def _table_dots(q: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """q (n, D), table (N, D), rows (n, L) -> (n, L): q[b] . table[rows[b, l]]. The rows are gathered into
    one (n, L, D) block and scored by one (n, 1, D) x (n, D, L) bmm (the other orientation is ~7x slower on
    CPU); the gather keeps many loads in flight where a per-row dot would wait on each."""
    n, L = rows.shape
    keys = table.index_select(0, rows.reshape(-1)).view(n, L, -1)
    return torch.bmm(q.unsqueeze(1), keys.transpose(1, 2)).view(n, L)


def _table_sum(w: Tensor, table: Tensor, rows: Tensor, memo: dict) -> Tensor:
    """w (n, L), table (N, D), rows (n, L) -> (n, D): sum over l of w[b, l] * table[rows[b, l]], each row read
    where it lies (embedding_bag's weighted sum)."""
    n, L = rows.shape
    offsets = _bag_offsets(memo, n, L, w.device)
    return F.embedding_bag(rows.reshape(-1), table, offsets, mode="sum", per_sample_weights=w.reshape(-1))


def _window_chunk_index(num_chunks: int, first: int, last: int, before: int, after: int, device) -> Tensor:
    """Chunk ids of the key window of query chunks [first, last): (G, 1 + before + after), wrapping around
    the flattened chunk axis as transformers' `_look_adjacent` does."""
    ids = torch.arange(first, last, device=device).unsqueeze(1)
    offs = torch.arange(-before, after + 1, device=device).unsqueeze(0)
    # transformers lists the chunks in order -before..after
    return (ids + offs) % num_chunks


def feed_forward_weight(config: ReformerConfig) -> int:
    """Prefill work units a position of a feed-forward pass counts for: ceil(F / E), its two E x F GEMMs
    against the E x (H*D)-sized projections of the other passes. Unweighted, a 4096-position unit of the
    small preset's feed-forward (F = 2E) took 25 ms against 11 ms for the other passes' units, and a decode
    step beside a long prefill waited for it."""
    return max(1, -(-config.feed_forward_size // config.hidden_size))


def row_capacities(capacity: int | Sequence[int] | None, B: int, T: int) -> list[int]:
    """Cache capacity (positions) of each of B prefilled rows of T tokens: at least T."""
    caps = [capacity or 0] * B if capacity is None or isinstance(capacity, int) else list(capacity)
    if len(caps) != B:
        raise ValueError(f"{len(caps)} capacities for {B} rows")
    return [max(T, c) for c in caps]


def _slices(T: int, step: int | None) -> list[tuple[int, int]]:
    """[s0, s1) ranges covering T positions, `step` at a time (one range when step is None)."""
    if step is None or step >= T:
        return [(0, T)]
    return [(s0, min(s0 + step, T)) for s0 in range(0, T, step)]


def _emit_slices(out: Tensor, emit: Emit, step: int | None) -> Work:
    """Hand attention output rows (B, T, H*D) to `emit` `step` positions at a time."""
    for s0, s1 in _slices(out.shape[1], step):
        emit(s0, s1, out[:, s0:s1])
        yield s1 - s0


def _group_size(config_chunk: int, window: int, batch_heads: int, budget: int) -> int:
    return max(1, budget // max(1, batch_heads * config_chunk * window))


@dataclass(frozen=True)
class PrefillTarget:
    """Where a prefill writes its sequences' decode state: their pool, and each position's pool row (B, T);
    `layer` is the index of the layer being computed."""

    pool: DecodePool
    seqs: list[SequenceCache]
    rows: Tensor
    layer: int = 0


class _Rows:
    """One LSH layer's per-position rows (raw shared-QK, later normalised keys; values) during a forward:
    in the decode pool's (H * N * P, D) tables when the forward builds a cache, else in private tables of
    the same layout (H * B * T rows). Written and gathered by row index either way: one code path.
    The pool's tables are looked up at every use, since the pool may grow between units of a prefill."""

    def __init__(self, target: PrefillTarget | None, B: int, T: int, H: int, D: int, like: Tensor) -> None:
        self.target, self.H, self.D = target, H, D
        if target is None:
            self._tables = (like.new_empty(H * B * T, D), like.new_empty(H * B * T, D))
            self.prow = torch.arange(B * T, device=like.device).view(B, T)
        else:
            self.prow = target.rows

    def tables(self) -> tuple[Tensor, Tensor, int]:
        """Keys and values tables and the rows per head."""
        if self.target is None:
            return (*self._tables, self.prow.numel())
        pool = self.target.pool
        return (*pool.lsh_tables(pool.lsh_index[self.target.layer]), pool.N * pool.P)

    def write(self, s0: int, s1: int, k: Tensor, v: Tensor) -> None:
        """Rows (B, H, s1 - s0, D) of positions [s0, s1)."""
        kt, vt, per_head = self.tables()
        idx = head_rows(self.prow[:, None, s0:s1], self.H, per_head).reshape(-1)
        kt.index_copy_(0, idx, k.reshape(-1, self.D))
        vt.index_copy_(0, idx, v.reshape(-1, self.D))

    def _index(self, pos: Tensor, per_head: int) -> Tensor:
        B = pos.shape[0]
        return head_rows(self.prow.gather(1, pos.reshape(B, -1)).view(pos.shape), self.H, per_head).reshape(-1)

    def read(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, n, D) at positions pos (B, H, n)."""
        kt, vt, per_head = self.tables()
        idx = self._index(pos, per_head)
        return kt.index_select(0, idx).view(*pos.shape, self.D), vt.index_select(0, idx).view(*pos.shape, self.D)

    def read_keys(self, pos: Tensor) -> Tensor:
        kt, _, per_head = self.tables()
        return kt.index_select(0, self._index(pos, per_head)).view(*pos.shape, self.D)

    def normalise_keys(self, s0: int, s1: int, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply fn to the key rows of positions [s0, s1), in place."""
        kt, _, per_head = self.tables()
        idx = head_rows(self.prow[:, None, s0:s1], self.H, per_head).reshape(-1)
        kt.index_copy_(0, idx, fn(kt.index_select(0, idx)))


# ---------------------------------------------------------------------------------------------------
# LSH self-attention (shared QK)
# ---------------------------------------------------------------------------------------------------
class LSHSelfAttention(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.config = config
        self.H, self.D = config.num_attention_heads, config.attention_head_size
        self.C = config.lsh_attn_chunk_length
        self.before, self.after = config.lsh_num_chunks_before, config.lsh_num_chunks_after
        self.query_key = nn.Linear(config.hidden_size, self.H * self.D, bias=False)
        self.value = nn.Linear(config.hidden_size, self.H * self.D, bias=False)
        # Evaluation switch for the paper's full-attention baseline (same weights, dense causal shared-QK).
        self.full_attention = False
        # Random rotations (H, D, R, rotation_size/2): fixed state, saved with the weights.
        self.register_buffer("rotations", torch.zeros(self.H, self.D, config.num_hashes, config.rotation_size // 2))

    @property
    def num_hashes(self) -> int:
        return self.rotations.shape[2]

    def hash(self, qk: Tensor) -> Tensor:
        """Bucket ids (no round offsets) of shared-QK vectors: qk (..., H, T, D) -> (..., H, R, T) int64.

        Angular LSH: bucket = argmax([xR, -xR]); factorised buckets hash each factor on its own slice of
        the rotated coordinates and combine mixed-radix, first factor least significant (as transformers).
        """
        rot = torch.einsum("...htd,hdrk->...hrtk", qk.float(), self.rotations.float())
        buckets, offset, radix = None, 0, 1
        for factor in self.config.bucket_factors:
            part = rot[..., offset : offset + factor // 2]
            offset += factor // 2
            # argmax over [x, -x] without materialising it; ties go to the first half, as argmax does
            hi, hi_idx = part.max(dim=-1)
            lo, lo_idx = part.min(dim=-1)
            b = torch.where(hi >= -lo, hi_idx, lo_idx + factor // 2)
            buckets = b if buckets is None else buckets + radix * b
            radix *= factor
        return buckets

    # ---- prefill / full forward --------------------------------------------------------------
    def _project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Shared-QK and value rows (B, H, t, D) of layer-normed x (B, t, E)."""
        B, t, _ = x.shape
        return (self.query_key(x).view(B, t, self.H, self.D).transpose(1, 2),
                self.value(x).view(B, t, self.H, self.D).transpose(1, 2))

    def forward_work(
        self,
        h: Tensor,
        layer_norm: nn.Module,
        n_padded: int,
        target: PrefillTarget | None,
        score_budget: int,
        emit: Emit,
        step: int | None = None,
    ) -> Work:
        """Attention over LN(h) (B, T, E); hands its output rows (B, t, H*D) to `emit(s0, s1, o)` slice by
        slice (the caller projects them straight into the residual stream).

        `n_padded` is the length transformers would pad to; pads sort last in every hash round and are
        masked, so only the chunk layout depends on it. With a `target`, the layer's decode state (keys,
        values, bucket order) is written into its pool as it goes. Every pass over the sequence runs `step`
        positions (or one head's sort) at a time and yields the positions it covered, so a resumable
        prefill never runs a whole-sequence op in one unit.
        """
        B, T, _ = h.shape
        H, D, C = self.H, self.D, self.C
        hashed = not (n_padded <= C or self.full_attention)
        dev = h.device
        if not hashed:
            # Short sequences: plain causal attention (as transformers), no buckets. `full_attention` uses
            # the same path at any length (the paper's full-attention baseline; evaluation only), in blocks
            # of queries so the score block stays bounded.
            qk, k, v = (h.new_empty(B, H, T, D) for _ in range(3))
            for s0, s1 in _slices(T, step):
                qk_s, v[:, :, s0:s1] = self._project(layer_norm(h[:, s0:s1]))
                qk[:, :, s0:s1] = qk_s
                k[:, :, s0:s1] = len_norm(qk_s) / math.sqrt(D)
                yield s1 - s0
            if target is not None:
                _Rows(target, B, T, H, D, h).write(0, T, k, v)
            pos = torch.arange(T, device=dev)
            out = qk.new_empty(B, T, H, D)
            G = max(1, score_budget // max(1, B * H * T))
            for q0 in range(0, T, G):
                q1 = min(q0 + G, T)
                o, _ = _attend_window(qk[:, :, q0:q1], k[:, :, :q1], v[:, :, :q1], pos[q0:q1], pos[:q1],
                                      self_mask=True)
                out[:, q0:q1] = o.transpose(1, 2)
                yield q1 - q0
            yield from _emit_slices(out.view(B, T, H * D), emit, step)
            return

        # Raw shared-QK rows and values are written where the decode state keeps them (the pool's pages;
        # private tables of the same layout without a target): attention normalises the key rows it
        # gathers, and the stored rows are normalised in place once every round is done.
        rows = _Rows(target, B, T, H, D, h)
        buckets = torch.empty(B, H, self.num_hashes, T, dtype=torch.long, device=dev)
        # The rounds' outputs are accumulated here (laid out (B, T + 1, H, D) so its slices are the output
        # rows; row T takes the pads). Attention writes it in sorted order, i.e. all over the buffer from
        # its first group on: touched first there, its fresh pages (32 MB at 64K on the small preset) would
        # all fault in during one unit. Zeroing it slice by slice with the projections spreads that out.
        acc = h.new_empty(B, T + 1, H, D)
        lse_acc = h.new_empty(B, T + 1, H, dtype=torch.float32)  # log-normalisers in fp32 whatever the dtype
        for s0, s1 in _slices(T, step):
            end = T + 1 if s1 == T else s1  # the last slice takes the pads' row too
            acc[:, s0:end].zero_()
            lse_acc[:, s0:end].zero_()
            qk_s, v_s = self._project(layer_norm(h[:, s0:s1]))
            rows.write(s0, s1, qk_s, v_s)
            buckets[..., s0:s1] = self.hash(qk_s)
            yield s1 - s0
        pos = torch.arange(T, device=dev)
        R = self.num_hashes
        # positions in (bucket, position) order, one head at a time: sorting every head and round at once
        # would be one long unit that an engine cannot interleave decode steps with
        order = torch.empty(B, H, R, T, dtype=torch.long, device=dev)
        for hh in range(H):
            order[:, hh] = torch.argsort(buckets[:, hh] * T + pos, dim=-1)  # (B, R, T)
            yield (hh + 1) * T // H - hh * T // H
        # Pads: row index T, placed after every real position of the round. They take a position beyond
        # every real token, so the causal mask hides them from all real queries; their vectors are never
        # seen (gathered from row T-1) and their outputs land on row T, which is dropped.
        pad = n_padded - T
        sorted_rows = order
        if pad:
            sorted_rows = torch.cat([order, order.new_full((B, H, R, pad), T)], dim=-1)  # (B, H, R, Tp)
        pos_p = torch.cat([pos, pos.new_tensor([T + n_padded])])
        flat = sorted_rows.reshape(B, H, R * n_padded)  # sorted slot -> row, rounds flattened
        M = R * n_padded // C  # chunks over all rounds
        W = C * (1 + self.before + self.after)
        G = _group_size(C, W, B * H, score_budget)
        if step is not None:
            G = min(G, max(1, step // C))
        # Rounds are combined online, group by group: acc = sum_r out_r * exp(lse_r - logsumexp_r lse_r),
        # merged into the rows a group's queries came from (no transposed copy of the output).
        acc_rows, lse_rows = acc.view(-1, D), lse_acc.view(-1)
        # row of (b, head, position) in the flattened accumulator
        base = (torch.arange(B, device=dev).view(B, 1, 1) * (T + 1) * H + torch.arange(H, device=dev).view(1, H, 1))
        chunks_per_round = n_padded // C
        for r in range(R):
            for m0 in range(r * chunks_per_round, (r + 1) * chunks_per_round, G):
                m1 = min(m0 + G, (r + 1) * chunks_per_round)
                q_rows = flat[:, :, m0 * C : m1 * C]  # (B, H, G*C)
                win = _window_chunk_index(M, m0, m1, self.before, self.after, dev)  # (G, n)
                k_slots = (win.unsqueeze(-1) * C + torch.arange(C, device=dev)).reshape(-1)  # (G*W,)
                k_rows = flat[:, :, k_slots]  # (B, H, G*W)
                g = m1 - m0
                q = rows.read_keys(q_rows.clamp(max=T - 1)).view(B, H, g, C, D)
                kk, vv = rows.read(k_rows.clamp(max=T - 1))
                kk = (len_norm(kk) / math.sqrt(D)).view(B, H, g, W, D)
                o, lse = _attend_window(
                    q, kk, vv.view(B, H, g, W, D), pos_p[q_rows].view(B, H, g, C), pos_p[k_rows].view(B, H, g, W),
                    self_mask=True,
                )
                idx = (q_rows * H + base).reshape(-1)  # accumulator rows (pads all land on row T)
                o, lse = o.reshape(-1, D), lse.reshape(-1)
                if r > 0:
                    lse_prev = lse_rows.index_select(0, idx)
                    new_lse = torch.logaddexp(lse_prev, lse)
                    w_acc = torch.exp(lse_prev - new_lse).unsqueeze(-1)
                    w_r = torch.exp(lse - new_lse).unsqueeze(-1)
                    prev = acc_rows.index_select(0, idx)
                    if torch.is_grad_enabled():
                        o = prev * w_acc + o * w_r
                    else:  # in place: no group-sized temporaries beyond the gathered rows
                        o = prev.mul_(w_acc).add_(o.mul_(w_r))
                    lse = new_lse
                acc_rows.index_copy_(0, idx, o)
                lse_rows.index_copy_(0, idx, lse)
                yield g * C
        if target is not None:
            # the decode state: the stored shared-QK rows become normalised keys, and the bucket order
            for s0, s1 in _slices(T, step):
                rows.normalise_keys(s0, s1, lambda k: len_norm(k) / math.sqrt(D))
                yield s1 - s0
            target.pool.set_order(target.pool.lsh_index[target.layer], [s.slot for s in target.seqs], order, buckets)
        yield from _emit_slices(acc[:, :T].view(B, T, H * D), emit, step)

    # ---- cached decode -----------------------------------------------------------------------
    def decode_projections(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Shared query-keys and values (B, H, D) of decode rows x (B, E) layer-normed."""
        B = x.shape[0]
        return self.query_key(x).view(B, self.H, self.D), self.value(x).view(B, self.H, self.D)

    def decode(self, x: Tensor, pool: DecodePool, j: int, batch: StepBatch, updates: StepUpdates,
               proj: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """One new token per sequence: x (B, E) layer-normed -> (B, H*D). Reads the pool, writes nothing: the
        new keys/values and delta go into `updates` (`DecodePool.apply_step` writes them after the step).
        `proj`: x's `decode_projections` when already computed (a pass over several tokens does them at once).

        Hashed sequences attend to their window in the (bucket, position)-sorted order of every round, the
        rounds combined by their logsumexp weights; sequences shorter than one chunk (and every sequence
        under the full-attention switch) attend densely to every position so far. Both are computed for
        every row when the step has a dense row, and each row takes its own: masking, not branching, so
        the step's ops and shapes depend on the batch size (and whether any row is dense) alone."""
        B = x.shape[0]
        H, D, C, R = self.H, self.D, self.C, self.num_hashes
        qk, v = proj if proj is not None else self.decode_projections(x)
        k = len_norm(qk) / math.sqrt(D)
        buckets = self.hash(qk.unsqueeze(2))[..., 0]  # (B, H, R)
        rows, is_new, dbk, dor = pool.lsh_window(j, batch, buckets, C, self.before, self.after)
        updates.lsh[j] = (k, v, dbk, dor)
        keys, values = pool.lsh_tables(j)
        W = rows.shape[-1]
        rows = rows.reshape(B * H, R * W)  # one bag per (sequence, head): every round's window
        dots = _table_dots(qk.reshape(B * H, D), keys, rows).view(B, H, R, 1, W).float()  # softmax in fp32
        is_new = is_new.unsqueeze(-2)  # (B, H, R, 1, W)
        e, s, m = _window_softmax(dots, None, None, self_mask=True, causal=False, is_self=is_new)
        w = torch.softmax(m + torch.log(s), dim=2)  # (B, H, R, 1, 1): round weights from each round's lse
        # rounds combined inside the weighted sum: sum_r w_r * (e_r / s_r) . v_r. The new token's entries
        # name a cached row (its own is not stored yet): their weight goes to its own value instead (it is 0
        # but where the window holds nothing else)
        p = e * (w / s)
        own = (p * is_new).sum(dim=(2, 3, 4)).unsqueeze(-1)  # (B, H, 1)
        p = p.masked_fill(is_new, 0.0).view(B * H, R * W).to(values.dtype)
        out = (_table_sum(p, values, rows, batch.memo).view(B, H, D) + own.to(v.dtype) * v)
        if batch.dense_span:
            kk, vv, kp = pool.dense_keys(j, batch, batch.dense_span)
            tpos = batch.lengths.view(-1, 1, 1)
            # rows past a sequence's new token are masked, but a zero weight times a never-written row (any
            # bits, NaN included) is not zero: blank them; the new token's own row is not written yet
            n = kp.numel()
            later = (kp.view(1, -1) > tpos.view(-1, 1)).view(-1, 1, n, 1)
            at = (kp.view(1, -1) == tpos.view(-1, 1)).view(-1, 1, n, 1)
            kk = torch.where(at, k.unsqueeze(2), kk)
            vv = torch.where(at, v.unsqueeze(2), vv.masked_fill(later, 0.0))
            o, _ = _attend_window(qk.unsqueeze(2), kk, vv, tpos, kp, self_mask=True, causal=True)
            dense = ~batch.hashed if not self.full_attention else torch.ones_like(batch.hashed)
            out = torch.where(dense, o[:, :, 0], out)
        return out.reshape(B, H * D)


# ---------------------------------------------------------------------------------------------------
# Local self-attention
# ---------------------------------------------------------------------------------------------------
class LocalSelfAttention(nn.Module):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.H, self.D = config.num_attention_heads, config.attention_head_size
        self.C = config.local_attn_chunk_length
        self.before, self.after = config.local_num_chunks_before, config.local_num_chunks_after
        self.query = nn.Linear(config.hidden_size, self.H * self.D, bias=False)
        self.key = nn.Linear(config.hidden_size, self.H * self.D, bias=False)
        self.value = nn.Linear(config.hidden_size, self.H * self.D, bias=False)

    @property
    def ring_size(self) -> int:
        return (self.before + 1) * self.C

    def forward_work(
        self,
        h: Tensor,
        layer_norm: nn.Module,
        target: PrefillTarget | None,
        score_budget: int,
        emit: Emit,
        step: int | None = None,
    ) -> Work:
        """Causal chunked attention over LN(h) (B, T, E); output rows (B, t, H*D) go to `emit(s0, s1, o)`.

        Works slice by slice (whole chunks, about `step` positions): a slice projects its own queries, keys
        and values, attends, and emits, so no full-sequence q/k/v or output is ever held. The keys and values
        a slice needs from outside itself are kept from earlier slices: the `before` chunks preceding it and,
        for windows that wrap around past the last chunk (`after` > 0), the first `after` chunks. Any other
        chunk in a window lies wholly after its queries (a wrap-around of the chunk axis, as transformers'
        `_look_adjacent` does): the causal mask removes it, so a masked chunk of zeros stands in for it and
        the result is the same.
        """
        B, T, _ = h.shape
        H, D, C = self.H, self.D, self.C
        dev = h.device
        N = -(-T // C)  # chunks (the last one padded with zero rows, masked causally)
        W = C * (1 + self.before + self.after)
        S = N if step is None else max(1, step // C)  # chunks per slice
        G = min(S, _group_size(C, W, B * H, score_budget))
        far = N * C  # position of the stand-in chunk: after every query, so always masked
        zeros = h.new_zeros(B, H, C, D)
        kept: dict[int, tuple[Tensor, Tensor]] = {}  # chunk id -> keys, values (B, H, C, D) from earlier slices
        for c0 in range(0, N, S):
            c1 = min(c0 + S, N)
            s0, s1 = c0 * C, min(c1 * C, T)
            x = layer_norm(h[:, s0:s1])
            q, k, v = (h.new_zeros(B, H, (c1 - c0) * C, D) for _ in range(3))  # tail rows stay zero (masked)
            q[:, :, : s1 - s0] = self.query(x).view(B, s1 - s0, H, D).transpose(1, 2)  # (B, H, t, D)
            k[:, :, : s1 - s0] = self.key(x).view(B, s1 - s0, H, D).transpose(1, 2) / math.sqrt(D)
            v[:, :, : s1 - s0] = self.value(x).view(B, s1 - s0, H, D).transpose(1, 2)
            if target is not None:
                j = target.pool.local_index[target.layer]
                for b, seq in enumerate(target.seqs):
                    target.pool.write_ring(j, seq, k[b, :, : s1 - s0], v[b, :, : s1 - s0], T, start=s0)
            yield s1 - s0
            # pool of chunks this slice's windows can see: [stand-in, kept chunks..., this slice's chunks]
            ids = [-1, *sorted(kept), *range(c0, c1)]
            kpool = torch.cat([zeros, *(kept[i][0] for i in sorted(kept)), k], dim=2).view(B, H, len(ids), C, D)
            vpool = torch.cat([zeros, *(kept[i][1] for i in sorted(kept)), v], dim=2).view(B, H, len(ids), C, D)
            slot = torch.zeros(N, dtype=torch.long)  # chunk id -> pool index (0: the masked stand-in)
            slot[torch.tensor(ids[1:], dtype=torch.long)] = torch.arange(1, len(ids))
            slot = slot.to(dev)
            ppos = torch.tensor(ids, device=dev).view(-1, 1) * C + torch.arange(C, device=dev)  # (P, C)
            ppos[0] = far
            qc = q.view(B, H, c1 - c0, C, D)
            out = q.new_empty(B, H, c1 - c0, C, D)
            for m0 in range(c0, c1, G):
                m1 = min(m0 + G, c1)
                g = m1 - m0
                win = slot[_window_chunk_index(N, m0, m1, self.before, self.after, dev)]  # (g, n) pool indices
                kk = kpool[:, :, win].reshape(B, H, g, W, D)
                vv = vpool[:, :, win].reshape(B, H, g, W, D)
                qp = torch.arange(m0 * C, m1 * C, device=dev).view(g, C)
                o, _ = _attend_window(qc[:, :, m0 - c0 : m1 - c0], kk, vv, qp, ppos[win].reshape(g, W),
                                      self_mask=False)
                out[:, :, m0 - c0 : m1 - c0] = o
                yield g * C
            # keep what later slices can see: the last `before` chunks, and the first `after` chunks (seen by
            # the last chunks' wrapped-around windows)
            for i in range(c0, c1):
                if i >= c1 - self.before or i < self.after:
                    j = i - c0
                    kept[i] = (k[:, :, j * C : (j + 1) * C].clone(), v[:, :, j * C : (j + 1) * C].clone())
            for i in [i for i in kept if i < c1 - self.before and i >= self.after]:
                del kept[i]
            o = out.view(B, H, (c1 - c0) * C, D)[:, :, : s1 - s0].transpose(1, 2).reshape(B, s1 - s0, H * D)
            emit(s0, s1, o)
            yield s1 - s0

    def decode_projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, H, 1, D), scaled keys and values (B, H, D) of decode rows x (B, E)."""
        B, H, D = x.shape[0], self.H, self.D
        return (self.query(x).view(B, H, 1, D), (self.key(x) / math.sqrt(D)).view(B, H, D),
                self.value(x).view(B, H, D))

    def decode(self, x: Tensor, pool: DecodePool, j: int, batch: StepBatch, updates: StepUpdates,
               proj: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """x (B, E) -> (B, H*D); the new token at position T sees [((T//C) - before) * C, T]. Its key and value
        go into `updates` (written into the ring after the step). `proj`: x's `decode_projections` when already
        computed."""
        B = x.shape[0]
        H, D, C = self.H, self.D, self.C
        q, k, v = proj if proj is not None else self.decode_projections(x)
        updates.local[j] = (k, v)
        kk, vv, pp = pool.local_window(j, batch)  # rings (B, H, ring, D), their positions (B, ring)
        T = batch.lengths.view(B, 1)
        start = ((T // C) - self.before).clamp(min=0) * C
        hidden = (pp < start) | (pp < 0)
        own = (pp == T).view(B, 1, 1, -1)  # the new token's slot: its key is not in the ring yet
        dots = torch.matmul(q, kk.transpose(-1, -2)).float()  # (B, H, 1, ring); softmax in fp32
        dots = torch.where(own, torch.matmul(q, k.unsqueeze(-1)).float(), dots)
        dots = dots.masked_fill(hidden.view(B, 1, 1, -1), MASK_VALUE[torch.float32])
        probs = torch.softmax(dots, dim=-1)
        out = torch.matmul(probs.masked_fill(own, 0.0).to(vv.dtype), vv) \
            + (probs * own).sum(-1, keepdim=True).to(v.dtype) * v.unsqueeze(2)  # (B, H, 1, D)
        return out.reshape(B, H * D)


    def decode_run(self, pool: DecodePool, j: int, seq: SequenceCache,
                   proj: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """n consecutive new tokens of one sequence at once (`ReformerLM.decode_tokens`): proj holds their
        `decode_projections` (n rows). Token P sees the keys its decode step would (the ring's positions and
        the run's own up to P, from ((P//C) - before) * C on): the ring as it stands and the run's keys are
        scored together, causally masked; then the ring keeps the run's last positions. -> (n, H*D)."""
        q, k, v = proj  # (n, H, 1, D), (n, H, D), (n, H, D)
        n, H, D, C = k.shape[0], self.H, self.D, self.C
        L0, ring = seq.length, pool.ring
        last = torch.tensor(L0 - 1, device=k.device)
        ring_pos = last - torch.remainder(last - torch.arange(ring, device=k.device), ring)  # (ring,) <0: unused
        new_pos = torch.arange(L0, L0 + n, device=k.device)
        kpos = torch.cat([ring_pos, new_pos])  # (ring + n,)
        keys = torch.cat([pool.local_keys[j, seq.slot], k.transpose(0, 1)], dim=1)  # (H, ring + n, D)
        values = torch.cat([pool.local_values[j, seq.slot], v.transpose(0, 1)], dim=1)
        P = new_pos.view(n, 1)
        start = ((P // C) - self.before).clamp(min=0) * C
        hidden = (kpos < start) | (kpos > P) | (kpos < 0)  # (n, ring + n)
        dots = torch.matmul(q.view(n, H, D).transpose(0, 1), keys.transpose(-1, -2)).float()  # (H, n, ring + n)
        probs = torch.softmax(dots.masked_fill(hidden, MASK_VALUE[torch.float32]), dim=-1)
        out = torch.matmul(probs.to(values.dtype), values)  # (H, n, D)
        pool.write_ring(j, seq, k.transpose(0, 1), v.transpose(0, 1), L0 + n, start=L0)
        return out.transpose(0, 1).reshape(n, H * D)


# ---------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """LayerNorm -> LSH or local self-attention -> output projection (names as in transformers)."""

    def __init__(self, config: ReformerConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attention = LSHSelfAttention(config) if kind == "lsh" else LocalSelfAttention(config)
        self.output = nn.Module()
        self.output.dense = nn.Linear(config.all_head_size, config.hidden_size, bias=False)


class FeedForward(nn.Module):
    """LayerNorm -> Linear -> act -> Linear, applied chunk by chunk along the sequence."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = nn.Module()
        self.dense.dense = nn.Linear(config.hidden_size, config.feed_forward_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(config.feed_forward_size, config.hidden_size)
        self.act = ACT[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.output.dense(self.act(self.dense.dense(self.layer_norm(x))))


class ReformerLayer(nn.Module):
    """Reversible block at inference: y1 = x1 + Attn(x2); y2 = x2 + FF(y1). No autograd machinery."""

    def __init__(self, config: ReformerConfig, kind: str) -> None:
        super().__init__()
        self.attention = Attention(config, kind)
        self.feed_forward = FeedForward(config)


# ---------------------------------------------------------------------------------------------------
# Decoding over a pool: shared by the eager model and the exported graphs (`exported.ExportedModel`)
# ---------------------------------------------------------------------------------------------------
class PooledDecoder:
    """Drives decode steps over `DecodePool`s: the host bookkeeping around a step's device part. A subclass
    provides `config`, `num_hashes`, `device`, `dtype`, `full_attention`, a `_step_graphs` dict, and the step
    itself: `decode_core(ids, pool, plan) -> logits` and `sort_keys(keys) -> (order, buckets)` (the
    dense-to-LSH transition). `ReformerLM` runs its own code; `ExportedModel` runs the exported graphs of it."""

    config: ReformerConfig
    _step_graphs: dict[int, StepGraphs]

    def new_decode_pool(self, sequences: int = 1, tokens: int = 0, **layout: int) -> DecodePool:
        """A pool for the decode state of up to `sequences` sequences holding `tokens` positions in all
        (it grows past either when needed). An engine keeps one so all its sequences decode together.
        `layout`: page_size, delta_size (see `DecodePool`)."""
        return DecodePool(self.config, num_hashes=self.num_hashes, device=self.device, dtype=self.dtype,
                          sequences=sequences, tokens=tokens, **layout)

    def use_step_graphs(self, pool: DecodePool, capture: Callable | None = None) -> StepGraphs:
        """Decode the sequences of `pool` through captured steps from now on (`step_graphs`): on CUDA, one
        CUDA graph per batch bucket; `capture` replaces the recorder (tests: `step_graphs.EagerReplay`)."""
        pool.pad_slot()  # taken now: a pool sized to its sequences grows here, not inside a serving step
        graphs = self._step_graphs[id(pool)] = StepGraphs(self, pool, capture)
        return graphs

    def drop_step_graphs(self, pool: DecodePool) -> None:
        """Stop capturing steps for `pool` and let go of its recordings (and of the pool)."""
        graphs = self._step_graphs.get(id(pool))
        if graphs is not None and graphs.pool is pool:
            del self._step_graphs[id(pool)]

    @torch.inference_mode()
    def decode_step(self, input_ids: Tensor, cache: ReformerCache) -> tuple[Tensor, ReformerCache]:
        """One token for every sequence in the batch: (B, 1) -> logits (B, 1, V). Sequences may have
        different lengths; each sequence's state is updated in place (the cache is returned for convenience).
        Sequences of one pool decode in one pass; of different pools, in one pass per pool."""
        seqs = cache.sequences
        B = input_ids.shape[0]
        if B != len(seqs):
            raise ValueError(f"input_ids has {B} rows but the cache holds {len(seqs)} sequences")
        for s in seqs:
            if s.released:
                raise ValueError("the cache of a released sequence cannot decode")
            if s.length + 1 > self.config.max_context:
                raise ValueError(f"sequence would exceed the model's context of {self.config.max_context}")
        groups: dict[int, list[int]] = {}
        for b, s in enumerate(seqs):
            groups.setdefault(id(s.pool), []).append(b)
        logits: Tensor | None = None
        for rows in groups.values():
            rows.sort(key=lambda b: seqs[b].slot)  # a compact range of slots, in order, is read through views
            whole = rows == list(range(B))
            part = self._decode_pooled(input_ids[:, 0] if whole else input_ids[rows, 0], seqs[rows[0]].pool,
                                       [seqs[b].slot for b in rows])
            if whole:
                logits = part
            else:
                if logits is None:
                    logits = part.new_empty(B, part.shape[-1])
                logits[rows] = part
        return logits.unsqueeze(1), cache

    def _decode_pooled(self, ids: Tensor, pool: DecodePool, slots: list[int]) -> Tensor:
        graphs = self._step_graphs.get(id(pool))
        if graphs is not None and graphs.pool is pool and not self.full_attention:
            logits, plan = graphs.run(ids, slots)
        else:
            plan = pool.begin_step(slots, full_attention=self.full_attention)
            logits = self.decode_core(ids, pool, plan)
        self.finish_step(pool, plan, slots)
        return logits

    def finish_step(self, pool: DecodePool, plan: StepPlan, slots: list[int]) -> None:
        """Between steps: advance the sequences; those reaching one chunk are hashed and decode by LSH
        windows from the next token on (not with full attention)."""
        due = pool.end_step(plan, slots)
        if due and not self.full_attention:
            pool.hash_due(due, self.sort_keys)

    def cache_bytes(self, num_tokens: int) -> int:
        """Cache bytes of one sequence holding `num_tokens` positions (in a decode pool of the default layout)."""
        return cache_bytes(self.config, self.num_hashes, self.dtype, num_tokens)

    def cache_bytes_per_token(self) -> float:
        return (self.cache_bytes(8192) - self.cache_bytes(4096)) / 4096


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
class ReformerLM(nn.Module, PooledDecoder):
    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([ReformerLayer(config, kind) for kind in config.attn_layers])
        self.encoder.layer_norm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Module()
        self.lm_head.decoder = nn.Linear(2 * config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.score_budget = DEFAULT_SCORE_ELEMENTS
        self.full_attention = False  # whether the LSH layers run as dense attention (`set_full_attention`)
        self._step_graphs: dict[int, StepGraphs] = {}  # id(pool) -> its captured decode steps
        self.reset_rotations()
        # Every linear weight is stored (in, out)-contiguous and used through its transpose (same values,
        # same state-dict shapes). For the few rows of a decode step, CPU GEMM runs 1.3-1.8x faster with
        # this layout (measured at the small and enwik8 widths, 1-16 rows; equal within 5% at prefill sizes).
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.weight = nn.Parameter(mod.weight.detach().t().contiguous().t(), mod.weight.requires_grad)

    # ---- setup -------------------------------------------------------------------------------
    def reset_rotations(self, seed: int | None = None, num_hashes: int | None = None) -> None:
        """Draw the LSH rotations from `seed` exactly as transformers does for `hash_seed` (every LSH
        layer of one shape gets the same draw) without touching the global RNG."""
        cfg = self.config
        seed = cfg.hash_seed if seed is None else seed
        R = cfg.num_hashes if num_hashes is None else num_hashes
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shape = (cfg.num_attention_heads, cfg.attention_head_size, R, cfg.rotation_size // 2)
        rot = torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu")
        for layer in self.lsh_layers():
            buf = layer.rotations
            layer.rotations = rot.clone().to(device=buf.device)

    def set_full_attention(self, enabled: bool) -> None:
        """Run every LSH layer as dense causal shared-QK attention (the paper's full-attention baseline, for
        evaluation: the weights are unchanged; O(T^2) compute, bounded memory)."""
        self.full_attention = enabled  # read by every decode step: an attribute, not a walk over the layers
        for layer in self.lsh_layers():
            layer.full_attention = enabled

    def lsh_layers(self) -> Iterator[LSHSelfAttention]:
        for layer in self.encoder.layers:
            if isinstance(layer.attention.self_attention, LSHSelfAttention):
                yield layer.attention.self_attention

    def rotation_fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for layer in self.lsh_layers():
            h.update(layer.rotations.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def num_hashes(self) -> int:
        """Hash rounds of the LSH layers' rotations (1 without LSH layers)."""
        return next((layer.num_hashes for layer in self.lsh_layers()), 1)

    @property
    def device(self) -> torch.device:
        return self.lm_head.decoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.decoder.weight.dtype

    # ---- full forward / prefill --------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        """Full forward without cache: (B, T) -> logits (B, T, V). Works under autograd (training)."""
        return _drain(self._forward_work(input_ids, None, last_only=False))

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, capacity: int | Sequence[int] | None = None, last_only: bool = False,
                pool: DecodePool | None = None) -> tuple[Tensor, ReformerCache]:
        """Full forward over the prompt that also builds the decode cache. Returns (logits, cache).
        The state is written into `pool` (a private one when None); release the cache when done with it."""
        return _drain(self.prefill_iter(input_ids, capacity=capacity, last_only=last_only, work_tokens=None, pool=pool))

    def prefill_iter(
        self,
        input_ids: Tensor,
        *,
        capacity: int | Sequence[int] | None = None,
        last_only: bool = True,
        work_tokens: int | None = 4096,
        pool: DecodePool | None = None,
    ) -> Generator[tuple[int, int], None, tuple[Tensor, ReformerCache]]:
        """Resumable prefill: yields (done, total) units of work; returns (logits, cache).

        A unit is about `work_tokens` positions of one layer's attention or feed-forward, so an engine can
        interleave decode steps of other sequences between units. Results equal `prefill` exactly.
        The sequences' state is written into `pool` (a private one when None) from the first unit on; if
        the prefill is closed or fails before it returns, their slots are given back.
        `capacity` is one for every row or one per row (a batch of requests with their own budgets).
        """
        B, T = input_ids.shape
        self.config.check_prompt_length(T)
        caps = row_capacities(capacity, B, T)
        if pool is None:
            pool = self.new_decode_pool(B, sum(caps) + B)
        seqs: list[SequenceCache] = []
        done_ok = False
        try:
            for cap in caps:
                seqs.append(pool.allocate(cap))
            target = PrefillTarget(pool, seqs, pool.rows_of([s.slot for s in seqs], T))
            gen = self._forward_work(input_ids, target, last_only=last_only, work_tokens=work_tokens)
            total = self.prefill_work(T)
            done = 0
            while True:
                # inference mode only around each unit: a `with` spanning the `yield` would leak the mode
                # into the caller's thread while suspended (and for good if the prefill is abandoned)
                try:
                    with torch.inference_mode():
                        step = next(gen)
                except StopIteration as stop:
                    logits = stop.value
                    break
                done += step
                yield (min(done, total), total)
            hashed = (self.config.padded_length(T) > self.config.lsh_attn_chunk_length and not self.full_attention
                      and "lsh" in self.config.attn_layers)
            pool.finish_prefill(seqs, T, hashed)
            done_ok = True
        finally:
            if not done_ok:
                for seq in seqs:
                    seq.release()
        return logits, ReformerCache(seqs)

    def prefill_work(self, T: int) -> int:
        """Work units of a prefill of T tokens (with a cache): positions covered by every pass that yields.
        An engine budgets its steps in these units."""
        cfg = self.config
        Tp = cfg.padded_length(T)
        n = T  # embeddings
        for kind in cfg.attn_layers:
            if kind == "lsh":
                # projections, output projection, attention (per hash round over the padded length when
                # hashed: also the per-head sort and the key normalisation into the cache)
                n += 2 * T + (T if Tp <= cfg.lsh_attn_chunk_length else 2 * T + cfg.num_hashes * Tp)
            else:
                n += 2 * T + -(-T // cfg.local_attn_chunk_length) * cfg.local_attn_chunk_length
            n += feed_forward_weight(cfg) * T  # feed-forward
        return n

    def _forward_work(
        self,
        input_ids: Tensor,
        target: PrefillTarget | None,
        last_only: bool,
        work_tokens: int | None = None,
    ) -> Generator[int, None, Tensor]:
        cfg = self.config
        B, T = input_ids.shape
        cfg.check_prompt_length(T)
        Tp = cfg.padded_length(T)
        positions = torch.arange(T, device=input_ids.device)
        training = torch.is_grad_enabled()
        if work_tokens is not None:
            step = max(1, work_tokens)
        elif training:
            step = T  # training: one slice (fewer, larger ops; autograd keeps everything anyway)
        else:
            step = MEMORY_SLICE  # inference: position-wise work in slices bounds the temporaries
        proj_step = None if step >= T else step
        ff_weight = feed_forward_weight(cfg)
        budget = self.score_budget
        if work_tokens is not None:
            budget = min(budget, max(1, B * cfg.num_attention_heads * work_tokens * 2 * cfg.lsh_attn_chunk_length))
        if training:
            x = self.embeddings(input_ids, positions)  # (B, T, E)
            a, h = x, x  # the two reversible streams start equal
            yield T
        else:
            # At inference both streams are updated in place, slice by slice: they must be two buffers.
            a = self.embeddings.word_embeddings.weight.new_empty(B, T, cfg.hidden_size)
            h = torch.empty_like(a)
            for s0, s1 in _slices(T, proj_step):
                a[:, s0:s1] = self.embeddings(input_ids[:, s0:s1], positions[s0:s1])
                h[:, s0:s1] = a[:, s0:s1]
                yield s1 - s0
        last = len(self.encoder.layers) - 1
        for i, layer in enumerate(self.encoder.layers):
            att = layer.attention
            layer_target = None if target is None else dataclasses.replace(target, layer=i)
            parts: list[Tensor] = []
            # The last layer's outputs feed only the head: with last_only, only the last position's. Its
            # keys and values (the cache) still cover every position; its output projection and
            # feed-forward run for the last position alone (1/L of a prefill's position-wise work).
            tail = T - 1 if last_only and not training and i == last else 0

            def emit(s0: int, s1: int, o: Tensor, dense: nn.Module = att.output.dense, parts: list = parts,
                     stream: Tensor = a, tail: int = tail) -> None:
                # y1 = x1 + Attn(x2): each slice of attention output is projected and added as soon as it
                # exists (in place at inference; gathered for one out-of-place add under autograd)
                if training:
                    parts.append(dense(o))
                elif s1 > tail:
                    stream[:, max(s0, tail) : s1] += dense(o[:, max(s0, tail) - s0 :])

            if att.kind == "lsh":
                yield from att.self_attention.forward_work(h, att.layer_norm, Tp, layer_target, budget, emit,
                                                           proj_step)
            else:
                yield from att.self_attention.forward_work(h, att.layer_norm, layer_target, budget, emit, proj_step)
            if training:
                a = a + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
            # y2 = x2 + FF(y1), chunked along the sequence (memory only; the result is the same). At
            # inference a slice covers 1/ff_weight as many positions as the other passes' and counts
            # ff_weight units a position, so a unit of work takes about the same time in every pass.
            ff_chunk = min(cfg.chunk_size_feed_forward or step, step if training else max(1, step // ff_weight))
            ff_parts: list[Tensor] = []
            for s0, s1 in _slices(T, ff_chunk):
                if training:
                    ff_parts.append(layer.feed_forward(a[:, s0:s1]))
                elif s1 > tail:
                    h[:, max(s0, tail) : s1] += layer.feed_forward(a[:, max(s0, tail) : s1])
                yield (s1 - s0) * ff_weight  # counted even when skipped: the units stay those of `prefill_work`
            if training:
                h = h + (ff_parts[0] if len(ff_parts) == 1 else torch.cat(ff_parts, dim=1))
        if last_only:
            a, h = a[:, -1:], h[:, -1:]
        return self._head(a, h)

    def _head(self, a: Tensor, h: Tensor) -> Tensor:
        y = self.encoder.layer_norm(torch.cat([a, h], dim=-1))  # (B, T, 2E)
        return self.lm_head.decoder(y) + self.lm_head.bias

    # ---- decode (driven by `PooledDecoder`) -----------------------------------------------------
    def sort_keys(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Cached keys (Ll, S, H, T, D) of every LSH layer -> their positions sorted by (bucket, position) and
        their buckets, (Ll, S, H, R, T) each (argmax ignores the key norm)."""
        T = keys.shape[-2]
        buckets = torch.stack([layer.hash(k) for layer, k in zip(self.lsh_layers(), keys.unbind(0), strict=True)])
        return torch.argsort(buckets * T + torch.arange(T, device=keys.device), dim=-1), buckets

    def decode_core(self, ids: Tensor, pool: DecodePool, plan: StepPlan) -> Tensor:
        """The device part of a decode step: ids (n,) -> logits (n, V), the pool's tensors updated in place
        (`decode_compute`, then `DecodePool.apply_step`). No host sync and no data-dependent shape: one trace
        (or captured graph) replays it for every token of a batch while its sequences stay
        (`DecodePool.begin_step` / `finish_step` do the host bookkeeping)."""
        logits, batch, updates = self.decode_compute(ids, pool, plan)
        pool.apply_step(batch, updates)
        return logits

    def decode_compute(self, ids: Tensor, pool: DecodePool, plan: StepPlan) -> tuple[Tensor, StepBatch, StepUpdates]:
        """A decode step as a pure function of the pool's tensors: logits (n, V), the step's view of the pool,
        and what the step writes into it (`StepUpdates`, for `DecodePool.apply_step`). Export traces this
        (the pool's tensors as the graph's inputs, the updates as its outputs)."""
        batch = pool.step_view(plan)
        updates = StepUpdates()
        x = self.embeddings(ids, batch.lengths)  # (B, E)
        a, h = x, x
        for i, layer in enumerate(self.encoder.layers):
            att = layer.attention
            j = pool.lsh_index[i] if att.kind == "lsh" else pool.local_index[i]
            o = att.self_attention.decode(att.layer_norm(h), pool, j, batch, updates)
            a = a + att.output.dense(o)
            h = h + layer.feed_forward(a)
        return self._head(a, h), batch, updates

    @torch.inference_mode()
    def decode_tokens(self, input_ids: Sequence[Sequence[int]], seqs: Sequence[SequenceCache]) -> Tensor:
        """Several tokens for each of several sequences (of one pool) in one pass, with the state and results
        of one `decode_step` per token: returns the logits (B, V) after each sequence's last token.

        An LSH layer runs its attention one token index at a time, batched over the sequences that have that
        many tokens, each row exactly as in a decode step (the token's window in the order as it stands, then
        its insertion); a local layer attends each sequence's run at once, masked to what each token's decode
        step sees (`LocalSelfAttention.decode_run`); the projections and the feed-forward, per position, run
        for every token at once (their weights read once instead of once per step: prompts after a context). Only where
        `pool.can_decode_tokens` allows it for every sequence; otherwise decode the tokens step by step."""
        B = len(seqs)
        pool = seqs[0].pool
        counts = [len(t) for t in input_ids]
        for s, c in zip(seqs, counts, strict=True):
            if s.released or s.pool is not pool or not c or not pool.can_decode_tokens(s.slot, c) \
                    or s.length + c > self.config.max_context:
                raise ValueError("decode_tokens needs hashed sequences of one pool whose deltas take the tokens")
        slots = [s.slot for s in seqs]
        offsets = [sum(counts[:b]) for b in range(B)]  # row of sequence b's first token in the flat layout
        batches = pool.token_batches(slots, counts)
        index = [torch.tensor([offsets[b] + t for b in range(B) if counts[b] > t], device=self.device)
                 for t in range(len(batches))]
        ids = torch.tensor([t for row in input_ids for t in row], dtype=torch.long, device=self.device)  # (N,)
        pos = torch.tensor([s.length + t for s, c in zip(seqs, counts, strict=True) for t in range(c)],
                           device=self.device)
        x = self.embeddings(ids, pos)  # (N, E)
        a, h = x, x
        for i, layer in enumerate(self.encoder.layers):
            att = layer.attention
            j = pool.lsh_index[i] if att.kind == "lsh" else pool.local_index[i]
            hn = att.layer_norm(h)
            proj = att.self_attention.decode_projections(hn)  # every token's at once
            o = hn.new_empty(hn.shape[0], att.output.dense.in_features)  # (N, H*D)
            if att.kind == "lsh":  # the order changes with every token: one token index at a time
                for rows, batch in zip(index, batches, strict=True):
                    updates = StepUpdates()
                    o[rows] = att.self_attention.decode(hn[rows], pool, j, batch, updates,
                                                        tuple(p[rows] for p in proj))
                    pool.apply_step(batch, updates)  # the next token index sees this one's insertion
            else:  # a local window is positions: each sequence's run at once, causally masked
                for b, s in enumerate(seqs):
                    run = slice(offsets[b], offsets[b] + counts[b])
                    o[run] = att.self_attention.decode_run(pool, j, s, tuple(p[run] for p in proj))
            a = a + att.output.dense(o)
            h = h + layer.feed_forward(a)
        for s, c in zip(slots, counts, strict=True):
            pool.advance(s, c)
        last = torch.tensor([offsets[b] + counts[b] - 1 for b in range(B)], device=self.device)
        return self._head(a[last], h[last])  # (B, V)
