"""Captured decode steps: the device part of a step (`ReformerLM.decode_core`) recorded once per batch
bucket and replayed for every token, so a step costs one graph launch instead of one launch per op.

A batch of n sequences runs in the bucket of the next power of two; its extra rows take the pool's pad slot
(`DecodePool.pad_slot`: never advanced, never read by a real sequence). The step reads only static buffers
(the bucket's ids and slots) and the pool's tensors, and writes the pool in place; the host bookkeeping
(`DecodePool.begin_step`, `ReformerLM.finish_step`) runs between replays. There are two variants per
bucket, with and without the dense attention of sequences shorter than one LSH chunk. When the pool
reallocates its tensors (it grew), every captured step is dropped and captured again.

On CUDA the recording is a `torch.cuda.CUDAGraph` (warmed up on a side stream first). Elsewhere
`EagerReplay` stands in: it runs the step eagerly on the same static buffers and checks that nothing a
graph would have captured by address has moved (the CPU tests exercise the buffer discipline with it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from .pool import DecodePool, StepPlan

Replay = Callable[[], None]


class StepModel(Protocol):
    """What is captured: the device part of a model's decode step (`ReformerLM.decode_core`)."""

    def decode_core(self, ids: Tensor, pool: DecodePool, plan: StepPlan) -> Tensor: ...


def bucket_of(n: int) -> int:
    """The batch bucket of n rows: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def _pool_addresses(pool: DecodePool) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in (pool.keys, pool.values, pool.order, pool.cum_static, pool.dbuckets,
                                        pool.dorder, pool.local_keys, pool.local_values, pool.page_table,
                                        pool.len_d, pool.hashed_d))


def cuda_capture(step: Callable[[], Tensor]) -> tuple[Replay, Tensor]:
    """Record `step` in a CUDA graph (after two warm-up runs on a side stream); returns the replay and the
    graph's output tensor (rewritten by every replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph.replay, out


class EagerReplay:
    """A stand-in for a captured graph where there is none: replays by running the step again, into the
    output buffer of the first run, after checking that the static buffers and the pool's tensors are the
    ones the first run read (what a real graph would silently keep using)."""

    def __init__(self, pool: DecodePool, buffers: tuple[Tensor, ...]) -> None:
        self.pool, self.buffers = pool, buffers
        self.replays = 0

    def __call__(self, step: Callable[[], Tensor]) -> tuple[Replay, Tensor]:
        out = step()
        addresses = _pool_addresses(self.pool) + tuple(b.data_ptr() for b in self.buffers)

        def replay() -> None:
            now = _pool_addresses(self.pool) + tuple(b.data_ptr() for b in self.buffers)
            if now != addresses:
                raise RuntimeError("a captured decode step would read moved buffers")
            got = step()
            if got.shape != out.shape:
                raise RuntimeError(f"a captured decode step changed shape: {tuple(got.shape)} != {tuple(out.shape)}")
            out.copy_(got)
            self.replays += 1

        return replay, out


class StepGraphs:
    """Captured decode steps of one model on one pool (see the module docstring)."""

    def __init__(self, model: StepModel, pool: DecodePool,
                 capture: Callable[[DecodePool, tuple[Tensor, ...]], Callable] | None = None) -> None:
        self.model, self.pool = model, pool
        self._capture = capture
        self._graphs: dict[tuple[int, int], tuple[Replay, Tensor]] = {}
        self._ids: dict[int, Tensor] = {}
        self._slots: dict[int, Tensor] = {}
        self._generation = -1
        self.captures = 0

    def _buffers(self, bucket: int) -> tuple[Tensor, Tensor]:
        if bucket not in self._ids:
            dev = self.pool.device
            pad = self.pool.pad_slot()
            self._ids[bucket] = torch.zeros(bucket, dtype=torch.long, device=dev)
            self._slots[bucket] = torch.full((bucket,), pad, dtype=torch.long, device=dev)
        return self._ids[bucket], self._slots[bucket]

    @torch.inference_mode()
    def run(self, ids: Tensor, slots: list[int]) -> tuple[Tensor, StepPlan]:
        """One decode step of the sequences `slots` (ids (n,)): logits (n, V) and the step's plan (for
        `ReformerLM.finish_step`)."""
        pool = self.pool
        n = len(slots)
        bucket = bucket_of(n)
        static_ids, static_slots = self._buffers(bucket)
        plan = pool.begin_step(slots, out=static_slots)  # may add pages: then the pool moved
        if pool.generation != self._generation:
            self._graphs.clear()
            self._generation = pool.generation
        key = (bucket, plan.dense_span)
        if key not in self._graphs:
            self._graphs[key] = self._record(bucket, plan, static_ids, static_slots)
        replay, out = self._graphs[key]
        static_ids[:n].copy_(ids)
        replay()
        return out[:n].clone(), plan

    def _record(self, bucket: int, plan: StepPlan, static_ids: Tensor, static_slots: Tensor
                ) -> tuple[Replay, Tensor]:
        """Record the bucket's step. Warm-up and recording run with every row on the pad slot (the run
        writes the pool in place: the real sequences must not take a step), then the real slots go back."""
        pool = self.pool
        real = static_slots.clone()
        static_slots.fill_(pool.pad_slot())
        recorded = StepPlan(static_slots, None, plan.dense_span)

        def step() -> Tensor:
            return self.model.decode_core(static_ids, pool, recorded)

        capture = self._capture(pool, (static_ids, static_slots)) if self._capture is not None else cuda_capture
        try:
            with torch.inference_mode():
                result = capture(step)
        finally:
            static_slots.copy_(real)
        self.captures += 1
        return result
