"""The decode cache as the caller sees it: handles on sequences whose state lives in a `pool.DecodePool`.

A sequence's decode state is written into a pool from its first prefill unit on (`ReformerLM.prefill` uses
a private one-sequence pool when the caller passes none) and stays there until it is released: there is no
other copy of it. A `SequenceCache` names the pool and the slot; `ReformerCache` groups sequences (of any
lengths, and of any pools) for one batched `decode_step` without copying.

Release is explicit: `release()` (idempotent), or a `with` block around a cache; the engine releases a
request's sequence when it finishes or is aborted. Nothing is keyed on tensor identity or garbage
collection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor


class SlotStore(Protocol):
    """What a sequence handle asks of the store its state lives in (`pool.DecodePool`). A protocol, so this
    module imports nothing of the pool's: the pool hands out the handles."""

    length: list[int]

    def holds(self, slot: int, epoch: int) -> bool: ...
    def release(self, slot: int, epoch: int) -> None: ...
    def sequence_bytes(self, slot: int) -> int: ...
    def sorted_positions(self, layer: int, slot: int) -> Tensor | None: ...
    def bucket_counts(self, layer: int, slot: int) -> Tensor | None: ...


class SequenceCache:
    """One sequence's decode state: a slot of a decode pool."""

    __slots__ = ("pool", "slot", "epoch")

    def __init__(self, pool: SlotStore, slot: int, epoch: int) -> None:
        # `epoch` tells this sequence from later ones given the same slot: a second release is a no-op
        self.pool, self.slot, self.epoch = pool, slot, epoch

    @property
    def length(self) -> int:
        """Positions cached (the prompt and every decoded token)."""
        return self.pool.length[self.slot]

    @property
    def released(self) -> bool:
        return not self.pool.holds(self.slot, self.epoch)

    def nbytes(self) -> int:
        """Bytes the sequence holds in its pool (0 once released)."""
        return 0 if self.released else self.pool.sequence_bytes(self.slot)

    def sorted_positions(self, layer: int) -> Tensor | None:
        """LSH layer `layer`'s (H, R, length) positions sorted by (bucket, position) per head and round (None
        while the sequence is shorter than one chunk and not hashed yet). For inspection and tests."""
        return self.pool.sorted_positions(layer, self.slot)

    def bucket_counts(self, layer: int) -> Tensor | None:
        """LSH layer `layer`'s (H, R, K) tokens per bucket (None while not hashed). For inspection and tests."""
        return self.pool.bucket_counts(layer, self.slot)

    def release(self) -> None:
        """Give the slot and its pages back to the pool (idempotent). The cache cannot decode afterwards."""
        self.pool.release(self.slot, self.epoch)

    def __repr__(self) -> str:
        return f"SequenceCache(slot={self.slot}, length={self.length if not self.released else 'released'})"


class ReformerCache:
    """A batch of sequence caches (possibly of different lengths). A context manager: leaving the block
    releases every sequence."""

    def __init__(self, sequences: Sequence[SequenceCache]) -> None:
        self.sequences = list(sequences)

    @classmethod
    def batch(cls, caches: Sequence[ReformerCache]) -> ReformerCache:
        """Group caches for one batched decode step; the state is shared, not copied."""
        return cls([s for c in caches for s in c.sequences])

    def split(self) -> list[ReformerCache]:
        return [ReformerCache([s]) for s in self.sequences]

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.sequences]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.sequences)

    def release(self) -> None:
        for s in self.sequences:
            s.release()

    def __enter__(self) -> ReformerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __len__(self) -> int:
        return len(self.sequences)
