"""Run exported graphs (TorchScript, ONNX Runtime or torch.export .pt2) behind the eager model's interface.

`ExportedModel` offers what the engine and `generate` use from `ReformerLM`: `config`, `prefill`,
`prefill_iter`, `decode_step`, `cache_bytes`, `batch_caches`, `parameters()`; its cache (`ExportedCache`) has
`nbytes`, `lengths`, `split()` and `ExportedCache.batch`. The server selects it with `--backend torchscript|onnx`
through `load_exported(model_dir, backend, device, dtype)`.

How the two graphs are driven (docs/export.md):
  * prompts whose padded length is above one LSH chunk (or any prompt without LSH layers) go through the
    prefill graph, padded with pad tokens to the length transformers pads to;
  * shorter prompts (the dense regime, at most one LSH chunk) are fed token by token through the decode graph,
    which computes the same rows there (dense attention), then left un-hashed as the eager prefill leaves them;
  * each decode step returns the new token's keys/values, which are written in place at its position here,
    and the updated bucket bookkeeping; cache capacity doubles when full (amortised, as the eager cache).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .cache import ReformerCache
from .config import ReformerConfig
from .model import row_capacities

logger = logging.getLogger(__name__)

BACKENDS = ("torchscript", "onnx", "pt2")
FORMAT_OF_BACKEND = {"torchscript": "torchscript", "onnx": "onnx", "pt2": "pt2"}
FILE_SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "pt2": ".pt2"}
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

    def __init__(self, path: Path, num_threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.parameters: list[Tensor] = []

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        # IO binding hands ORT the arrays' memory; `InferenceSession.run` copied the whole cache every step
        binding = self._session.io_binding()
        arrays = [t.detach().contiguous().numpy() for t in inputs]  # kept alive until the run returns
        for name, arr in zip(self._inputs, arrays, strict=True):
            binding.bind_cpu_input(name, arr)
        for name in self._outputs:
            binding.bind_output(name)
        self._session.run_with_iobinding(binding)
        return tuple(torch.from_numpy(o) for o in binding.copy_outputs_to_cpu())


# ---------------------------------------------------------------------------------------------------
# The cache of the exported graphs
# ---------------------------------------------------------------------------------------------------
@dataclass
class ExportedSequence:
    """One sequence's decode state, laid out as the decode graph takes it (batch dimension of 1)."""

    length: int
    hashed: bool  # decodes by LSH windows (false while shorter than one LSH chunk)
    lsh_keys: Tensor  # (L, 1, H, S, D)
    lsh_values: Tensor  # (L, 1, H, S, D)
    lsh_order: Tensor  # (L, 1, H, R, S) int32
    lsh_counts: Tensor  # (L, 1, H, R, K) int32
    local_keys: Tensor  # (M, 1, H, ring, D)
    local_values: Tensor  # (M, 1, H, ring, D)

    @property
    def capacity(self) -> int:
        return self.lsh_keys.shape[3]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.lsh_keys, self.lsh_values, self.lsh_order, self.lsh_counts,
                                      self.local_keys, self.local_values))

    def reserve(self, needed: int) -> None:
        """Room for `needed` positions; capacity doubles so that growth is amortised, never per step."""
        if needed > self.capacity:
            self.grow_to(max(needed, 2 * self.capacity))

    def grow_to(self, new: int) -> None:
        if new <= self.capacity:
            return
        for name in ("lsh_keys", "lsh_values", "lsh_order"):
            old = getattr(self, name)
            shape = list(old.shape)
            shape[-1 if name == "lsh_order" else 3] = new
            grown = old.new_zeros(shape)
            if name == "lsh_order":
                grown[..., : old.shape[-1]] = old
            else:
                grown[:, :, :, : old.shape[3]] = old
            setattr(self, name, grown)

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.lsh_keys, self.lsh_values, self.lsh_order, self.lsh_counts, self.local_keys, self.local_values)

    def release(self) -> None:
        """Give the state's memory back now (idempotent); the sequence cannot decode afterwards."""
        for name in ("lsh_keys", "lsh_values", "lsh_order", "lsh_counts", "local_keys", "local_values"):
            setattr(self, name, getattr(self, name).new_empty(0))


class ExportedCache(ReformerCache):
    """A batch of per-sequence exported states (possibly of different lengths); grouping copies nothing.
    The batching logic is the eager cache's: only the per-sequence state differs."""


# ---------------------------------------------------------------------------------------------------
# The model facade
# ---------------------------------------------------------------------------------------------------
class ExportedModel:
    """Exported prefill + decode graphs with `ReformerLM`'s inference interface (fp32).

    `batch_mode`: "loop" runs the decode graph once per sequence (no copies: a step's cost does not grow
    with the other sequences' capacity); "stack" copies the sequences' states into one batch, runs the graph
    once and writes back (fewer calls for short contexts; the copies grow with the capacity).
    """

    def __init__(self, path: str | Path, backend: str, *, device: str = "cpu", num_threads: int | None = None,
                 batch_mode: str = "loop") -> None:
        path = Path(path)
        if backend not in BACKENDS:
            raise ExportedModelError(f"unknown exported backend {backend!r}; one of {', '.join(BACKENDS)}")
        if batch_mode not in ("loop", "stack"):
            raise ExportedModelError(f"batch_mode must be 'loop' or 'stack', got {batch_mode!r}")
        meta_path = path / METADATA
        if not meta_path.exists():
            raise ExportedModelError(f"{meta_path}: missing (not a reformer-export directory)")
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        files = self.metadata.get("files", {}).get(FORMAT_OF_BACKEND[backend])
        if not files:
            have = ", ".join(sorted(self.metadata.get("files", {}))) or "none"
            raise ExportedModelError(f"{path}: no {backend} graphs here (formats exported: {have})")
        if backend == "onnx" and device != "cpu":
            raise ExportedModelError("the onnx backend runs on CPU only (onnxruntime CPU execution provider)")
        self.backend = backend
        self.batch_mode = batch_mode
        self.config = ReformerConfig.from_dict(self.metadata["config"])
        cfg = self.config
        self.num_lsh = cfg.attn_layers.count("lsh")
        self.num_local = cfg.attn_layers.count("local")
        self.H, self.D = cfg.num_attention_heads, cfg.attention_head_size
        self.R, self.K = int(self.metadata["num_hashes"]), cfg.total_buckets
        self.ring = cfg.local_ring_size
        self.min_capacity = int(self.metadata["limits"]["min_capacity"])
        self._device = torch.device(device)
        threads = num_threads or torch.get_num_threads()
        if backend == "onnx":
            self._prefill: Any = _OrtGraph(path / files["prefill"], threads)
            self._decode: Any = _OrtGraph(path / files["decode"], threads)
        else:
            self._prefill = _TorchGraph(path / files["prefill"], backend, device)
            self._decode = _TorchGraph(path / files["decode"], backend, device)
        logger.info("loaded exported %s graphs from %s (%d layers, rotations %s)", backend, path,
                    cfg.num_hidden_layers, self.rotation_fingerprint())

    # ---- what the engine and the server read -------------------------------------------------------
    def parameters(self) -> Iterator[Tensor]:
        """The graphs' weights where the runtime exposes them (TorchScript, .pt2); for ONNX Runtime, which
        keeps them inside its session, one empty tensor that tells callers the device (CPU)."""
        params = self._prefill.parameters
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

    @staticmethod
    def batch_caches(caches: Sequence[ExportedCache]) -> ExportedCache:
        return ExportedCache.batch(caches)

    def cache_bytes(self, num_tokens: int) -> int:
        """Projected cache bytes of one sequence of `num_tokens` positions (capacity = num_tokens)."""
        n = max(num_tokens, self.min_capacity)
        lsh = 2 * self.H * n * self.D * 4 + self.H * self.R * n * 4 + self.H * self.R * self.K * 4
        return self.num_lsh * lsh + self.num_local * 2 * self.H * self.ring * self.D * 4

    def cache_bytes_per_token(self) -> float:
        return self.num_lsh * (2 * self.H * self.D * 4 + self.H * self.R * 4)

    # ---- prefill -------------------------------------------------------------------------------------
    def _uses_prefill_graph(self, T: int) -> bool:
        # The prefill graph is the hashed regime; at most one LSH chunk is dense attention (decode graph).
        return self.num_lsh == 0 or self.config.padded_length(T) > self.config.lsh_attn_chunk_length

    def _empty_sequence(self, capacity: int) -> ExportedSequence:
        S = max(capacity, self.min_capacity)
        H, D, R, dev = self.H, self.D, self.R, self._device
        return ExportedSequence(
            length=0, hashed=False,
            lsh_keys=torch.zeros(self.num_lsh, 1, H, S, D, device=dev),
            lsh_values=torch.zeros(self.num_lsh, 1, H, S, D, device=dev),
            lsh_order=torch.zeros(self.num_lsh, 1, H, R, S, dtype=torch.int32, device=dev),
            lsh_counts=torch.zeros(self.num_lsh, 1, H, R, self.K, dtype=torch.int32, device=dev),
            local_keys=torch.zeros(self.num_local, 1, H, self.ring, D, device=dev),
            local_values=torch.zeros(self.num_local, 1, H, self.ring, D, device=dev),
        )

    def prefill(self, input_ids: Tensor, capacity: int | Sequence[int] | None = None,
                last_only: bool = False) -> tuple[Tensor, ExportedCache]:
        gen = self.prefill_iter(input_ids, capacity=capacity, last_only=last_only)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    def prefill_iter(
        self, input_ids: Tensor, *, capacity: int | Sequence[int] | None = None, last_only: bool = True,
        work_tokens: int | None = None,
    ) -> Generator[tuple[int, int], None, tuple[Tensor, ExportedCache]]:
        """Like `ReformerLM.prefill_iter`: yields (done, total); returns (logits, cache). A prefill-graph call
        is one unit (`work_tokens` cannot split a graph); a dense-regime prompt yields once per token."""
        B, T = input_ids.shape
        self.config.check_prompt_length(T)
        caps = row_capacities(capacity, B, T)
        if not self._uses_prefill_graph(T):
            seqs, rows = [], []
            for b in range(B):
                seq = self._empty_sequence(caps[b])
                step_logits = []
                for t in range(T):
                    step_logits.append(self._decode_one(seq, input_ids[b : b + 1, t : t + 1]))
                    yield (b * T + t + 1, B * T)
                seq.hashed = False  # the eager prefill leaves a dense-regime prompt un-hashed
                seqs.append(seq)
                rows.append(torch.cat(step_logits, dim=1))  # (1, T, V)
            logits = torch.cat(rows, dim=0)
            return (logits[:, -1:] if last_only else logits), ExportedCache(seqs)
        lcm = self.config.chunk_lcm
        Tp = -(-T // lcm) * lcm
        ids = input_ids.to(self._device)
        if Tp > T:
            ids = torch.cat([ids, ids.new_full((B, Tp - T), self.config.pad_token_id)], dim=1)
        lengths = torch.full((B,), T, dtype=torch.long, device=self._device)
        logits, lk, lv, lo, lc, ck, cv = self._prefill(ids, lengths)
        seqs = []
        for b in range(B):
            seq = self._empty_sequence(caps[b])
            seq.lsh_keys[:, 0, :, :T] = lk[:, b, :, :T]
            seq.lsh_values[:, 0, :, :T] = lv[:, b, :, :T]
            seq.lsh_order[:, 0, :, :, :T] = lo[:, b, :, :, :T]
            seq.lsh_counts[:, 0] = lc[:, b]
            seq.local_keys[:, 0] = ck[:, b]
            seq.local_values[:, 0] = cv[:, b]
            seq.length, seq.hashed = T, self.num_lsh > 0
            seqs.append(seq)
        yield (B * T, B * T)
        return (logits[:, T - 1 : T] if last_only else logits[:, :T]).clone(), ExportedCache(seqs)

    # ---- decode --------------------------------------------------------------------------------------
    def _write(self, seq: ExportedSequence, out: tuple[Tensor, ...], row: int) -> None:
        """Apply one decode-graph result (row `row` of its batch) to `seq`: deltas written in place."""
        _, hashed, nk, nv, order, counts, ck, cv = out
        T = seq.length
        seq.lsh_keys[:, 0, :, T] = nk[:, row]
        seq.lsh_values[:, 0, :, T] = nv[:, row]
        seq.lsh_order = order[:, row : row + 1]
        seq.lsh_counts = counts[:, row : row + 1]
        seq.local_keys[:, 0, :, T % self.ring] = ck[:, row]
        seq.local_values[:, 0, :, T % self.ring] = cv[:, row]
        seq.hashed = bool(hashed[row])
        seq.length = T + 1

    def _decode_one(self, seq: ExportedSequence, input_ids: Tensor) -> Tensor:
        if seq.length + 1 > self.config.max_context:
            raise ValueError(f"sequence would exceed the model's context of {self.config.max_context}")
        seq.reserve(seq.length + 1)
        out = self._decode(
            input_ids.to(self._device), torch.tensor([seq.length], device=self._device),
            torch.tensor([seq.hashed], device=self._device), *seq.tensors())
        self._write(seq, out, 0)
        return out[0]  # (1, 1, V)

    def decode_step(self, input_ids: Tensor, cache: ExportedCache) -> tuple[Tensor, ExportedCache]:
        """One token for every sequence: (B, 1) -> logits (B, 1, V); the sequences' states are updated."""
        seqs = cache.sequences
        if input_ids.shape[0] != len(seqs):
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but the cache holds {len(seqs)} sequences")
        if self.batch_mode == "loop" or len(seqs) == 1:
            return torch.cat([self._decode_one(s, input_ids[b : b + 1]) for b, s in enumerate(seqs)]), cache
        return self._decode_stacked(input_ids, seqs), cache

    def _decode_stacked(self, input_ids: Tensor, seqs: list[ExportedSequence]) -> Tensor:
        for s in seqs:
            if s.length + 1 > self.config.max_context:
                raise ValueError(f"sequence would exceed the model's context of {self.config.max_context}")
        for s in seqs:
            s.reserve(s.length + 1)
        S = max(s.capacity for s in seqs)  # one batch needs one capacity
        for s in seqs:
            s.grow_to(S)
        stacked = [torch.cat(ts, dim=1) for ts in zip(*(s.tensors() for s in seqs), strict=True)]
        out = self._decode(
            input_ids.to(self._device), torch.tensor([s.length for s in seqs], device=self._device),
            torch.tensor([s.hashed for s in seqs], device=self._device), *stacked)
        for b, s in enumerate(seqs):
            self._write(s, out, b)
        return out[0]


def load_exported(path: str | Path, backend: str, device: str = "cpu", dtype: str = "float32") -> ExportedModel:
    """Server factory: `--backend torchscript|onnx|pt2` over a `reformer-export` output directory.

    Signature as `reformer_server.backend.Loader` (model_dir, device, dtype name). The graphs are fp32.
    """
    if dtype not in ("float32", "auto"):
        raise ExportedModelError(f"exported graphs run in float32; --dtype {dtype} is not available with them")
    return ExportedModel(path, backend, device=device)
