"""The decode cache: explicit per-sequence state, passed into and returned from `decode_step`.

A prefill fills each sequence's state in its own tensors, sized to the prompt (a `SequenceCache`):
LSH layers keep, for every position, the length-normalised shared-QK key and the value (not hidden states
to re-project) and, per head and hash round, the positions sorted by (bucket, position) (`order`) with the
tokens per bucket (`counts`); local layers keep a ring of the last (chunks_before + 1) x chunk keys/values,
all they can still attend to.

Decode runs in a `pool.DecodePool` (paged storage shared by many sequences, so that a batched step does
the same number of ops for 1 or 64 sequences): a prefill given a pool builds these tensors as views into a
run of its pages; otherwise the sequence is adopted at its first decode step (one copy) and its own
tensors are dropped. `ReformerCache` groups sequences of different lengths for one step without copying.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .model import ReformerLM
    from .pool import DecodePool

@dataclass
class LSHLayerState:
    keys: Tensor  # (H, cap, D) normalised keys scaled by 1/sqrt(D)
    values: Tensor  # (H, cap, D)
    num_hashes: int
    num_buckets: int
    order: Tensor | None = None  # (H, R, cap) int32; None while the sequence is shorter than one chunk
    counts: Tensor | None = None  # (H, R, K) int32
    order_buffer: Tensor | None = field(default=None, repr=False)  # where `order` goes (a pool's, when given)

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
        if self.order_buffer is not None:
            self.order = self.order_buffer
        else:
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


LayerState = LSHLayerState | LocalLayerState


@dataclass
class SequenceCache:
    """Everything one sequence needs to decode its next token."""

    length: int
    layers: list[LayerState]  # the prefill's state; emptied once the sequence is adopted into a pool
    pool: DecodePool | None = field(default=None, repr=False)
    slot: int = -1
    reserved: tuple[DecodePool, int] | None = field(default=None, repr=False)  # prefilled into a pool's run
    _finalizer: Any = field(default=None, repr=False)

    @classmethod
    def allocate(cls, model: ReformerLM, capacity: int, pool: DecodePool | None = None,
                 prefilled: int = 0) -> SequenceCache:
        """Empty state for `capacity` positions. With a pool that has a free run of pages for them, the
        tensors are views into the pool, so the prefill writes there and adoption copies nothing.
        Otherwise the LSH key/value rows of the first `prefilled` positions are left unwritten for the
        caller's prefill, which writes every one of them: zeroing them here would touch the whole buffer
        (1.6 GB at 64K on the enwik8 shape) in one go before the prefill's first unit."""
        cfg = model.config
        H, D = cfg.num_attention_heads, cfg.attention_head_size
        dev, dt = model.device, model.dtype
        place = pool.reserve_run(capacity) if pool is not None else None
        layers: list[LayerState] = []

        def rows() -> Tensor:
            t = torch.empty(H, capacity, D, device=dev, dtype=dt)
            t[:, prefilled:] = 0
            return t

        for i, kind in enumerate(cfg.attn_layers):
            if kind == "lsh":
                if place is not None:
                    keys, values, order = pool.lsh_views(i, place, capacity)
                else:
                    keys, values, order = rows(), rows(), None
                layers.append(LSHLayerState(keys=keys, values=values, num_hashes=next(model.lsh_layers()).num_hashes,
                                            num_buckets=cfg.total_buckets, order_buffer=order))
            else:
                ring = (cfg.local_num_chunks_before + 1) * cfg.local_attn_chunk_length
                if place is not None:
                    keys, values = pool.local_views(i, place)
                else:
                    keys = torch.zeros(H, ring, D, device=dev, dtype=dt)
                    values = torch.zeros_like(keys)
                positions = torch.full((ring,), -1, dtype=torch.long, device=dev)
                layers.append(LocalLayerState(keys=keys, values=values, positions=positions))
        seq = cls(length=0, layers=layers)
        if place is not None:
            pool.hold(seq, place[0])
        return seq

    @staticmethod
    def projected_bytes(model: ReformerLM, num_tokens: int) -> int:
        """Bytes one sequence of `num_tokens` positions holds: as the prefill builds it, or in a decode pool
        (pages, per-slot counts and delta), whichever is more."""
        from .pool import pooled_bytes

        return max(SequenceCache.prefill_bytes(model, num_tokens), pooled_bytes(model, num_tokens))

    @staticmethod
    def prefill_bytes(model: ReformerLM, num_tokens: int) -> int:
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
        """Make room for `needed` positions in the prefill's tensors (capacity doubles, so growth is amortised;
        pooled sequences get pages as they grow instead)."""
        for st in self.layers:
            if isinstance(st, LSHLayerState) and needed > st.capacity:
                st.grow(max(needed, 2 * st.capacity))

    def nbytes(self) -> int:
        if self.pool is not None:
            return self.pool.sequence_bytes(self.slot)
        return sum(st.nbytes() for st in self.layers)

    def sorted_positions(self, layer: int) -> Tensor | None:
        """LSH layer `layer`'s (H, R, length) positions sorted by (bucket, position) per head and round (None
        while the sequence is shorter than one chunk and not hashed yet). For inspection and tests."""
        if self.pool is not None:
            return self.pool.sorted_positions(layer, self.slot)
        st = self.layers[layer]
        return None if st.order is None else st.order[:, :, : self.length]

    def bucket_counts(self, layer: int) -> Tensor | None:
        """LSH layer `layer`'s (H, R, K) tokens per bucket (None while not hashed). For inspection and tests."""
        if self.pool is not None:
            return self.pool.bucket_counts(layer, self.slot)
        st = self.layers[layer]
        return None if st.order is None else st.counts

    def release(self) -> None:
        """Give a pooled sequence's slot and pages back now (also done when the object is collected)."""
        if self._finalizer is not None:
            self._finalizer()


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
