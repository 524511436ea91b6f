"""Run exported graphs (TorchScript, ONNX Runtime or torch.export .pt2) behind the eager model's interface.

`ExportedModel` offers what the engine and `generate` use from `ReformerLM`: `config`, `prefill`,
`prefill_iter`, `decode_step`, `new_decode_pool`, `cache_bytes`, `parameters()`. Its sequences live in a
`DecodePool` as the eager model's do (its caches are `ReformerCache`s), and the decode steps are driven by
the eager model's own driver (`model.PooledDecoder`): only the step's device part and the dense-to-LSH sort
run as graphs. The server selects it with `--backend torchscript|onnx|pt2` through
`load_exported(model_dir, backend, device, dtype)`.

How the graphs are driven (docs/export.md):
  * decode: the decode graph is `ReformerLM.decode_compute` over the pool's tensors; its updates are written
    with `DecodePool.apply_step` (what the eager `decode_core` does after computing); a sequence reaching
    one LSH chunk is sorted by the sort graph (`DecodePool.hash_due`);
  * prompts whose padded length is above one LSH chunk (or any prompt without LSH layers) go through the
    prefill graph, padded with pad tokens to the length transformers pads to, and its state is written into
    the pool; shorter prompts (the dense regime, at most one LSH chunk) are fed token by token through the
    decode graph, which computes the same rows there (dense attention), and left un-hashed as the eager
    prefill leaves them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .cache import ReformerCache
from .config import ReformerConfig
from .model import PooledDecoder, row_capacities
from .pool import STEP_STATE as STATE
from .pool import DecodePool, StepPlan, StepUpdates, upload

logger = logging.getLogger(__name__)

BACKENDS = ("torchscript", "onnx", "pt2")
METADATA = "export.json"


class ExportedModelError(ValueError):
    """An export directory that cannot be served: missing files, another format, unsupported settings."""


# ---------------------------------------------------------------------------------------------------
# Graph runners: one callable per graph, tensors in and out
# ---------------------------------------------------------------------------------------------------
class _TorchGraph:
    """A TorchScript or torch.export graph, called under inference mode."""

    def __init__(self, path: Path, kind: str, device: str) -> None:
        if kind == "torchscript":
            self._fn = torch.jit.load(str(path), map_location=device)
            self._fn.eval()
            self.parameters = list(self._fn.parameters())
        else:
            program = torch.export.load(str(path))
            self._fn = program.module()
            self.parameters = [p for p in program.state_dict.values() if isinstance(p, torch.nn.Parameter)]

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            return tuple(self._fn(*inputs))


class _OrtGraph:
    """An ONNX graph in onnxruntime on CPU. Idle ORT threads would busy-wait and steal the cores that torch
    code in the same process (the engine, the server) needs: spinning is turned off."""

    def __init__(self, path: Path, num_threads: int, input_names: Sequence[str]) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._names = list(input_names)
        self._inputs = {i.name for i in self._session.get_inputs()}  # an input the graph never reads is dropped
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.parameters: list[Tensor] = []

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        # IO binding hands ORT the tensors' memory (the pool's tensors are not copied)
        binding = self._session.io_binding()
        arrays = [t.detach().contiguous().numpy() for t in inputs]  # kept alive until the run returns
        for name, arr in zip(self._names, arrays, strict=True):
            if name in self._inputs:
                binding.bind_cpu_input(name, arr)
        for name in self._outputs:
            binding.bind_output(name)
        self._session.run_with_iobinding(binding)
        return tuple(torch.from_numpy(o) for o in binding.copy_outputs_to_cpu())


# ---------------------------------------------------------------------------------------------------
# The model facade
# ---------------------------------------------------------------------------------------------------
class ExportedModel(PooledDecoder):
    """Exported prefill, decode-step and sort graphs with `ReformerLM`'s inference interface (fp32)."""

    def __init__(self, path: str | Path, backend: str, *, device: str = "cpu", num_threads: int | None = None) -> None:
        path = Path(path)
        if backend not in BACKENDS:
            raise ExportedModelError(f"unknown exported backend {backend!r}; one of {', '.join(BACKENDS)}")
        meta_path = path / METADATA
        if not meta_path.exists():
            raise ExportedModelError(f"{meta_path}: missing (not a reformer-export directory)")
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        if self.metadata.get("format_version") != 2:
            raise ExportedModelError(f"{path}: exported by another version of reformer-export (graphs of the "
                                     f"format {self.metadata.get('format_version')}, this one reads 2): re-export")
        files = self.metadata.get("files", {}).get(backend)
        if not files:
            have = ", ".join(sorted(self.metadata.get("files", {}))) or "none"
            raise ExportedModelError(f"{path}: no {backend} graphs here (formats exported: {have})")
        if backend == "onnx" and device != "cpu":
            raise ExportedModelError("the onnx backend runs on CPU only (onnxruntime CPU execution provider)")
        self.backend = backend
        self.config = ReformerConfig.from_dict(self.metadata["config"])
        self.num_hashes = int(self.metadata["num_hashes"])
        self.full_attention = False
        self._layout = self.metadata["pool_layout"]
        self._device = torch.device(device)
        self._step_graphs = {}
        self.num_lsh = self.config.attn_layers.count("lsh")
        self._min_padded = int(self.metadata["limits"]["prefill_min_padded"])  # local-only: no prefill graph below
        threads = num_threads or torch.get_num_threads()
        names = {"prefill": ("input_ids", "lengths"), "decode": ("input_ids", "slots", *STATE), "sort": ("keys",)}
        self._graphs: dict[str, Any] = {}
        for name, file in files.items():
            if backend == "onnx":
                self._graphs[name] = _OrtGraph(path / file, threads, names[name])
            else:
                self._graphs[name] = _TorchGraph(path / file, backend, device)
        logger.info("loaded exported %s graphs from %s (%d layers, rotations %s)", backend, path,
                    self.config.num_hidden_layers, self.rotation_fingerprint())

    # ---- what the engine and the server read -------------------------------------------------------
    def parameters(self) -> Iterator[Tensor]:
        """The graphs' weights where the runtime exposes them (TorchScript, .pt2); for ONNX Runtime, which
        keeps them inside its session, one empty tensor that tells callers the device (CPU)."""
        params = self._graphs["prefill"].parameters
        yield from params if params else [torch.empty(0, device=self._device)]

    def rotation_fingerprint(self) -> str:
        return str(self.metadata.get("rotation_fingerprint", ""))

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def eval(self) -> ExportedModel:
        return self

    def new_decode_pool(self, sequences: int = 1, tokens: int = 0, **layout: int) -> DecodePool:
        """A decode pool of the layout the decode graph was exported for (its page and delta sizes)."""
        if any(layout.get(k, v) != v for k, v in self._layout.items()):
            raise ValueError(f"the exported decode graph works on pools of layout {self._layout}")
        return super().new_decode_pool(sequences, tokens, **self._layout)

    # ---- the step's device part and the transition: graphs ----------------------------------------
    def decode_core(self, ids: Tensor, pool: DecodePool, plan: StepPlan) -> Tensor:
        """`ReformerLM.decode_core` with its computation run by the decode graph."""
        out = self._graphs["decode"](ids, plan.slots, *(getattr(pool, name) for name in STATE))
        logits, nk, nv, dbk, dor, ck, cv = out
        updates = StepUpdates(lsh={j: (nk[j], nv[j], dbk[j], dor[j]) for j in range(nk.shape[0])},
                              local={j: (ck[j], cv[j]) for j in range(ck.shape[0])})
        pool.apply_step(pool.step_view(plan), updates)
        return logits

    def sort_keys(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        return self._graphs["sort"](keys)

    # ---- prefill -------------------------------------------------------------------------------------
    def prefill(self, input_ids: Tensor, capacity: int | Sequence[int] | None = None, last_only: bool = False,
                pool: DecodePool | None = None) -> tuple[Tensor, ReformerCache]:
        gen = self.prefill_iter(input_ids, capacity=capacity, last_only=last_only, pool=pool)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def prefill_iter(
        self, input_ids: Tensor, *, capacity: int | Sequence[int] | None = None, last_only: bool = True,
        work_tokens: int | None = None, pool: DecodePool | None = None,
    ) -> Generator[tuple[int, int], None, tuple[Tensor, ReformerCache]]:
        """Like `ReformerLM.prefill_iter`: yields (done, total); returns (logits, cache). A prefill-graph call
        is one unit (`work_tokens` cannot split a graph); a dense-regime prompt yields once per token."""
        B, T = input_ids.shape
        cfg = self.config
        cfg.check_prompt_length(T)
        caps = row_capacities(capacity, B, T)
        if pool is None:
            pool = self.new_decode_pool(B, sum(caps) + B)
        seqs = []
        done_ok = False
        try:
            for cap in caps:
                seqs.append(pool.allocate(cap))
            slots = [s.slot for s in seqs]
            ids = input_ids.to(self._device)
            mode = torch.inference_mode()  # entered around each unit, never across a yield (as the eager prefill)
            if (cfg.padded_length(T) <= cfg.lsh_attn_chunk_length if self.num_lsh
                    else -(-T // cfg.chunk_lcm) * cfg.chunk_lcm < self._min_padded):
                # the dense regime of an LSH model (at most one LSH chunk), or one chunk of a local-only
                # model: token by token through the decode step, which computes the same rows there; never
                # hashed here (the eager prefill leaves such a prompt un-hashed, even one of exactly one chunk)
                pool.finish_prefill(seqs, 0, hashed=False)
                steps = []
                for t in range(T):
                    with mode:
                        plan = pool.begin_step(slots)
                        steps.append(self.decode_core(ids[:, t], pool, plan))
                        pool.end_step(plan, slots)
                    yield ((t + 1) * B, T * B)
                logits = torch.stack(steps, dim=1)  # (B, T, V)
            else:
                with mode:
                    logits = self._prefill_graph(ids, pool, seqs)
                yield (B * T, B * T)
            done_ok = True
        finally:
            if not done_ok:
                for seq in seqs:
                    seq.release()
        return (logits[:, T - 1 : T] if last_only else logits[:, :T]).clone(), ReformerCache(seqs)

    def _prefill_graph(self, ids: Tensor, pool: DecodePool, seqs: list) -> Tensor:
        """Run the prefill graph on ids (B, T), padded to the length transformers pads to, and write the
        sequences' state into their slots of `pool`. Returns the logits (B, Tp, V)."""
        cfg = self.config
        B, T = ids.shape
        Tp = -(-T // cfg.chunk_lcm) * cfg.chunk_lcm  # what transformers pads to above one chunk; below,
        # pads after every real position change nothing (causal masks; LSH prompts there are dense)
        if Tp > T:
            ids = torch.cat([ids, ids.new_full((B, Tp - T), cfg.pad_token_id)], dim=1)
        lengths = torch.full((B,), T, dtype=torch.long, device=self._device)
        logits, lk, lv, lo, lb, ck, cv = self._graphs["prefill"](ids, lengths)
        slots = [s.slot for s in seqs]
        rows = pool.rows_of(slots, T).view(-1)  # (B * T,) pool rows of positions [0, T)
        H, D = cfg.num_attention_heads, cfg.attention_head_size
        for j in range(lk.shape[0]):
            pool.keys[j].index_copy_(1, rows, lk[j, :, :, :T].transpose(0, 1).reshape(H, B * T, D))
            pool.values[j].index_copy_(1, rows, lv[j, :, :, :T].transpose(0, 1).reshape(H, B * T, D))
            # pads sort last in every round: the first T entries are the real positions
            pool.set_order(j, slots, lo[j, ..., :T].long(), lb[j, ..., :T].long())
        sl = upload(slots, self._device)
        for j in range(ck.shape[0]):
            pool.local_keys[j].index_copy_(0, sl, ck[j])
            pool.local_values[j].index_copy_(0, sl, cv[j])
        pool.finish_prefill(seqs, T, hashed=self.num_lsh > 0)
        return logits


def load_exported(path: str | Path, backend: str, device: str = "cpu", dtype: str = "float32") -> ExportedModel:
    """Server factory: `--backend torchscript|onnx|pt2` over a `reformer-export` output directory.

    Signature as `reformer_server.backend.Loader` (model_dir, device, dtype name). The graphs are fp32.
    """
    if dtype not in ("float32", "auto"):
        raise ExportedModelError(f"exported graphs run in float32; --dtype {dtype} is not available with them")
    return ExportedModel(path, backend, device=device)
