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

What a recorder records is a `Recording`: a `StepModule` (the step as a function of explicit tensors: the static
buffers, the pool's `STEP_STATE` and the sampler's `STATE`, its bucket, variant and mode fixed) and those
tensors. On CUDA the recording is a `torch.cuda.CUDAGraph` of it (warmed up on a side stream first). On a CPU
the engine can compile it ahead of time instead (`aoti_capture`, `EngineConfig.compile_step`: torch.export,
then AOTInductor). Elsewhere `EagerReplay` stands in: it runs the step eagerly on the same static buffers and
checks that nothing a graph would have captured by address has moved (the CPU tests exercise the buffer
discipline with it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from .pool import STEP_STATE, DecodePool, StepPlan
from .sampling import SlotSampler, StepMode

logger = logging.getLogger(__name__)

Replay = Callable[[], None]

# AOTInductor packages hold code only: the weights are the model's own tensors, handed to each loaded package
# (`_load`), so ten recordings of a large model do not hold ten copies of its weights.
_AOTI_CONFIG = {"aot_inductor.package_constants_in_so": False}


class StepModel(Protocol):
    """What is captured: the device part of a model's decode step (`ReformerLM.decode_core`)."""

    def decode_core(self, ids: Tensor, pool: DecodePool, plan: StepPlan) -> Tensor: ...

    def finish_step(self, pool: DecodePool, plan: StepPlan, slots: list[int]) -> None: ...


class StepModule(nn.Module):
    """One recording's step over explicit tensors: forward(first, slots, *pool state[, *sampler state]), the
    pool's tensors in the order of `STEP_STATE`, the sampler's in that of `SlotSampler.STATE`. Without a
    sampler `first` is the ids (n,) and the result the logits (n, V); with one, `first` is the sampler's rows
    (n,), their next ids are the input and the result the packed sample (`SlotSampler.sample`). The pool and
    the sampler serve as layouts (`with_tensors`): every tensor the step reads or writes is an input, so an
    exported program of it writes the tensors it is given; the model's weights are its own (constants)."""

    def __init__(self, model: StepModel, pool: DecodePool, dense_span: int, sampler: SlotSampler | None = None,
                 mode: StepMode | None = None) -> None:
        super().__init__()
        self.model = model
        self.layout, self.sampler, self.dense_span, self.mode = pool, sampler, dense_span, mode

    def forward(self, first: Tensor, slots: Tensor, *tensors: Tensor) -> Tensor:
        n = len(STEP_STATE)
        pool = self.layout.with_tensors(**dict(zip(STEP_STATE, tensors[:n], strict=True)))
        plan = StepPlan(slots, None, self.dense_span)
        if self.sampler is None:
            return self.model.decode_core(first, pool, plan)
        sampler = self.sampler.with_tensors(*tensors[n:])
        return sampler.sample(self.model.decode_core(sampler.next_input(first), pool, plan), first, self.mode)


@dataclass
class Recording:
    """What a recorder records: `module(*inputs)`, the inputs being the very tensors every replay reads."""

    module: StepModule
    inputs: tuple[Tensor, ...]

    def __call__(self) -> Tensor:
        return self.module(*self.inputs)


def bucket_of(n: int) -> int:
    """The batch bucket of n rows: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def _pool_addresses(pool: DecodePool) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in pool.state())


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


def aoti_available() -> bool:
    """Whether this torch has AOTInductor's packaging API (torch >= 2.6) for `aoti_capture`."""
    inductor = getattr(torch, "_inductor", None)
    return all(hasattr(inductor, f) for f in ("aoti_compile_and_package", "aoti_load_package"))


def compile_cache_dir() -> Path | None:
    """Where `aoti_capture` keeps compiled steps: $REFORMER_COMPILE_CACHE_DIR, else
    $XDG_CACHE_HOME/reformer-serve/compiled-steps (~/.cache/...); an empty $REFORMER_COMPILE_CACHE_DIR turns the
    cache off."""
    configured = os.environ.get("REFORMER_COMPILE_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reformer-serve" / "compiled-steps"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux): a package compiled for one vector ISA must not load on another CPU."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def program_key(program: torch.export.ExportedProgram) -> str:
    """A digest of everything an AOTInductor package of `program` is compiled from: the graph's code, its inputs'
    shapes, strides and dtypes, its weights and constants (bytes), torch's version and the CPU. Input values are
    not in it (`torch.export.save` would hash the example inputs too)."""
    h = hashlib.sha256(f"{torch.__version__} {platform.machine()} {_cpu_flags()} {_AOTI_CONFIG}".encode())
    h.update(program.graph_module.code.encode())
    for node in program.graph.nodes:
        if node.op == "placeholder":
            v = node.meta.get("val")
            h.update(f"{node.name} {tuple(v.shape)} {tuple(v.stride())} {v.dtype}".encode())
    for name, t in sorted({**program.state_dict, **program.constants}.items()):
        h.update(name.encode())
        if isinstance(t, Tensor):
            h.update(f"{tuple(t.shape)} {t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:40]


def _compile(program: torch.export.ExportedProgram, path: str) -> str:
    # a copy of the options: AOTInductor adds its own keys to the dict it is given
    return torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=dict(_AOTI_CONFIG))


def _load(path: str, program: torch.export.ExportedProgram) -> Callable[..., Tensor]:
    runner = torch._inductor.aoti_load_package(path)
    tensors = {**program.state_dict, **program.constants}
    runner.load_constants({name: tensors[name] for name in runner.get_constant_fqns()}, check_full_update=True,
                          user_managed=True)
    return runner


def _compiled_package(program: torch.export.ExportedProgram) -> Callable[..., Tensor]:
    """`program` compiled by AOTInductor and loaded, from the compile cache when it holds it (written
    atomically, so a crash never leaves a partial package behind)."""
    cache = compile_cache_dir()
    if cache is not None:
        path = cache / f"step-{program_key(program)}.pt2"
        if path.is_file():
            try:
                return _load(str(path), program)
            except Exception as exc:  # a damaged entry: compile it again
                logger.warning("compiled step %s does not load (%s): compiling it again", path, exc)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=".part-", suffix=".pt2")  # AOTInductor wants *.pt2
            os.close(fd)
            try:
                _compile(program, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return _load(str(path), program)
        except OSError as exc:
            logger.warning("compile cache %s not writable (%s): compiling without it", cache, exc)
    with tempfile.TemporaryDirectory(prefix="reformer_step_") as tmp:
        return _load(_compile(program, str(Path(tmp) / "step.pt2")), program)


def aoti_capture(pool: DecodePool) -> Callable[[Recording], tuple[Replay, Tensor]]:
    """The recorder off CUDA (`EngineConfig.compile_step`): the recording's module exported
    (`torch.export.export`, its inputs as the program's inputs, written in place) and compiled ahead of time by
    AOTInductor (`torch._inductor.aoti_compile_and_package`, loaded with `aoti_load_package`: C++ kernels and a
    C++ runner, reading the model's own weight tensors). A replay runs the compiled program on the recording's
    inputs and copies its output into the recording's. No Python runs between its kernels and none guards the call, as a CUDA graph
    replays without checks: the inputs keep their addresses (a pool or sampler that reallocates drops every
    recording: `StepGraphs._check_generation`) and the recording's Python values (bucket, dense span, sampling
    mode) are in its key. The first run, every row on the pad slot and row, warms it. Needs a C++ compiler.

    Compiling is inductor's code generation, in Python: ~20 s for a greedy step of the bundled model on this
    project's 2-core CPU, ~80 s for a sampled one (docs/benchmarks.md section 7). Packages are kept in
    `compile_cache_dir()` under `program_key`, so a restarted server loads them in milliseconds."""

    def capture(step: Recording) -> tuple[Replay, Tensor]:
        with torch.inference_mode(False), torch.no_grad():
            program = torch.export.export(step.module, step.inputs)
        runner = _compiled_package(program)
        out = runner(*step.inputs).clone()

        def replay() -> None:
            out.copy_(runner(*step.inputs))

        return replay, out

    return capture


class EagerReplay:
    """A stand-in for a captured graph where there is none: replays by running the step again, into the
    output buffer of the first run, after checking that the recording's inputs (static buffers, pool and
    sampler state) and the pool's tensors are the ones the first run read (what a real graph would silently
    keep using)."""

    def __init__(self, pool: DecodePool) -> None:
        self.pool = pool
        self.replays = 0

    def __call__(self, step: Recording) -> tuple[Replay, Tensor]:
        out = step()

        def addresses() -> tuple[int, ...]:
            return _pool_addresses(self.pool) + tuple(t.data_ptr() for t in step.inputs)

        first = addresses()

        def replay() -> None:
            now = addresses()
            if now != first:
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
                 capture: Callable[[DecodePool], Callable] | None = None) -> None:
        self.model, self.pool = model, pool
        self._capture = capture
        self._graphs: dict[tuple, tuple[Replay, Tensor]] = {}
        self._ids: dict[int, Tensor] = {}
        self._slots: dict[int, Tensor] = {}
        self._rows: dict[int, Tensor] = {}
        self._pool_generation = -1
        self._sampler_generation: tuple[int, int] | None = None
        self.captures = 0

    @torch.inference_mode(False)  # normal tensors (an exported program takes them as inputs), updated in place
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
            step = Recording(StepModule(self.model, pool, plan.dense_span), (static_ids, static_slots, *pool.state()))
            self._graphs[key] = self._record(step, [static_slots], [pool.pad_slot()])
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
            with torch.inference_mode(False):
                self._rows[bucket] = torch.full((bucket,), sampler.pad_row(), dtype=torch.long, device=pool.device)
        static_rows = sampler.rows_tensor(rows, out=self._rows[bucket])
        plan = pool.begin_step(slots, out=static_slots)
        self._check_generation(sampler)
        mode = sampler.mode(rows)
        key = ("sampled", bucket, plan.dense_span, mode)
        if key not in self._graphs:
            step = Recording(StepModule(self.model, pool, plan.dense_span, sampler, mode),
                             (static_rows, static_slots, *pool.state(), *sampler.buffers()))
            self._graphs[key] = self._record(step, [static_slots, static_rows], [pool.pad_slot(), sampler.pad_row()])
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

    def _record(self, step: Recording, statics: list[Tensor], pads: list[int]) -> tuple[Replay, Tensor]:
        """Record a bucket's step. Warm-up and recording run with every row on the pad slot and pad row (the
        run writes the pool and the sampler in place: the real sequences must not take a step), then the
        real slots and rows go back."""
        real = [t.clone() for t in statics]
        for t, pad in zip(statics, pads, strict=True):
            t.fill_(pad)
        capture = self._capture(self.pool) if self._capture is not None else cuda_capture
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
