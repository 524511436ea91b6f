"""Export the model as two pure tensor functions (a prefill graph and a decode-step graph) and check them.

`reformer-export --model PATH --format onnx|torchscript|pt2 --out DIR` writes

  * ``prefill.{onnx,pt,pt2}``: ``input_ids`` int64 (B, Tp) and ``lengths`` int64 (B,) -> ``logits`` (B, Tp, V)
    and the cache tensors of those B sequences (see `PREFILL_OUTPUTS`);
  * ``decode.{onnx,pt,pt2}``: one token per sequence, its position, and the cache tensors -> ``logits``
    (B, 1, V), the new token's keys/values (to be written at its position by the caller) and the updated
    bucket bookkeeping (see `DECODE_INPUTS` / `DECODE_OUTPUTS`);
  * ``export.json`` (names, shapes with symbolic dims, limits, the model config) and ``config.json``.

The graphs reuse the eager model's modules (embeddings, projections, layer norms, feed-forward, LM head,
rotation buffers) and compute what `ReformerLM.prefill` / `ReformerLM.decode_step` compute, written without
Python control flow on shapes or values so that one graph serves every length: all chunks of a layer at
once (windows by `torch.roll` over the chunk axis, as transformers' `_look_adjacent`), sorts of unique keys
only, branches as `torch.where`. docs/export.md lists the limits (padded prefill lengths, capacity, memory).

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
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_model
from .config import ReformerConfig
from .model import MASK_VALUE, SELF_MASK_VALUE, LocalSelfAttention, LSHSelfAttention, ReformerLM, len_norm
from .tokenizer import copy_tokenizer_files

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "pt2")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
# The graphs compute in fp32 with the reference implementation's fp32 mask values; TorchScript cannot read
# float globals, so they are literals in the graph code, checked here against the eager model's.
if (MASK_VALUE[torch.float32], SELF_MASK_VALUE[torch.float32]) != (-1e9, -1e5):  # pragma: no cover
    raise ImportError("export.py's mask literals no longer match model.MASK_VALUE / SELF_MASK_VALUE")

PREFILL_INPUTS = ("input_ids", "lengths")
PREFILL_OUTPUTS = ("logits", "lsh_keys", "lsh_values", "lsh_order", "lsh_counts", "local_keys", "local_values")
DECODE_INPUTS = ("input_ids", "positions", "hashed", "lsh_keys", "lsh_values", "lsh_order", "lsh_counts",
                 "local_keys", "local_values")
DECODE_OUTPUTS = ("logits", "hashed_out", "lsh_new_keys", "lsh_new_values", "lsh_order_out", "lsh_counts_out",
                  "local_new_keys", "local_new_values")


# ---------------------------------------------------------------------------------------------------
# Graph pieces (TorchScript-compatible: typed, no Python objects but modules, tensors and constants)
# ---------------------------------------------------------------------------------------------------
def _softmax_attend(q: Tensor, k: Tensor, v: Tensor, dots_mask: Tensor, self_slot: Tensor) -> tuple[Tensor, Tensor]:
    """q (..., Q, D), k/v (..., W, D); masks (..., Q, W) bool -> out (..., Q, D), lse (..., Q).

    Same arithmetic as the eager `_attend_window` (masked keys -1e9, the query's own key -1e5, one exp pass
    normalised after the product): a first token that sees only itself has scores near -1e5, where fp32 is
    coarse, so another order of operations would differ visibly there.
    """
    dots = torch.matmul(q, k.transpose(-1, -2))  # (..., Q, W)
    dots = dots.masked_fill(dots_mask, -1e9)
    dots = dots.masked_fill(self_slot, -1e5)
    m = dots.amax(dim=-1, keepdim=True)
    x = dots - m
    # as the eager `exp_shifted`: masked scores give exactly 0 without torch's slow CPU underflow path
    # (-87.0 is model.EXP_FLOOR, written out: TorchScript cannot read a module global)
    e = torch.exp(x.clamp(min=-87.0)).masked_fill(x < -87.0, 0.0)
    s = e.sum(dim=-1, keepdim=True)
    return torch.matmul(e, v) / s, (m + torch.log(s)).squeeze(-1)


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


class _Hasher(nn.Module):
    """Angular LSH of `LSHSelfAttention.hash` on the layer's own rotation buffer (shared, not copied)."""

    def __init__(self, attn: LSHSelfAttention) -> None:
        super().__init__()
        self.rotations = attn.rotations
        self.factors = list(attn.config.bucket_factors)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, T, D) -> (B, H, R, T) int64
        rot = torch.einsum("bhtd,hdrk->bhrtk", x.float(), self.rotations.float())
        buckets = torch.zeros(rot.shape[:-1], dtype=torch.long, device=x.device)
        offset, radix = 0, 1
        for factor in self.factors:
            part = rot[..., offset : offset + factor // 2]
            offset += factor // 2
            buckets = buckets + radix * torch.argmax(torch.cat([part, -part], dim=-1), dim=-1)
            radix *= factor
        return buckets


class _LSHGraph(nn.Module):
    """One LSH attention layer as graph code: prefill over all chunks at once, and the cached decode step."""

    def __init__(self, attn: LSHSelfAttention, num_buckets: int) -> None:
        super().__init__()
        self.is_lsh = True
        self.query_key = attn.query_key
        self.value = attn.value
        self.hasher = _Hasher(attn)
        self.H = attn.H
        self.D = attn.D
        self.C = attn.C
        self.R = attn.num_hashes
        self.K = num_buckets
        self.before = attn.before
        self.after = attn.after

    def prefill(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (B, Tp, E) layer-normed, Tp a multiple of C above C -> out (B, Tp, H*D), keys, values (B, H, Tp, D),
        order (B, H, R, Tp) int32 (positions in (bucket, position) order, pads last), counts (B, H, R, K) int32.

        Positions >= lengths[b] are pads: they sort after every real token of their round (as transformers'
        extra pad bucket) and, lying after every real position, are hidden from real queries by the causal mask.
        """
        B, Tp = x.shape[0], x.shape[1]
        H, D, C, R = self.H, self.D, self.C, self.R
        qk = self.query_key(x).view(B, Tp, H, D).transpose(1, 2)  # (B, H, Tp, D)
        v = self.value(x).view(B, Tp, H, D).transpose(1, 2)
        k = len_norm(qk) / math.sqrt(D)
        pos = torch.arange(Tp, device=x.device)
        real = (pos.unsqueeze(0) < lengths.unsqueeze(1)).view(B, 1, 1, Tp)
        buckets = self.hasher(qk)  # (B, H, R, Tp)
        # unique sort keys (bucket, position): no stable sort needed, so every exporter agrees on the order
        order = torch.argsort(torch.where(real, buckets, self.K) * Tp + pos, dim=-1)  # (B, H, R, Tp)
        counts = torch.zeros(B, H, R, self.K, dtype=torch.int32, device=x.device).scatter_add(
            -1, buckets, real.expand(B, H, R, Tp).to(torch.int32))
        rows = order.reshape(B, H, R * Tp, 1)  # sorted slot -> position, rounds laid end to end
        qs = torch.gather(qk, 2, rows.expand(B, H, R * Tp, D)).view(B, H, -1, C, D)  # (B, H, M, C, D)
        ks = torch.gather(k, 2, rows.expand(B, H, R * Tp, D)).view(B, H, -1, C, D)
        vs = torch.gather(v, 2, rows.expand(B, H, R * Tp, D)).view(B, H, -1, C, D)
        ps = order.view(B, H, -1, C)  # (B, H, M, C) positions of the sorted slots
        kw = _windows(ks, 2, self.before, self.after)  # (B, H, M, W, D)
        vw = _windows(vs, 2, self.before, self.after)
        pw = _windows(ps, 2, self.before, self.after)  # (B, H, M, W)
        qp, kp = ps.unsqueeze(-1), pw.unsqueeze(-2)  # (B, H, M, C, 1), (B, H, M, 1, W)
        o, lse = _softmax_attend(qs, kw, vw, kp > qp, kp == qp)  # (B, H, M, C, D), (B, H, M, C)
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
        return out.transpose(1, 2).reshape(B, Tp, H * D), k, v, order.to(torch.int32), counts

    def decode(
        self, x: Tensor, t: Tensor, hashed: Tensor, become: Tensor,
        all_keys: Tensor, all_values: Tensor, j: int, order: Tensor, counts: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (B, E) layer-normed; t (B,) positions of the new tokens; hashed/become (B,) bool; all_keys /
        all_values (L, B, H, S, D), of which this layer's are [j]; order (B, H, R, S) int32; counts (B, H, R, K).

        The window rows are gathered from the flattened stacked tensors by row number, and the dense branch
        slices only its C+1 slots: selecting [j] first would make ONNX Runtime copy the whole cache every step.

        Returns out (B, H*D), the new key and value (B, H, D) for the caller to write at position t, and the
        updated order and counts. Mirrors `LSHSelfAttention.decode` + `LSHLayerState.window/append`: hashed
        sequences attend to their window in the (bucket, position) order; the others (shorter than one
        chunk) attend densely; a sequence reaching one chunk has its first t+1 keys hashed and sorted.
        """
        B, S = x.shape[0], all_keys.shape[3]
        H, D, C, R, K = self.H, self.D, self.C, self.R, self.K
        W = C * (1 + self.before + self.after)
        qk = self.query_key(x).view(B, H, 1, D)
        v_new = self.value(x).view(B, H, D)
        k_new = (len_norm(qk) / math.sqrt(D)).view(B, H, D)
        bucket = self.hasher(qk)[..., 0]  # (B, H, R)
        t4 = t.view(B, 1, 1, 1)

        # -- windowed: slot p = tokens with bucket <= own; window = slots [(p//C - before)C, +W) mod t+1
        p = counts.cumsum(-1).gather(-1, bucket.unsqueeze(-1)).to(torch.long)  # (B, H, R, 1)
        start = (torch.div(p, C, rounding_mode="floor") - self.before) * C
        s = torch.remainder(start + torch.arange(W, device=x.device), t4 + 1)  # (B, H, R, W)
        last = torch.clamp(t4 - 1, min=0)
        src = torch.minimum(torch.where(s > p, s - 1, s), last)
        wpos = torch.where(s == p, t4, order.gather(-1, src).to(torch.long))  # (B, H, R, W)
        b_idx = torch.arange(B, device=x.device).view(B, 1, 1, 1)
        h_idx = torch.arange(H, device=x.device).view(1, H, 1, 1)
        rows = (((j * B + b_idx) * H + h_idx) * S + wpos).reshape(-1)  # rows of all_keys viewed as (L*B*H*S, D)
        is_new = (wpos == t4).unsqueeze(-1)  # the new token's own slot: its key is not cached yet
        kk = torch.where(is_new, k_new.view(B, H, 1, 1, D),
                         all_keys.reshape(-1, D).index_select(0, rows).view(B, H, R, W, D))
        vv = torch.where(is_new, v_new.view(B, H, 1, 1, D),
                         all_values.reshape(-1, D).index_select(0, rows).view(B, H, R, W, D))
        no_mask = torch.zeros_like(is_new).view(B, H, R, 1, W)
        o, lse = _softmax_attend(qk.unsqueeze(2), kk, vv, no_mask, is_new.view(B, H, R, 1, W))
        windowed = (o[..., 0, :] * torch.softmax(lse[..., 0], dim=-1).unsqueeze(-1)).sum(dim=2)  # (B, H, D)

        # -- dense (fewer than one chunk so far): the first C+1 slots, later ones masked
        slots = torch.arange(C + 1, device=x.device)
        own = (slots.unsqueeze(0) == t.unsqueeze(1)).view(B, 1, C + 1, 1)
        kd = torch.where(own, k_new.unsqueeze(2), all_keys[j, :, :, : C + 1])  # (B, H, C+1, D)
        vd = torch.where(own, v_new.unsqueeze(2), all_values[j, :, :, : C + 1])
        later = (slots.unsqueeze(0) > t.unsqueeze(1)).view(B, 1, 1, C + 1)
        od, _ = _softmax_attend(qk, kd, vd, later, own.view(B, 1, 1, C + 1))
        out = torch.where(hashed.view(B, 1, 1), windowed, od[:, :, 0])

        # -- bookkeeping: insert the new token at slot p (tail shifted by a gather), or hash the first
        #    t+1 keys when the sequence reaches one chunk, or leave it (still dense)
        idx = torch.arange(S, device=x.device)
        shifted = order.gather(-1, torch.minimum(idx - (idx > p).to(torch.long), last))
        inserted = torch.where(idx == p, t4.to(torch.int32), shifted)  # (B, H, R, S)
        grown = counts + F.one_hot(bucket, K).to(torch.int32)
        b_all = self.hasher(kd)  # (B, H, R, C+1)
        valid = (slots.unsqueeze(0) <= t.unsqueeze(1)).view(B, 1, 1, C + 1)
        first = torch.argsort(torch.where(valid, b_all, K) * (C + 1) + slots, dim=-1).to(torch.int32)
        first = torch.zeros_like(order).scatter(-1, slots.expand(B, H, R, C + 1), first)  # (B, H, R, S)
        fresh = torch.zeros(B, H, R, K, dtype=torch.int32, device=x.device).scatter_add(
            -1, b_all, valid.expand(B, H, R, C + 1).to(torch.int32))
        h4, b4 = hashed.view(B, 1, 1, 1), become.view(B, 1, 1, 1)
        new_order = torch.where(h4, inserted, torch.where(b4, first, order))
        new_counts = torch.where(h4, grown, torch.where(b4, fresh, counts))
        return out.reshape(B, H * D), k_new, v_new, new_order, new_counts


class _LocalGraph(nn.Module):
    """One local attention layer as graph code; its decode state is the ring of the last (before+1)*C keys."""

    def __init__(self, attn: LocalSelfAttention) -> None:
        super().__init__()
        self.is_lsh = False
        self.query = attn.query
        self.key = attn.key
        self.value = attn.value
        self.H = attn.H
        self.D = attn.D
        self.C = attn.C
        self.before = attn.before
        self.after = attn.after
        self.ring = attn.ring_size

    def prefill(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (B, Tp, E), Tp a multiple of C -> out (B, Tp, H*D), ring keys/values (B, H, ring, D) of each
        sequence's last `ring` real positions (slot = position % ring, as `LocalLayerState`), two empties."""
        B, Tp = x.shape[0], x.shape[1]
        H, D, C = self.H, self.D, self.C
        q = self.query(x).view(B, Tp, H, D).transpose(1, 2)  # (B, H, Tp, D)
        k = self.key(x).view(B, Tp, H, D).transpose(1, 2) / math.sqrt(D)
        v = self.value(x).view(B, Tp, H, D).transpose(1, 2)
        pos = torch.arange(Tp, device=x.device)
        pc = pos.view(-1, C)  # (N, C)
        kw = _windows(k.view(B, H, -1, C, D), 2, self.before, self.after)  # (B, H, N, W, D)
        vw = _windows(v.view(B, H, -1, C, D), 2, self.before, self.after)
        pw = _windows(pc, 0, self.before, self.after)  # (N, W); wrapped chunks are later: masked
        causal = pw.unsqueeze(1) > pc.unsqueeze(2)  # (N, C, W)
        o, _ = _softmax_attend(q.view(B, H, -1, C, D), kw, vw, causal, torch.zeros_like(causal))
        out = o.reshape(B, H, Tp, D).transpose(1, 2).reshape(B, Tp, H * D)
        # slot j holds the latest real position p < length with p = j (mod ring); none if p < 0
        last = lengths.view(B, 1) - 1
        pj = last - torch.remainder(last - torch.arange(self.ring, device=x.device), self.ring)  # (B, ring)
        g = pj.clamp(min=0).view(B, 1, self.ring, 1).expand(B, H, self.ring, D)
        empty = (pj < 0).view(B, 1, self.ring, 1)
        ring_k = torch.where(empty, 0.0, torch.gather(k, 2, g))
        ring_v = torch.where(empty, 0.0, torch.gather(v, 2, g))
        none = torch.zeros(0, dtype=torch.int32, device=x.device)
        return out, ring_k, ring_v, none, none

    def decode(
        self, x: Tensor, t: Tensor, hashed: Tensor, become: Tensor,
        all_keys: Tensor, all_values: Tensor, j: int, order: Tensor, counts: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (B, E), t (B,), all_keys/all_values the rings (M, B, H, ring, D), this layer's at [j] -> out (B, H*D),
        new key/value (B, H, D) for the caller to write at slot t % ring; `hashed`, `become`, `order`, `counts`
        are unused (same signature as the LSH layer's, for TorchScript)."""
        B = x.shape[0]
        keys, values = all_keys[j], all_values[j]  # (B, H, ring, D): a ring is small, a copy costs little
        H, D, C, ring = self.H, self.D, self.C, self.ring
        q = self.query(x).view(B, H, 1, D)
        k_new = (self.key(x) / math.sqrt(D)).view(B, H, D)
        v_new = self.value(x).view(B, H, D)
        tt = t.view(B, 1)
        pj = tt - torch.remainder(tt - torch.arange(ring, device=x.device), ring)  # (B, ring) after the append
        own = (pj == tt).view(B, 1, ring, 1)
        kk = torch.where(own, k_new.unsqueeze(2), keys)
        vv = torch.where(own, v_new.unsqueeze(2), values)
        start = torch.clamp(torch.div(tt, C, rounding_mode="floor") - self.before, min=0) * C
        hidden = ((pj < start) | (pj < 0)).view(B, 1, 1, ring)
        dots = torch.matmul(q, kk.transpose(-1, -2)).masked_fill(hidden, -1e9)  # (B, H, 1, ring)
        out = torch.matmul(torch.softmax(dots, dim=-1), vv)
        none = torch.zeros(0, dtype=torch.int32, device=x.device)
        return out.reshape(B, H * D), k_new, v_new, none, none


class _Layer(nn.Module):
    """A reversible block's parts: LayerNorm -> attention -> output projection; feed-forward (eager module)."""

    def __init__(self, model: ReformerLM, i: int) -> None:
        super().__init__()
        layer = model.encoder.layers[i]
        attn = layer.attention.self_attention
        self.attn = (_LSHGraph(attn, model.config.total_buckets) if isinstance(attn, LSHSelfAttention)
                     else _LocalGraph(attn))
        self.norm = layer.attention.layer_norm
        self.proj = layer.attention.output.dense
        self.feed_forward = layer.feed_forward  # whole sequence at once: chunking only saves memory


class _Head(nn.Module):
    def __init__(self, model: ReformerLM) -> None:
        super().__init__()
        self.norm = model.encoder.layer_norm
        self.decoder = model.lm_head.decoder
        self.bias = model.lm_head.bias

    def forward(self, a: Tensor, h: Tensor) -> Tensor:
        return self.decoder(self.norm(torch.cat([a, h], dim=-1))) + self.bias


def _stack_or_empty(xs: list[Tensor], like: Tensor, shape: list[int]) -> Tensor:
    if len(xs) == 0:
        return torch.zeros([0] + shape, dtype=like.dtype, device=like.device)
    return torch.stack(xs)


class PrefillGraph(nn.Module):
    """input_ids (B, Tp), lengths (B,) -> logits (B, Tp, V), lsh_keys/lsh_values (L, B, H, Tp, D),
    lsh_order (L, B, H, R, Tp) int32, lsh_counts (L, B, H, R, K) int32, local_keys/local_values
    (M, B, H, ring, D). L / M: the model's LSH / local layers in order; zero-size when there are none.

    Tp must be a multiple of lcm(chunk lengths) and, with LSH layers, the length transformers pads
    lengths[b] to (`model.padded_length`) and above the LSH chunk: the graph is the hashed regime only.
    """

    def __init__(self, model: ReformerLM) -> None:
        super().__init__()
        cfg = model.config
        self.embeddings = model.embeddings
        self.layers = nn.ModuleList([_Layer(model, i) for i in range(cfg.num_hidden_layers)])
        self.head = _Head(model)
        self.H = cfg.num_attention_heads
        self.D = cfg.attention_head_size
        self.R = model.config.num_hashes
        self.K = cfg.total_buckets
        self.ring = cfg.local_ring_size

    def forward(self, input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        B, Tp = input_ids.shape[0], input_ids.shape[1]
        x = self.embeddings(input_ids, torch.arange(Tp, device=input_ids.device))  # (B, Tp, E)
        a, h = x, x
        lk: list[Tensor] = []
        lv: list[Tensor] = []
        lo: list[Tensor] = []
        lc: list[Tensor] = []
        ck: list[Tensor] = []
        cv: list[Tensor] = []
        for layer in self.layers:
            o, k, v, order, counts = layer.attn.prefill(layer.norm(h), lengths)
            if layer.attn.is_lsh:
                lk.append(k)
                lv.append(v)
                lo.append(order)
                lc.append(counts)
            else:
                ck.append(k)
                cv.append(v)
            a = a + layer.proj(o)
            h = h + layer.feed_forward(a)
        H, D, R = self.H, self.D, self.R
        return (
            self.head(a, h),
            _stack_or_empty(lk, x, [B, H, Tp, D]),
            _stack_or_empty(lv, x, [B, H, Tp, D]),
            _stack_or_empty(lo, lengths.to(torch.int32), [B, H, R, Tp]),
            _stack_or_empty(lc, lengths.to(torch.int32), [B, H, R, self.K]),
            _stack_or_empty(ck, x, [B, H, self.ring, D]),
            _stack_or_empty(cv, x, [B, H, self.ring, D]),
        )


class DecodeGraph(nn.Module):
    """One decode step for B sequences of possibly different lengths (see `DECODE_INPUTS` / `DECODE_OUTPUTS`).

    Inputs: input_ids (B, 1) int64; positions (B,) int64 (tokens already cached = the new token's position);
    hashed (B,) bool (the sequence decodes by LSH windows; false while shorter than one chunk); lsh_keys /
    lsh_values (L, B, H, S, D) with capacity S > max(positions) and S > lsh chunk; lsh_order (L, B, H, R, S)
    int32; lsh_counts (L, B, H, R, K) int32; local_keys / local_values (M, B, H, ring, D).
    Outputs: logits (B, 1, V); hashed_out (B,); lsh_new_keys / lsh_new_values (L, B, H, D) to be written at
    [:, b, :, positions[b]]; lsh_order_out / lsh_counts_out (replace the inputs); local_new_keys /
    local_new_values (M, B, H, D) to be written at [:, b, :, positions[b] % ring].
    Keys and values go out as deltas, not as whole tensors: copying the cache every step would make a
    step's cost grow with the capacity.
    """

    def __init__(self, model: ReformerLM) -> None:
        super().__init__()
        cfg = model.config
        self.embeddings = model.embeddings
        self.layers = nn.ModuleList([_Layer(model, i) for i in range(cfg.num_hidden_layers)])
        self.head = _Head(model)
        self.C = cfg.lsh_attn_chunk_length
        self.H = cfg.num_attention_heads
        self.D = cfg.attention_head_size

    def forward(
        self, input_ids: Tensor, positions: Tensor, hashed: Tensor, lsh_keys: Tensor, lsh_values: Tensor,
        lsh_order: Tensor, lsh_counts: Tensor, local_keys: Tensor, local_values: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        B = input_ids.shape[0]
        x = self.embeddings(input_ids[:, 0], positions)  # (B, E)
        # a sequence reaching one LSH chunk with this token gets its keys hashed (as `LSHLayerState.append`)
        become = (~hashed) & (positions + 1 >= self.C)
        a, h = x, x
        nk: list[Tensor] = []
        nv: list[Tensor] = []
        no: list[Tensor] = []
        nc: list[Tensor] = []
        ck: list[Tensor] = []
        cv: list[Tensor] = []
        i_lsh, i_loc = 0, 0
        for layer in self.layers:
            if layer.attn.is_lsh:
                o, k, v, order, counts = layer.attn.decode(
                    layer.norm(h), positions, hashed, become,
                    lsh_keys, lsh_values, i_lsh, lsh_order[i_lsh], lsh_counts[i_lsh])
                nk.append(k)
                nv.append(v)
                no.append(order)
                nc.append(counts)
                i_lsh += 1
            else:
                o, k, v, order, counts = layer.attn.decode(
                    layer.norm(h), positions, hashed, become,
                    local_keys, local_values, i_loc, lsh_order, lsh_counts)
                ck.append(k)
                cv.append(v)
                i_loc += 1
            a = a + layer.proj(o)
            h = h + layer.feed_forward(a)
        H, D = self.H, self.D
        return (
            self.head(a, h).unsqueeze(1),
            hashed | become,
            _stack_or_empty(nk, x, [B, H, D]),
            _stack_or_empty(nv, x, [B, H, D]),
            lsh_order if len(no) == 0 else torch.stack(no),
            lsh_counts if len(nc) == 0 else torch.stack(nc),
            _stack_or_empty(ck, x, [B, H, D]),
            _stack_or_empty(cv, x, [B, H, D]),
        )


# ---------------------------------------------------------------------------------------------------
# Writing the files
# ---------------------------------------------------------------------------------------------------
@dataclass
class ExportSpec:
    """Example inputs and dynamic dimensions of the two graphs for one model."""

    prefill_args: tuple[Tensor, ...]
    decode_args: tuple[Tensor, ...]
    prefill_dims: dict[str, dict[int, object]]
    decode_dims: dict[str, dict[int, object]]
    limits: dict[str, int] = field(default_factory=dict)


def export_spec(model: ReformerLM) -> ExportSpec:
    """Examples shaped unlike any length the checks use, so a graph specialised to them would fail the checks.

    Prefill lengths are `lcm(chunk lengths) x nchunks`, above one LSH chunk (the hashed regime). The decode
    capacity starts at LSH chunk + 2: the dense branch reads the first C+1 slots, and torch.export
    specialises sizes 0 and 1 of the dimension that is left.
    """
    from torch.export import Dim

    cfg = model.config
    lcm, C = cfg.chunk_lcm, cfg.lsh_attn_chunk_length
    min_chunks = C // lcm + 1 if "lsh" in cfg.attn_layers else 1
    max_chunks = max(cfg.max_context // lcm, min_chunks + 1)
    n = min(min_chunks + 1, max_chunks)
    B, H, D, R, K = 2, cfg.num_attention_heads, cfg.attention_head_size, model.config.num_hashes, cfg.total_buckets
    L, M = cfg.attn_layers.count("lsh"), cfg.attn_layers.count("local")
    ring = cfg.local_ring_size
    min_cap = C + 2
    S = min_cap + 5
    g = torch.Generator().manual_seed(0)
    batch = Dim("batch", min=1)
    nchunks = Dim("nchunks", min=min_chunks, max=max_chunks)
    cap = Dim("capacity", min=min_cap)
    prefill_args = (torch.randint(3, cfg.vocab_size, (B, lcm * n), generator=g),
                    torch.tensor([lcm * n, lcm * n - 1]))
    decode_args = (
        torch.randint(3, cfg.vocab_size, (B, 1), generator=g), torch.tensor([C + 1, C + 3]),
        torch.tensor([True, False]), torch.randn(L, B, H, S, D, generator=g), torch.randn(L, B, H, S, D, generator=g),
        torch.randint(0, C + 1, (L, B, H, R, S), generator=g, dtype=torch.int32),
        torch.randint(0, 3, (L, B, H, R, K), generator=g, dtype=torch.int32),
        torch.randn(M, B, H, ring, D, generator=g), torch.randn(M, B, H, ring, D, generator=g),
    )
    return ExportSpec(
        prefill_args=prefill_args,
        decode_args=decode_args,
        prefill_dims={"input_ids": {0: batch, 1: lcm * nchunks}, "lengths": {0: batch}},
        decode_dims={
            "input_ids": {0: batch}, "positions": {0: batch}, "hashed": {0: batch},
            "lsh_keys": {1: batch, 3: cap}, "lsh_values": {1: batch, 3: cap}, "lsh_order": {1: batch, 4: cap},
            "lsh_counts": {1: batch}, "local_keys": {1: batch}, "local_values": {1: batch},
        },
        limits={"prefill_multiple": lcm, "prefill_min_padded": lcm * min_chunks, "prefill_max_padded": lcm * max_chunks,
                "min_capacity": min_cap},
    )


def _export_graph(graph: nn.Module, fmt: str, args: tuple[Tensor, ...], dims: dict, path: Path,
                  input_names: tuple[str, ...], output_names: tuple[str, ...]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript entry points warn in torch 2.13
        # the ONNX exporter notes that our two capacity axes share one name: that is intended
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        if fmt == "torchscript":
            torch.jit.save(torch.jit.script(graph), str(path))
        elif fmt == "pt2":
            torch.export.save(torch.export.export(graph, args, dynamic_shapes=dims), str(path))
        else:
            program = torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=dims, input_names=list(input_names),
                                        output_names=list(output_names), verbose=False)
            program.save(str(path))


def export_model(model: ReformerLM, out_dir: str | Path, fmt: str) -> list[Path]:
    """Write the prefill and decode graphs of `model` in format `fmt`, export.json, config.json and the files of
    the model's tokenizer (tokenizer.json / spiece.model), when it was loaded with one."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if model.dtype != torch.float32:
        raise ValueError(f"export needs a float32 model, got {model.dtype}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    spec = export_spec(model)
    if fmt == "torchscript":
        logger.warning("TorchScript is deprecated in torch %s (still works); torch.export (.pt2) is also offered",
                       torch.__version__)
    written = []
    for name, graph_cls, args, dims, ins, outs in (
        ("prefill", PrefillGraph, spec.prefill_args, spec.prefill_dims, PREFILL_INPUTS, PREFILL_OUTPUTS),
        ("decode", DecodeGraph, spec.decode_args, spec.decode_dims, DECODE_INPUTS, DECODE_OUTPUTS),
    ):
        path = out / f"{name}{SUFFIX[fmt]}"
        t0 = time.perf_counter()
        _export_graph(graph_cls(model).eval(), fmt, args, dims, path, ins, outs)
        logger.info("wrote %s (%.1f s)", path, time.perf_counter() - t0)
        written.append(path)
    _write_metadata(model, out, fmt, spec)
    copy_tokenizer_files(getattr(model, "tokenizer", None), out)  # the exported graphs speak the same text
    return written


def _write_metadata(model: ReformerLM, out: Path, fmt: str, spec: ExportSpec) -> None:
    """export.json: names, shapes (symbolic dims by name), limits and the config; several formats can share
    a directory, each adds its file names."""
    cfg = model.config
    meta_path = out / "export.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    files = meta.get("files", {})
    files[fmt] = {"prefill": f"prefill{SUFFIX[fmt]}", "decode": f"decode{SUFFIX[fmt]}"}
    L, M = "num_lsh_layers", "num_local_layers"
    meta = {
        "format_version": 1,
        "files": files,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "num_hashes": model.config.num_hashes,
        "rotation_fingerprint": model.rotation_fingerprint(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "limits": spec.limits,
        "dims": {L: cfg.attn_layers.count("lsh"), M: cfg.attn_layers.count("local"),
                 "H": cfg.num_attention_heads, "D": cfg.attention_head_size, "R": cfg.num_hashes,
                 "K": cfg.total_buckets, "ring": cfg.local_ring_size,
                 "V": cfg.vocab_size},
        "prefill": {
            "inputs": {"input_ids": ["batch", "padded_len"], "lengths": ["batch"]},
            "outputs": {"logits": ["batch", "padded_len", "V"], "lsh_keys": [L, "batch", "H", "padded_len", "D"],
                        "lsh_values": [L, "batch", "H", "padded_len", "D"],
                        "lsh_order": [L, "batch", "H", "R", "padded_len"], "lsh_counts": [L, "batch", "H", "R", "K"],
                        "local_keys": [M, "batch", "H", "ring", "D"], "local_values": [M, "batch", "H", "ring", "D"]},
        },
        "decode": {
            "inputs": {"input_ids": ["batch", 1], "positions": ["batch"], "hashed": ["batch"],
                       "lsh_keys": [L, "batch", "H", "capacity", "D"], "lsh_values": [L, "batch", "H", "capacity", "D"],
                       "lsh_order": [L, "batch", "H", "R", "capacity"], "lsh_counts": [L, "batch", "H", "R", "K"],
                       "local_keys": [M, "batch", "H", "ring", "D"], "local_values": [M, "batch", "H", "ring", "D"]},
            "outputs": {"logits": ["batch", 1, "V"], "hashed_out": ["batch"],
                        "lsh_new_keys": [L, "batch", "H", "D"], "lsh_new_values": [L, "batch", "H", "D"],
                        "lsh_order_out": [L, "batch", "H", "R", "capacity"],
                        "lsh_counts_out": [L, "batch", "H", "R", "K"],
                        "local_new_keys": [M, "batch", "H", "D"], "local_new_values": [M, "batch", "H", "D"]},
        },
        "config": cfg.to_dict(),
    }
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


def _onnx_checks(out_dir: Path) -> list[Check]:
    import onnx

    checks = []
    dynamic = {"prefill.onnx": {"input_ids": (0, 1), "lengths": (0,)},
               "decode.onnx": {"input_ids": (0,), "positions": (0,), "lsh_keys": (1, 3), "lsh_order": (1, 4)}}
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

    backend = {"onnx": "onnx", "torchscript": "torchscript", "pt2": "pt2"}[fmt]
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
            bad = []
            for b in range(B):
                eager_seq, seq = ref_cache.sequences[b], got_cache.sequences[b]
                for j, i in enumerate(lsh):
                    order, counts = eager_seq.sorted_positions(i), eager_seq.bucket_counts(i)
                    if order is not None and not (
                        torch.equal(order, seq.lsh_order[j, 0, :, :, :T])
                        and torch.equal(counts, seq.lsh_counts[j, 0])):
                        bad.append(f"row {b} layer {i}")
                    if (order is not None) != seq.hashed:
                        bad.append(f"row {b} hashed={seq.hashed}")
            if lsh:
                checks.append(Check(f"prefill bucket state T={T} B={B}", not bad, "equal" if not bad else str(bad)))
    for T in lengths[:2]:
        ids = torch.randint(3, cfg.vocab_size, (1, T), generator=g)
        ref_toks, ref_steps = _greedy(model, ids, new_tokens)
        got_toks, got_steps = _greedy(em, ids, new_tokens)
        checks.append(Check(f"greedy {new_tokens} tokens from T={T}", ref_toks == got_toks,
                            f"{got_toks}" if ref_toks == got_toks else f"eager {ref_toks} vs exported {got_toks}"))
        close(f"decode logits T={T} ({new_tokens} steps)", torch.stack(ref_steps), torch.stack(got_steps))
    # one graph call for two sequences of different lengths (ragged positions, batch 2 != example)
    stacked = ExportedModel(out_dir, backend, batch_mode="stack")
    ref_caches, got_caches = [], []
    for T in (lengths[0], lengths[-1]):
        ids = torch.randint(3, cfg.vocab_size, (1, T), generator=g)
        ref_caches.append(model.prefill(ids)[1])
        got_caches.append(stacked.prefill(ids)[1])
    from .cache import ReformerCache

    rb, gb = ReformerCache.batch(ref_caches), stacked.batch_caches(got_caches)
    refs, gots = [], []
    for _ in range(max(2, new_tokens // 2)):
        tok = torch.randint(3, cfg.vocab_size, (2, 1), generator=g)
        refs.append(model.decode_step(tok, rb)[0])
        gots.append(stacked.decode_step(tok, gb)[0])
    close(f"batched decode of lengths {lengths[0]} and {lengths[-1]}", torch.stack(refs), torch.stack(gots))
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
