"""Captured decode steps: the device part of a step (`ReformerLM.decode_core`) recorded once per batch
bucket and replayed for every token, so a step costs one graph launch instead of one launch per op.

A batch of n sequences runs in the bucket of the next power of two; its extra rows take the pool's pad slot
(`DecodePool.pad_slot`: never advanced, never read by a real sequence). The step reads only static buffers
(the bucket's ids and slots) and the pool's tensors, and writes the pool in place; the host bookkeeping
(`DecodePool.begin_step`, `ReformerLM.finish_step`) runs between replays. There are two variants per
bucket, with and without the dense attention of sequences shorter than one LSH chunk. When the pool
reallocates its tensors (it grew), every captured step is dropped and captured again.

A sampled step (`run_sampled`, the engine's) records sampling too: its input ids are the rows' next ids in the
`SlotSampler` (what the last step sampled), and it writes the sampled ids back there (`sampling.py`), so the
whole step, decode and sampling, is one replay per bucket, variant and sampling mode; the host downloads its
packed output once.

On CUDA the recording is a `torch.cuda.CUDAGraph` (warmed up on a side stream first). On a CPU the engine
can compile the same step instead (`compiled_capture`, `EngineConfig.compile_step`). Elsewhere
`EagerReplay` stands in: it runs the step eagerly on the same static buffers and checks that nothing a
graph would have captured by address has moved (the CPU tests exercise the buffer discipline with it).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from .pool import DecodePool, StepPlan
from .sampling import SlotSampler

Replay = Callable[[], None]


class StepModel(Protocol):
    """What is captured: the device part of a model's decode step (`ReformerLM.decode_core`)."""

    def decode_core(self, ids: Tensor, pool: DecodePool, plan: StepPlan) -> Tensor: ...

    def finish_step(self, pool: DecodePool, plan: StepPlan, slots: list[int]) -> None: ...


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


def compiled_capture(pool: DecodePool, buffers: tuple[Tensor, ...]) -> Callable[[Callable[[], Tensor]], tuple[Replay, Tensor]]:
    """The recorder off CUDA (`EngineConfig.compile_step`): the step compiled whole by `torch.compile`
    (inductor, fullgraph, its C++ wrapper: no Python between its kernels); a replay runs the compiled step
    (the same device function, the same static buffers) and copies its output into the recording's. The
    compiled step writes the pool's tensors in place (`DecodePool.apply_step`); the first two runs, with
    every row on the pad slot and row, compile and warm it (tens of seconds a bucket, variant and sampling
    mode on this CPU)."""

    def capture(step: Callable[[], Tensor]) -> tuple[Replay, Tensor]:
        # A copy of the step's code object: dynamo keeps its compiled entries per code object, so each
        # recording (bucket, variant, mode) gets its own entry (no other entry to tell it from, and no
        # recompile limit: 8 per code object).
        own = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__,
                                 step.__closure__)
        # No guards, as a CUDA graph replays without checks: the recording's static buffers and the pool's
        # tensors stay where they were (a moved pool drops every recording: `StepGraphs._check_generation`)
        # and its Python values are in its key. Dynamo's guards were ~15% of the bundled model's step.
        no_guards = getattr(torch.compiler, "skip_all_guards_unsafe", None)  # torch >= 2.8
        compiled = torch.compile(own, fullgraph=True, options={
            "cpp_wrapper": True, **({"guard_filter_fn": no_guards} if no_guards is not None else {})})
        compiled()
        out = compiled().clone()

        def replay() -> None:
            out.copy_(compiled())

        return replay, out

    return capture


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
        self._graphs: dict[tuple, tuple[Replay, Tensor]] = {}
        self._ids: dict[int, Tensor] = {}
        self._slots: dict[int, Tensor] = {}
        self._rows: dict[int, Tensor] = {}
        self._pool_generation = -1
        self._sampler_generation: tuple[int, int] | None = None
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
        self._check_generation()
        key = ("logits", bucket, plan.dense_span)
        if key not in self._graphs:
            def step() -> Tensor:
                return self.model.decode_core(static_ids, pool, StepPlan(static_slots, None, plan.dense_span))

            self._graphs[key] = self._record(step, (static_ids, static_slots), [static_slots], [pool.pad_slot()])
        replay, out = self._graphs[key]
        static_ids[:n].copy_(ids)
        replay()
        return out[:n].clone(), plan

    @torch.inference_mode()
    def run_sampled(self, sampler: SlotSampler, rows: list[int], slots: list[int]) -> tuple[Tensor, StepPlan]:
        """One decode step of the sequences `slots`, sampled with the sampler's `rows` (their next ids are
        the input): the packed output (n, W) (`SlotSampler.sample`; a view of the recording's output, valid
        until the next replay) and the step's plan."""
        pool = self.pool
        n = len(slots)
        bucket = bucket_of(n)
        _, static_slots = self._buffers(bucket)
        if bucket not in self._rows:
            self._rows[bucket] = torch.full((bucket,), sampler.pad_row(), dtype=torch.long, device=pool.device)
        static_rows = sampler.rows_tensor(rows, out=self._rows[bucket])
        plan = pool.begin_step(slots, out=static_slots)
        self._check_generation(sampler)
        mode = sampler.mode(rows)
        key = ("sampled", bucket, plan.dense_span, mode)
        if key not in self._graphs:
            def step() -> Tensor:
                logits = self.model.decode_core(sampler.next_input(static_rows), pool,
                                                StepPlan(static_slots, None, plan.dense_span))
                return sampler.sample(logits, static_rows, mode)

            self._graphs[key] = self._record(step, (static_rows, static_slots, *sampler.buffers()),
                                             [static_slots, static_rows], [pool.pad_slot(), sampler.pad_row()])
        replay, out = self._graphs[key]
        replay()
        return out[:n], plan

    def _check_generation(self, sampler: SlotSampler | None = None) -> None:
        """Drop every recording when the pool (or the sampler) reallocated its tensors."""
        if self.pool.generation != self._pool_generation:
            self._graphs.clear()
            self._pool_generation = self.pool.generation
        if sampler is not None and (id(sampler), sampler.generation) != self._sampler_generation:
            self._graphs.clear()
            self._sampler_generation = (id(sampler), sampler.generation)

    def _record(self, step: Callable[[], Tensor], buffers: tuple[Tensor, ...], statics: list[Tensor],
                pads: list[int]) -> tuple[Replay, Tensor]:
        """Record a bucket's step. Warm-up and recording run with every row on the pad slot and pad row (the
        run writes the pool and the sampler in place: the real sequences must not take a step), then the
        real slots and rows go back."""
        real = [t.clone() for t in statics]
        for t, pad in zip(statics, pads, strict=True):
            t.fill_(pad)
        capture = self._capture(self.pool, buffers) if self._capture is not None else cuda_capture
        try:
            with torch.inference_mode():
                result = capture(step)
        finally:
            for t, r in zip(statics, real, strict=True):
                t.copy_(r)
        self.captures += 1
        return result


def decode_and_sample(model: StepModel, pool: DecodePool, slots: list[int], sampler: SlotSampler,
                      rows: list[int], graphs: StepGraphs | None = None) -> Tensor:
    """The engine's decode step: the sequences `slots` of `pool` decode their rows' next ids and sample
    the next ones on the device (through `graphs`' recordings when given, else eagerly: the same device
    function), then the host bookkeeping between steps (`finish_step`). Returns the packed output (n, W)
    (`sampling.download` / `unpack` read it)."""
    full_attention = getattr(model, "full_attention", False)
    if graphs is not None and graphs.pool is pool and not full_attention:
        out, plan = graphs.run_sampled(sampler, rows, slots)
    else:
        plan = pool.begin_step(slots, full_attention=full_attention)
        rows_t = sampler.rows_tensor(rows)
        with torch.inference_mode():
            out = sampler.sample(model.decode_core(sampler.next_input(rows_t), pool, plan), rows_t,
                                 sampler.mode(rows))
    model.finish_step(pool, plan, slots)
    return out
