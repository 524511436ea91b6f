"""The decode cache: explicit per-sequence state, passed into and returned from `decode_step`.

LSH layers keep, for every past position, the length-normalised shared-QK key and the value (not hidden
states to re-project), plus bucket bookkeeping per hash round:
  * `counts` (H, R, K): tokens per bucket. The new token's slot in the (bucket, position)-sorted order is
    the number of cached tokens whose bucket is <= its own (it has the largest position), an O(K) prefix sum.
  * `order` (H, R, capacity): positions in (bucket, position) order, so the window around that slot is a
    gather of W = C x (1 + before + after) entries per round. Inserting the new token shifts the int32 tail
    of this table (a memmove-sized gather; the keys/values are never copied or re-sorted).
Local layers keep a ring of the last (chunks_before + 1) x chunk keys/values: all they can still attend to.

Sequences of different lengths are batched by grouping their caches (`ReformerCache.batch`): no tensor is
copied; `decode_step` gathers each sequence's window and runs the dense math for the whole batch at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .model import LSHSelfAttention, ReformerLM

# Below this many order-table entries (T x H x R) one vectorised gather inserts the new token faster than
# per-row memmoves (fewer ops); above it the memmoves win by far on CPU.
SMALL_INSERT = 1 << 16


@dataclass
class LSHLayerState:
    keys: Tensor  # (H, cap, D) normalised keys scaled by 1/sqrt(D)
    values: Tensor  # (H, cap, D)
    num_hashes: int
    num_buckets: int
    order: Tensor | None = None  # (H, R, cap) int32; None while the sequence is shorter than one chunk
    counts: Tensor | None = None  # (H, R, K) int32

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        n = self.keys.nbytes + self.values.nbytes
        if self.order is not None:
            n += self.order.nbytes + self.counts.nbytes
        return n

    def write_prefill(self, k: Tensor, v: Tensor, order: Tensor | None, buckets: Tensor | None = None) -> None:
        T = k.shape[1]
        if k.data_ptr() != self.keys.data_ptr():  # prefill may have computed them in place already
            self.keys[:, :T] = k
            self.values[:, :T] = v
        if order is not None:
            self._alloc_index()
            self.order[:, :, :T] = order.to(torch.int32)
            self.counts.zero_()
            self.counts.scatter_add_(-1, buckets, torch.ones_like(buckets, dtype=torch.int32))

    def _alloc_index(self) -> None:
        H = self.keys.shape[0]
        dev = self.keys.device
        self.order = torch.zeros(H, self.num_hashes, self.capacity, dtype=torch.int32, device=dev)
        self.counts = torch.zeros(H, self.num_hashes, self.num_buckets, dtype=torch.int32, device=dev)

    def grow(self, capacity: int) -> None:
        H, old, D = self.keys.shape
        if capacity <= old:
            return
        for name in ("keys", "values"):
            t = getattr(self, name)
            n = t.new_empty(H, capacity, D)
            n[:, :old] = t
            setattr(self, name, n)
        if self.order is not None:
            n = self.order.new_zeros(H, self.num_hashes, capacity)
            n[:, :, :old] = self.order
            self.order = n

    def append(
        self, k: Tensor, v: Tensor, bucket: Tensor, T: int, layer: LSHSelfAttention, C: int | None, slot: Tensor | None = None
    ) -> None:
        """Store the new token (position T): key/value rows and its slot in every round's order."""
        self.keys[:, T] = k
        self.values[:, T] = v
        if self.order is None:
            if C is not None and T + 1 >= C:
                # From one chunk on, transformers hashes every cached position and decodes by LSH windows.
                buckets = layer.hash(self.keys[:, : T + 1])  # (H, R, T+1); argmax ignores the key norm
                pos = torch.arange(T + 1, device=k.device)
                order = torch.argsort(buckets * (T + 1) + pos, dim=-1)
                self.write_prefill(self.keys[:, : T + 1], self.values[:, : T + 1], order, buckets)
            return
        p = slot
        if p is None:
            p = self.counts.cumsum(-1).gather(-1, bucket.unsqueeze(-1)).squeeze(-1).long()
        if self.order.is_cuda or T * p.numel() <= SMALL_INSERT:
            # one vectorised gather: cheap on a GPU (no host sync) and for short sequences (few ops)
            idx = torch.arange(T + 1, device=k.device)
            pe = p.unsqueeze(-1)
            src = (idx - (idx > pe).long()).clamp(max=max(T - 1, 0))  # (H, R, T+1)
            shifted = self.order.gather(-1, src)
            self.order[:, :, : T + 1] = torch.where(idx == pe, torch.tensor(T, dtype=torch.int32), shifted)
        else:
            # a memmove of each row's tail: ~15x faster than the gather on CPU (1.2 vs 19 ms at 64K, H*R = 32)
            for h, row_slots in enumerate(p.tolist()):
                for r, q in enumerate(row_slots):
                    row = self.order[h, r]
                    if q < T:
                        row[q + 1 : T + 1] = row[q:T].clone()
                    row[q] = T
        self.counts.scatter_add_(-1, bucket.unsqueeze(-1), torch.ones_like(bucket, dtype=torch.int32).unsqueeze(-1))


def lsh_windows(
    states: Sequence[LSHLayerState], buckets: Tensor, lengths: Sequence[int], C: int, before: int, after: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The new tokens' attention windows for a batch of windowed sequences, per head and hash round.

    buckets (n, H, R): the new tokens' buckets. Returns keys and values (n, H, R, W, D), positions (n, H, R, W)
    and the new tokens' sorted slots p (n, H, R). A new token (position T) lands at slot p of the T+1 sorted
    entries of its round (p = number of cached tokens whose bucket is <= its own: a prefix sum of the
    counts); it sees slots [(p // C - before) * C, + W) modulo T+1 within that round, which is what
    transformers' cached decode attends to. Slot p holds the new token itself, whose key is not cached yet:
    the caller substitutes it where position == T. Everything is vectorised over the batch except one gather
    per sequence into its own order table and key/value rows.
    """
    n, H, R = buckets.shape
    W = C * (1 + before + after)
    dev = buckets.device
    counts = torch.stack([st.counts for st in states])  # (n, H, R, K)
    p = counts.cumsum(-1).gather(-1, buckets.unsqueeze(-1)).squeeze(-1).long()  # (n, H, R)
    T = torch.tensor(list(lengths), device=dev).view(n, 1, 1, 1)
    start = (torch.div(p, C, rounding_mode="floor") - before) * C
    slots = torch.remainder(start.unsqueeze(-1) + torch.arange(W, device=dev), T + 1)  # (n, H, R, W)
    pe = p.unsqueeze(-1)
    src = torch.minimum(torch.where(slots > pe, slots - 1, slots), T - 1)
    pos = torch.stack([st.order.gather(-1, src[i]) for i, st in enumerate(states)]).long()
    pos = torch.where(slots == pe, T, pos)  # (n, H, R, W)
    D = states[0].keys.shape[-1]
    # rows of the flattened (H * capacity, D) buffers: index_select is ~10x faster than an expanded gather
    head = torch.arange(H, device=dev).view(1, H, 1, 1)
    kk = states[0].keys.new_empty(n, H * R * W, D)
    vv = states[0].values.new_empty(n, H * R * W, D)
    for i, st in enumerate(states):
        rows = (pos[i] + head[0] * st.capacity).reshape(-1)  # (H * R * W,)
        torch.index_select(st.keys.view(-1, D), 0, rows, out=kk[i])
        torch.index_select(st.values.view(-1, D), 0, rows, out=vv[i])
    return kk.view(n, H, R, W, D), vv.view(n, H, R, W, D), pos, p


@dataclass
class LocalLayerState:
    keys: Tensor  # (H, ring, D) scaled keys
    values: Tensor  # (H, ring, D)
    positions: Tensor  # (ring,) int64; -1 = empty

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.positions.nbytes

    def write_prefill(self, k: Tensor, v: Tensor, T: int, start: int = 0) -> None:
        """Keep the ring's share of a prefill of T positions. k, v (H, n, D) hold positions [start, start + n),
        so a prefill working slice by slice hands each slice over as it goes (only the last ring is kept)."""
        ring = self.positions.shape[0]
        first, end = max(start, T - ring), min(T, start + k.shape[1])
        if first >= end:
            return
        pos = torch.arange(first, end, device=k.device)
        slots = pos % ring
        self.keys[:, slots] = k[:, first - start : end - start]
        self.values[:, slots] = v[:, first - start : end - start]
        self.positions[slots] = pos

    def append(self, k: Tensor, v: Tensor, T: int) -> None:
        slot = T % self.positions.shape[0]
        self.keys[:, slot] = k
        self.values[:, slot] = v
        self.positions[slot] = T

    def grow(self, capacity: int) -> None:  # the ring never grows
        return


LayerState = LSHLayerState | LocalLayerState


@dataclass
class SequenceCache:
    """Everything one sequence needs to decode its next token."""

    length: int
    layers: list[LayerState]

    @classmethod
    def allocate(cls, model: ReformerLM, capacity: int, prefilled: int = 0) -> SequenceCache:
        """Room for `capacity` positions. The LSH key/value rows of the first `prefilled` positions are left
        unwritten for the caller's prefill, which writes every one of them: zeroing them here would touch the
        whole buffer (1.6 GB at 64K on the enwik8 shape) in one go before the prefill's first unit."""
        cfg = model.config
        H, D = cfg.num_attention_heads, cfg.attention_head_size
        dev, dt = model.device, model.dtype
        layers: list[LayerState] = []

        def rows() -> Tensor:
            t = torch.empty(H, capacity, D, device=dev, dtype=dt)
            t[:, prefilled:] = 0
            return t

        for kind in cfg.attn_layers:
            if kind == "lsh":
                layers.append(
                    LSHLayerState(
                        keys=rows(),
                        values=rows(),
                        num_hashes=next(model.lsh_layers()).num_hashes,
                        num_buckets=cfg.total_buckets,
                    )
                )
            else:
                ring = (cfg.local_num_chunks_before + 1) * cfg.local_attn_chunk_length
                layers.append(
                    LocalLayerState(
                        keys=torch.zeros(H, ring, D, device=dev, dtype=dt),
                        values=torch.zeros(H, ring, D, device=dev, dtype=dt),
                        positions=torch.full((ring,), -1, dtype=torch.long, device=dev),
                    )
                )
        return cls(length=0, layers=layers)

    @staticmethod
    def projected_bytes(model: ReformerLM, num_tokens: int) -> int:
        cfg = model.config
        H, D = cfg.num_attention_heads, cfg.attention_head_size
        elt = torch.empty((), dtype=model.dtype).element_size()
        R = next(model.lsh_layers()).num_hashes if "lsh" in cfg.attn_layers else 0
        total = 0
        for kind in cfg.attn_layers:
            if kind == "lsh":
                total += 2 * H * num_tokens * D * elt
                if num_tokens >= cfg.lsh_attn_chunk_length:
                    total += H * R * num_tokens * 4 + H * R * cfg.total_buckets * 4
            else:
                ring = (cfg.local_num_chunks_before + 1) * cfg.local_attn_chunk_length
                total += 2 * H * ring * D * elt + ring * 8
        return total

    def reserve(self, needed: int) -> None:
        """Make room for `needed` positions (capacity doubles, so growth is amortised, never per step)."""
        for st in self.layers:
            if isinstance(st, LSHLayerState) and needed > st.capacity:
                st.grow(max(needed, 2 * st.capacity))

    def nbytes(self) -> int:
        return sum(st.nbytes() for st in self.layers)


class ReformerCache:
    """A batch of per-sequence caches (possibly of different lengths)."""

    def __init__(self, sequences: Sequence[SequenceCache]) -> None:
        self.sequences = list(sequences)

    @classmethod
    def batch(cls, caches: Sequence[ReformerCache]) -> ReformerCache:
        """Group caches for one batched decode step; tensors are shared, not copied."""
        return cls([s for c in caches for s in c.sequences])

    def split(self) -> list[ReformerCache]:
        return [ReformerCache([s]) for s in self.sequences]

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.sequences]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)
