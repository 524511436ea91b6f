"""Export the model's own prefill and decode-step functions as graphs (torch.export, ONNX, TorchScript) and
check them.

`reformer-export --model PATH --format onnx|torchscript|pt2 --out DIR` writes

  * ``decode.{onnx,pt,pt2}``: `ReformerLM.decode_compute` traced, the decode pool's state tensors as inputs
    (see `STATE`) with the step's ids and slots; its outputs are the logits and the step's updates (the rows
    `DecodePool.apply_step` writes), not the pool;
  * ``sort.{onnx,pt,pt2}`` (models with LSH layers): `ReformerLM.sort_keys`, the dense-to-LSH transition of
    a sequence that reaches one LSH chunk (`DecodePool.hash_due`);
  * ``prefill.{onnx,pt,pt2}``: ``input_ids`` int64 (B, Tp) and ``lengths`` int64 (B,) -> ``logits``
    (B, Tp, V) and the decode state of those B sequences (see `PREFILL_OUTPUTS`). The eager prefill is a
    resumable generator whose loops depend on the length and that writes the pool as it goes; it is not
    traced (docs/export.md says why): this graph computes every chunk of a layer at once with the model's
    own projections, hashing (`LSHSelfAttention.hash`), feed-forward and head;
  * ``export.json`` (names, shapes with symbolic dims, limits, the model config) and ``config.json``.

`exported.ExportedModel` keeps a `DecodePool` and drives the graphs with the eager model's own decode driver
(`model.PooledDecoder`). TorchScript files are traced (`torch.jit.trace`): the traced code is the model's
Python, which TorchScript cannot compile; the checks run every graph at shapes other than the example's.

After writing, the CLI reloads the files from disk and checks parity against the eager model
(`verify_export`); it exits non-zero when parity fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .cache import ReformerCache
from .checkpoint import load_model
from .config import ReformerConfig
from .model import (
    LocalSelfAttention,
    LSHSelfAttention,
    ReformerLM,
    _attend_window,
    len_norm,
)
from .pool import STEP_STATE, DecodePool, StepPlan
from .tokenizer import copy_tokenizer_files

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "pt2")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}

PREFILL_INPUTS = ("input_ids", "lengths")
PREFILL_OUTPUTS = ("logits", "lsh_keys", "lsh_values", "lsh_order", "lsh_buckets", "local_keys", "local_values")
STATE = STEP_STATE  # the decode pool's tensors a step reads
DECODE_INPUTS = ("input_ids", "slots", *STATE)
DECODE_OUTPUTS = ("logits", "lsh_new_keys", "lsh_new_values", "lsh_dbuckets", "lsh_dorder", "local_new_keys",
                  "local_new_values")
SORT_INPUTS = ("keys",)
SORT_OUTPUTS = ("order", "buckets")


# ---------------------------------------------------------------------------------------------------
# The decode step and the transition: the model's own functions over tensors in, tensors out
# ---------------------------------------------------------------------------------------------------
class DecodeGraph(nn.Module):
    """`ReformerLM.decode_compute` with the pool's state as inputs: input_ids (n,) int64, slots (n,) int64
    (pool slots), then the `STATE` tensors in their pool layout -> logits (n, V) and the updates stacked by
    kind: lsh_new_keys / lsh_new_values (Ll, n, H, D), lsh_dbuckets / lsh_dorder (Ll, n, H, R, M) int32,
    local_new_keys / local_new_values (Lc, n, H, D). Both attentions are computed for every row (the dense
    one of sequences shorter than one LSH chunk too), each row taking its own, as the eager step does when
    one of its rows is dense."""

    def __init__(self, model: ReformerLM, pool: DecodePool) -> None:
        super().__init__()
        self.model = model
        self.layout = pool  # shapes and bookkeeping only: every tensor the step reads is an input

    def forward(self, input_ids: Tensor, slots: Tensor, keys: Tensor, values: Tensor, order: Tensor,
                cum_static: Tensor, dbuckets: Tensor, dorder: Tensor, local_keys: Tensor, local_values: Tensor,
                page_table: Tensor, len_d: Tensor, hashed_d: Tensor) -> tuple[Tensor, ...]:
        state = (keys, values, order, cum_static, dbuckets, dorder, local_keys, local_values, page_table, len_d,
                 hashed_d)  # in the order of STATE
        pool = self.layout.with_tensors(**dict(zip(STATE, state, strict=True)))
        logits, _, up = self.model.decode_compute(input_ids, pool, StepPlan(slots, None, pool.C))
        n, H, D, R, M = input_ids.shape[0], pool.H, pool.D, pool.R, pool.M
        lsh = [up.lsh[j] for j in range(len(pool.lsh_index))]
        local = [up.local[j] for j in range(len(pool.local_index))]
        return (logits, *(_stack([u[i] for u in lsh], [n, H, D], state[0]) for i in (0, 1)),
                *(_stack([u[i] for u in lsh], [n, H, R, M], state[4]) for i in (2, 3)),
                *(_stack([u[i] for u in local], [n, H, D], state[0]) for i in (0, 1)))


class SortGraph(nn.Module):
    """`ReformerLM.sort_keys`: keys (Ll, S, H, T, D) -> order, buckets (Ll, S, H, R, T) int64."""

    def __init__(self, model: ReformerLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.sort_keys(keys)


def _stack(xs: list[Tensor], shape: list[int], like: Tensor) -> Tensor:
    if not xs:  # a model without layers of this kind: a zero-size stack
        return like.new_zeros([0, *shape])
    return torch.stack(xs)


# ---------------------------------------------------------------------------------------------------
# The prefill graph: every chunk of a layer at once (the eager prefill is not traceable: docs/export.md)
# ---------------------------------------------------------------------------------------------------
def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """torch.logaddexp as its CPU kernel computes it (finite inputs). The ONNX exporter lowers logaddexp to
    log(exp(a) + exp(b)), which underflows to -inf at the -1e5 of a token that sees only itself."""
    m = torch.maximum(a, b)
    return m + torch.log1p(torch.exp(-torch.abs(a - b)))


def _windows(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    """Concatenate chunk neighbours along the dimension after `dim`: chunk m gets chunks m-before .. m+after,
    wrapping around the chunk axis (transformers' `_look_adjacent`). x (..., M, C, ...) -> (..., M, W, ...)."""
    parts = [torch.roll(x, shifts=-o, dims=dim) for o in range(-before, after + 1)]
    return torch.cat(parts, dim=dim + 1)


def _lsh_prefill(attn: LSHSelfAttention, K: int, x: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
    """x (B, Tp, E) layer-normed, Tp a multiple of C above C -> out (B, Tp, H*D), keys, values (B, H, Tp, D),
    order (B, H, R, Tp) int32 (positions in (bucket, position) order, pads last), buckets (B, H, R, Tp) int32.

    Positions >= lengths[b] are pads: they sort after every real token of their round (as transformers'
    extra pad bucket) and, lying after every real position, are hidden from real queries by the causal mask.
    """
    B, Tp = x.shape[0], x.shape[1]
    H, D, C, R = attn.H, attn.D, attn.C, attn.num_hashes
    qk, v = attn._project(x)  # (B, H, Tp, D)
    k = len_norm(qk) / math.sqrt(D)
    pos = torch.arange(Tp, device=x.device)
    real = (pos.unsqueeze(0) < lengths.unsqueeze(1)).view(B, 1, 1, Tp)
    buckets = attn.hash(qk)  # (B, H, R, Tp)
    # unique sort keys (bucket, position): no stable sort needed, so every exporter agrees on the order
    order = torch.argsort(torch.where(real, buckets, K) * Tp + pos, dim=-1)  # (B, H, R, Tp)
    rows = order.reshape(B, H, R * Tp, 1)  # sorted slot -> position, rounds laid end to end
    qs = torch.gather(qk, 2, rows.expand(B, H, R * Tp, D)).view(B, H, -1, C, D)  # (B, H, M, C, D)
    ks = torch.gather(k, 2, rows.expand(B, H, R * Tp, D)).view(B, H, -1, C, D)
    vs = torch.gather(v, 2, rows.expand(B, H, R * Tp, D)).view(B, H, -1, C, D)
    ps = order.view(B, H, -1, C)  # (B, H, M, C) positions of the sorted slots
    kw = _windows(ks, 2, attn.before, attn.after)  # (B, H, M, W, D)
    vw = _windows(vs, 2, attn.before, attn.after)
    pw = _windows(ps, 2, attn.before, attn.after)  # (B, H, M, W)
    o, lse = _attend_window(qs, kw, vw, ps, pw, self_mask=True)  # (B, H, M, C, D), (B, H, M, C)
    # back to positions, then combine rounds with weights exp(lse_r - logsumexp_r lse_r), accumulated in
    # the eager model's order: a first token seeing only itself has lse near -1e5, where fp32 is coarse
    idx = order.unsqueeze(-1).expand(B, H, R, Tp, D)
    out_r = torch.zeros(B, H, R, Tp, D, dtype=o.dtype, device=x.device).scatter(3, idx, o.view(B, H, R, Tp, D))
    lse_r = torch.zeros(B, H, R, Tp, dtype=o.dtype, device=x.device).scatter(3, order, lse.view(B, H, R, Tp))
    out = out_r[:, :, 0]  # (B, H, Tp, D)
    lse_acc = lse_r[:, :, 0]
    for r in range(1, R):
        new_lse = _logaddexp(lse_acc, lse_r[:, :, r])
        out = (out * torch.exp(lse_acc - new_lse).unsqueeze(-1)
               + out_r[:, :, r] * torch.exp(lse_r[:, :, r] - new_lse).unsqueeze(-1))
        lse_acc = new_lse
    return (out.transpose(1, 2).reshape(B, Tp, H * D), k, v, order.to(torch.int32), buckets.to(torch.int32))


def _local_prefill(attn: LocalSelfAttention, ring: int, x: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
    """x (B, Tp, E), Tp a multiple of C -> out (B, Tp, H*D), ring keys/values (B, H, ring, D) of each
    sequence's last `ring` real positions (slot = position % ring, as the pool's rings)."""
    B, Tp = x.shape[0], x.shape[1]
    H, D, C = attn.H, attn.D, attn.C
    q = attn.query(x).view(B, Tp, H, D).transpose(1, 2)  # (B, H, Tp, D)
    k = attn.key(x).view(B, Tp, H, D).transpose(1, 2) / math.sqrt(D)
    v = attn.value(x).view(B, Tp, H, D).transpose(1, 2)
    pc = torch.arange(Tp, device=x.device).view(-1, C)  # (N, C)
    kw = _windows(k.view(B, H, -1, C, D), 2, attn.before, attn.after)  # (B, H, N, W, D)
    vw = _windows(v.view(B, H, -1, C, D), 2, attn.before, attn.after)
    pw = _windows(pc, 0, attn.before, attn.after)  # (N, W); wrapped chunks are later: masked
    o, _ = _attend_window(q.view(B, H, -1, C, D), kw, vw, pc, pw, self_mask=False)
    out = o.reshape(B, H, Tp, D).transpose(1, 2).reshape(B, Tp, H * D)
    # slot j holds the latest real position p < length with p = j (mod ring); none if p < 0
    last = lengths.view(B, 1) - 1
    pj = last - torch.remainder(last - torch.arange(ring, device=x.device), ring)  # (B, ring)
    g = pj.clamp(min=0).view(B, 1, ring, 1).expand(B, H, ring, D)
    empty = (pj < 0).view(B, 1, ring, 1)
    return out, torch.where(empty, 0.0, torch.gather(k, 2, g)), torch.where(empty, 0.0, torch.gather(v, 2, g))


class PrefillGraph(nn.Module):
    """input_ids (B, Tp), lengths (B,) -> logits (B, Tp, V), lsh_keys/lsh_values (Ll, B, H, Tp, D),
    lsh_order / lsh_buckets (Ll, B, H, R, Tp) int32, local_keys/local_values (Lc, B, H, ring, D); zero-size
    stacks for a kind the model has no layers of.

    Tp must be a multiple of lcm(chunk lengths) and, with LSH layers, the length transformers pads
    lengths[b] to (`config.padded_length`) and above the LSH chunk: the graph is the hashed regime only.
    """

    def __init__(self, model: ReformerLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        model, cfg = self.model, self.model.config
        B, Tp = input_ids.shape[0], input_ids.shape[1]
        H, D, R = cfg.num_attention_heads, cfg.attention_head_size, model.num_hashes
        x = model.embeddings(input_ids, torch.arange(Tp, device=input_ids.device))  # (B, Tp, E)
        a, h = x, x
        lsh: list[tuple[Tensor, ...]] = []
        local: list[tuple[Tensor, ...]] = []
        for layer in model.encoder.layers:
            att = layer.attention
            if att.kind == "lsh":
                o, *state = _lsh_prefill(att.self_attention, cfg.total_buckets, att.layer_norm(h), lengths)
                lsh.append(tuple(state))
            else:
                o, *state = _local_prefill(att.self_attention, cfg.local_ring_size, att.layer_norm(h), lengths)
                local.append(tuple(state))
            a = a + att.output.dense(o)
            h = h + layer.feed_forward(a)  # whole sequence at once: chunking only saves memory
        ints = lengths.to(torch.int32)
        return (model._head(a, h),
                *(_stack([s[i] for s in lsh], [B, H, Tp, D], x) for i in (0, 1)),
                *(_stack([s[i] for s in lsh], [B, H, R, Tp], ints) for i in (2, 3)),
                *(_stack([s[i] for s in local], [B, H, cfg.local_ring_size, D], x) for i in (0, 1)))


# ---------------------------------------------------------------------------------------------------
# Writing the files
# ---------------------------------------------------------------------------------------------------
@dataclass
class ExportSpec:
    """Example inputs and dynamic dimensions of the graphs for one model (name -> args, dims)."""

    args: dict[str, tuple[Tensor, ...]]
    dims: dict[str, dict[str, dict[int, object]]]
    pool: DecodePool  # the decode example's pool (its layout: page and delta sizes)
    limits: dict[str, int] = field(default_factory=dict)


def _example_pool(model: ReformerLM) -> tuple[DecodePool, list[int]]:
    """A pool of real decode state for the decode graph's example: one sequence decoding by LSH windows, one
    still dense, in a pool of more slots than the step has rows (the graph is traced by running it)."""
    cfg = model.config
    pool = model.new_decode_pool(3, 4 * cfg.chunk_lcm + 4 * cfg.lsh_attn_chunk_length)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for T in (2 * cfg.chunk_lcm + 3 if "lsh" in cfg.attn_layers else cfg.chunk_lcm + 3, 2):
        ids = torch.randint(3, cfg.vocab_size, (1, min(T, cfg.max_context - 2)), generator=g)
        seqs.append(model.prefill(ids, pool=pool)[1].sequences[0])
    pool.allocate(1)  # a third slot, not in the step
    return pool, [s.slot for s in seqs]


def export_spec(model: ReformerLM) -> ExportSpec:
    """Examples shaped unlike any the checks use, so a graph specialised to them would fail the checks.

    Prefill lengths are `lcm(chunk lengths) x nchunks`, above one LSH chunk (the hashed regime). The decode
    example is a step of two sequences (one hashed, one dense) of a pool with more slots and pages.
    """
    from torch.export import Dim

    cfg = model.config
    lcm, C = cfg.chunk_lcm, cfg.lsh_attn_chunk_length
    # with LSH layers, the hashed regime (above one LSH chunk); without, two chunks at least (torch.export
    # specialises a size of one: the one-chunk prompts of a local-only model go through the decode step)
    min_chunks = C // lcm + 1 if "lsh" in cfg.attn_layers else 2
    max_chunks = max(cfg.max_context // lcm, min_chunks + 1)
    n = min(min_chunks + 1, max_chunks)
    g = torch.Generator().manual_seed(0)
    batch, slots, rows = Dim("batch", min=1), Dim("slots", min=2), Dim("rows", min=2)
    nchunks = Dim("nchunks", min=min_chunks, max=max_chunks)
    pool, step_slots = _example_pool(model)
    plan = pool.begin_step(step_slots)
    state = tuple(getattr(pool, name) for name in STATE)
    lsh = bool(pool.lsh_index)
    # symbolic even where a model has no layers of the kind (zero-size stacks): a runtime checks every dim
    per_slot = {"cum_static": 1, "dbuckets": 1, "dorder": 1, "local_keys": 1, "local_values": 1, "page_table": 0,
                "len_d": 0, "hashed_d": 0}
    per_row = {"keys": 2, "values": 2, "order": 3}
    decode_dims: dict[str, dict[int, object]] = {"input_ids": {0: batch}, "slots": {0: batch}}
    for name in STATE:
        decode_dims[name] = {per_slot[name]: slots} if name in per_slot else {per_row[name]: rows}
    args = {
        "prefill": (torch.randint(3, cfg.vocab_size, (2, lcm * n), generator=g), torch.tensor([lcm * n, lcm * n - 1])),
        "decode": (torch.randint(3, cfg.vocab_size, (2,), generator=g), plan.slots.clone(), *state),
    }
    dims = {
        "prefill": {"input_ids": {0: batch, 1: lcm * nchunks}, "lengths": {0: batch}},
        "decode": decode_dims,
    }
    if lsh:
        T = Dim("length", min=2)
        args["sort"] = (torch.stack([pool.keys_of(j, step_slots, C) for j in range(len(pool.lsh_index))]),)
        dims["sort"] = {"keys": {1: slots, 3: T}}
    return ExportSpec(args=args, dims=dims, pool=pool, limits={
        "prefill_multiple": lcm, "prefill_min_padded": lcm * min_chunks, "prefill_max_padded": lcm * max_chunks})


def _onnx_searchsorted(sorted_sequence, values, out_int32: bool = False, right: bool = False, side=None,
                       sorter=None):
    """aten.searchsorted for the ONNX exporter, which has none: entries of each sorted row below (right:
    not above) each value, by a broadcast compare and count (the decode step's rows are its delta, M long)."""
    import onnx
    from onnxscript import opset18 as op

    s, v = op.Unsqueeze(sorted_sequence, [-2]), op.Unsqueeze(values, [-1])
    hit = op.LessOrEqual(s, v) if right or side == "right" else op.Less(s, v)
    count = op.ReduceSum(op.Cast(hit, to=onnx.TensorProto.INT64), [-1], keepdims=0)
    return op.Cast(count, to=onnx.TensorProto.INT32) if out_int32 else count


def _export_graph(graph: nn.Module, fmt: str, args: tuple[Tensor, ...], dims: dict, path: Path,
                  input_names: tuple[str, ...], output_names: tuple[str, ...]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript entry points warn in torch 2.13
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the ONNX exporter notes that axes of several inputs share one name: that is intended
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(graph, args, check_trace=False), str(path))
        elif fmt == "pt2":
            torch.export.save(torch.export.export(graph, args, dynamic_shapes=dims), str(path))
        else:
            program = torch.onnx.export(
                graph, args, dynamo=True, dynamic_shapes=dims, input_names=list(input_names),
                output_names=list(output_names), verbose=False,
                custom_translation_table={torch.ops.aten.searchsorted.Tensor: _onnx_searchsorted})
            program.save(str(path))


def export_model(model: ReformerLM, out_dir: str | Path, fmt: str) -> list[Path]:
    """Write the prefill, decode (and, with LSH layers, sort) graphs of `model` in format `fmt`, export.json,
    config.json and the files of the model's tokenizer (tokenizer.json / spiece.model), when it was loaded
    with one."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if model.dtype != torch.float32:
        raise ValueError(f"export needs a float32 model, got {model.dtype}")
    if model.full_attention:
        raise ValueError("export the model without the full-attention switch (an evaluation baseline)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    spec = export_spec(model)
    if fmt == "torchscript":
        logger.warning("TorchScript is deprecated in torch %s (still works); torch.export (.pt2) is also offered",
                       torch.__version__)
    graphs = {"prefill": (PrefillGraph(model), PREFILL_INPUTS, PREFILL_OUTPUTS),
              "decode": (DecodeGraph(model, spec.pool), DECODE_INPUTS, DECODE_OUTPUTS)}
    if "sort" in spec.args:
        graphs["sort"] = (SortGraph(model), SORT_INPUTS, SORT_OUTPUTS)
    written = []
    for name, (graph, ins, outs) in graphs.items():
        path = out / f"{name}{SUFFIX[fmt]}"
        t0 = time.perf_counter()
        _export_graph(graph.eval(), fmt, spec.args[name], spec.dims[name], path, ins, outs)
        logger.info("wrote %s (%.1f s)", path, time.perf_counter() - t0)
        written.append(path)
    _write_metadata(model, out, fmt, spec, list(graphs))
    copy_tokenizer_files(getattr(model, "tokenizer", None), out)  # the exported graphs speak the same text
    return written


def _write_metadata(model: ReformerLM, out: Path, fmt: str, spec: ExportSpec, names: list[str]) -> None:
    """export.json: names, shapes (symbolic dims by name), limits and the config; several formats can share
    a directory, each adds its file names."""
    cfg = model.config
    meta_path = out / "export.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    files = meta.get("files", {})
    files[fmt] = {name: f"{name}{SUFFIX[fmt]}" for name in names}
    Ll, Lc = "num_lsh_layers", "num_local_layers"
    state = {"keys": [Ll, "H", "rows", "D"], "values": [Ll, "H", "rows", "D"], "order": [Ll, "H", "R", "rows"],
             "cum_static": [Ll, "slots", "H", "R", "K"], "dbuckets": [Ll, "slots", "H", "R", "M"],
             "dorder": [Ll, "slots", "H", "R", "M"], "local_keys": [Lc, "slots", "H", "ring", "D"],
             "local_values": [Lc, "slots", "H", "ring", "D"], "page_table": ["slots", "max_pages"],
             "len_d": ["slots"], "hashed_d": ["slots"]}
    meta = {
        "format_version": 2,
        "files": files,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "num_hashes": model.num_hashes,
        "rotation_fingerprint": model.rotation_fingerprint(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "limits": spec.limits,
        "dims": {Ll: cfg.attn_layers.count("lsh"), Lc: cfg.attn_layers.count("local"),
                 "H": cfg.num_attention_heads, "D": cfg.attention_head_size, "R": model.num_hashes,
                 "K": cfg.total_buckets, "ring": cfg.local_ring_size, "V": cfg.vocab_size},
        "pool_layout": {"page_size": spec.pool.P, "delta_size": spec.pool.M},  # the decode graph's constants
        "prefill": {
            "inputs": {"input_ids": ["batch", "padded_len"], "lengths": ["batch"]},
            "outputs": {"logits": ["batch", "padded_len", "V"], "lsh_keys": [Ll, "batch", "H", "padded_len", "D"],
                        "lsh_values": [Ll, "batch", "H", "padded_len", "D"],
                        "lsh_order": [Ll, "batch", "H", "R", "padded_len"],
                        "lsh_buckets": [Ll, "batch", "H", "R", "padded_len"],
                        "local_keys": [Lc, "batch", "H", "ring", "D"], "local_values": [Lc, "batch", "H", "ring", "D"]},
        },
        "decode": {
            "inputs": {"input_ids": ["batch"], "slots": ["batch"], **state},
            "outputs": {"logits": ["batch", "V"], "lsh_new_keys": [Ll, "batch", "H", "D"],
                        "lsh_new_values": [Ll, "batch", "H", "D"], "lsh_dbuckets": [Ll, "batch", "H", "R", "M"],
                        "lsh_dorder": [Ll, "batch", "H", "R", "M"], "local_new_keys": [Lc, "batch", "H", "D"],
                        "local_new_values": [Lc, "batch", "H", "D"]},
        },
        "config": cfg.to_dict(),
    }
    if "sort" in names:
        meta["sort"] = {"inputs": {"keys": [Ll, "slots", "H", "length", "D"]},
                        "outputs": {"order": [Ll, "slots", "H", "R", "length"],
                                    "buckets": [Ll, "slots", "H", "R", "length"]}}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    cfg.save(out / "config.json")


# ---------------------------------------------------------------------------------------------------
# Parity checks against the eager model
# ---------------------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def default_lengths(config: ReformerConfig, new_tokens: int) -> list[int]:
    """A dense-regime prompt (at most one LSH chunk) from which `new_tokens` of decoding cross into LSH
    windows, one of a length that is not a multiple of the chunk length (padded, hashed) and one of an exact
    multiple: all shapes other than the export examples'."""
    lcm = config.chunk_lcm
    # short enough for the dense regime, long enough that greedy decoding from it crosses one LSH chunk
    short = max(2, min(config.min_chunk_length, config.lsh_attn_chunk_length - new_tokens // 2))
    room = config.max_context - new_tokens
    out = [n for n in (short, 2 * lcm + 3, 4 * lcm) if n <= room and -(-n // lcm) * lcm <= config.max_context]
    return out or [min(short, room)]


def _greedy(model: object, ids: Tensor, n: int) -> tuple[list[int], list[Tensor]]:
    logits, cache = model.prefill(ids, last_only=True)  # type: ignore[attr-defined]
    toks, steps = [], [logits[:, -1]]
    for _ in range(n):
        tok = steps[-1].argmax(-1, keepdim=True)  # (B, 1)
        toks.append(int(tok[0, 0]))
        logits, cache = model.decode_step(tok, cache)  # type: ignore[attr-defined]
        steps.append(logits[:, -1])
    return toks, steps


def _state_differences(ref: ReformerCache, got: ReformerCache, lsh: list[int]) -> list[str]:
    """Where two caches' integer LSH state (sorted positions, bucket counts, hashed or not) differs."""
    bad = []
    for b, (r, s) in enumerate(zip(ref.sequences, got.sequences, strict=True)):
        for i in lsh:
            ro, so = r.sorted_positions(i), s.sorted_positions(i)
            if (ro is None) != (so is None):
                bad.append(f"row {b} layer {i}: hashed {ro is not None} vs {so is not None}")
            elif ro is not None and not (torch.equal(ro, so) and torch.equal(r.bucket_counts(i), s.bucket_counts(i))):
                bad.append(f"row {b} layer {i}")
    return bad


def _onnx_checks(out_dir: Path) -> list[Check]:
    import onnx

    checks = []
    dynamic = {"prefill.onnx": {"input_ids": (0, 1), "lengths": (0,)},
               "decode.onnx": {"input_ids": (0,), "slots": (0,), "keys": (2,), "order": (3,), "len_d": (0,),
                               "local_keys": (1,)}}
    for name, want in dynamic.items():
        path = out_dir / name
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        fixed = [f"{inp}[{ax}]={dims[inp][ax]}" for inp, axes in want.items() for ax in axes
                 if inp in dims and not isinstance(dims[inp][ax], str)]
        checks.append(Check(f"{name} onnx.checker + symbolic dims", not fixed,
                            "ok" if not fixed else f"fixed input dims {fixed}"))
    return checks


def verify_export(
    model: ReformerLM, out_dir: str | Path, fmt: str, *, lengths: list[int] | None = None, new_tokens: int = 8,
    tol: float = 1e-4, seed: int = 0,
) -> list[Check]:
    """Reload the exported graphs from `out_dir` and compare with the eager model.

    Logits (prefill at every length, batch of 1 and of 3; every greedy decode step) must agree within
    tol x max(1, max |eager logit|); greedy tokens and the integer bucket bookkeeping must be equal; a
    batched decode of two sequences of different lengths through one graph call must equal the eager one.
    """
    from .exported import ExportedModel

    backend = fmt
    out_dir = Path(out_dir)
    cfg = model.config
    lengths = lengths or default_lengths(cfg, new_tokens)
    checks = _onnx_checks(out_dir) if fmt == "onnx" else []
    em = ExportedModel(out_dir, backend)
    g = torch.Generator().manual_seed(seed)
    lsh = [i for i, k in enumerate(cfg.attn_layers) if k == "lsh"]

    def close(name: str, ref: Tensor, got: Tensor) -> None:
        err = (ref - got).abs().max().item() if ref.shape == got.shape else float("inf")
        bound = tol * max(1.0, ref.abs().max().item())
        checks.append(Check(name, err <= bound, f"max |diff| {err:.2e} (bound {bound:.1e}, shape {tuple(got.shape)})"))

    for T in lengths:
        for B in (1, 3) if T == lengths[-1] else (1,):
            ids = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
            ref, ref_cache = model.prefill(ids)
            got, got_cache = em.prefill(ids)
            close(f"prefill logits T={T} B={B}", ref, got)
            bad = _state_differences(ref_cache, got_cache, lsh)
            if lsh:
                checks.append(Check(f"prefill bucket state T={T} B={B}", not bad, "equal" if not bad else str(bad)))
    for T in lengths[:2]:
        ids = torch.randint(3, cfg.vocab_size, (1, T), generator=g)
        ref_toks, ref_steps = _greedy(model, ids, new_tokens)
        got_toks, got_steps = _greedy(em, ids, new_tokens)
        checks.append(Check(f"greedy {new_tokens} tokens from T={T}", ref_toks == got_toks,
                            f"{got_toks}" if ref_toks == got_toks else f"eager {ref_toks} vs exported {got_toks}"))
        close(f"decode logits T={T} ({new_tokens} steps)", torch.stack(ref_steps), torch.stack(got_steps))
    # one graph call for two sequences of different lengths in one pool (ragged positions, batch 2 != example)
    ref_pool, got_pool = model.new_decode_pool(2), em.new_decode_pool(2)
    ref_caches, got_caches = [], []
    for T in (lengths[0], lengths[-1]):
        ids = torch.randint(3, cfg.vocab_size, (1, T), generator=g)
        ref_caches.append(model.prefill(ids, pool=ref_pool)[1])
        got_caches.append(em.prefill(ids, pool=got_pool)[1])
    rb, gb = ReformerCache.batch(ref_caches), ReformerCache.batch(got_caches)
    refs, gots = [], []
    for _ in range(max(2, new_tokens // 2)):
        tok = torch.randint(3, cfg.vocab_size, (2, 1), generator=g)
        refs.append(model.decode_step(tok, rb)[0])
        gots.append(em.decode_step(tok, gb)[0])
    close(f"batched decode of lengths {lengths[0]} and {lengths[-1]}", torch.stack(refs), torch.stack(gots))
    bad = _state_differences(rb, gb, lsh)
    if lsh:
        checks.append(Check("batched decode bucket state", not bad, "equal" if not bad else str(bad)))
    rb.release()
    gb.release()
    return checks


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reformer-export",
        description="Export a Reformer checkpoint as prefill + decode-step graphs and check them against eager.")
    parser.add_argument("--model", required=True, help="checkpoint directory (project or Hugging Face format)")
    parser.add_argument("--format", required=True, choices=FORMATS, action="append",
                        help="onnx, torchscript (deprecated in torch 2.13, still works) or pt2 (torch.export); "
                             "repeat for several")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-verify", action="store_true", help="skip the parity checks")
    parser.add_argument("--lengths", type=int, nargs="+", help="prompt lengths to check (default: from the config)")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated in the parity check")
    parser.add_argument("--tol", type=float, default=1e-4, help="logit tolerance, relative to max(1, max |logit|)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        model = load_model(args.model)
    except (OSError, ValueError) as e:
        print(f"reformer-export: cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    failed = False
    for fmt in dict.fromkeys(args.format):
        try:
            paths = export_model(model, args.out, fmt)
        except Exception as e:  # noqa: BLE001 - report any exporter failure as this CLI's error
            print(f"reformer-export: {fmt} export failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        print(f"{fmt}: wrote {', '.join(str(p) for p in paths)}")
        if args.no_verify:
            continue
        checks = verify_export(model, args.out, fmt, lengths=args.lengths, new_tokens=args.new_tokens, tol=args.tol)
        for c in checks:
            print(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
        bad = [c.name for c in checks if not c.ok]
        if bad:
            failed = True
            print(f"reformer-export: {fmt} parity FAILED ({len(bad)} of {len(checks)} checks): {'; '.join(bad)}",
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
