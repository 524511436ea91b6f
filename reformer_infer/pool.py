"""Pooled decode state: every sequence's cache in shared, paged tensors, so that one decode step does the
same number of tensor ops for 1 or 64 sequences.

A sequence's state lives here from its first prefill unit on: `allocate` gives it a slot and pages, the
prefill writes its keys and values straight into those pages, and `release` gives them back. There is no
other representation of it. The pool knows shapes (from the config) and bookkeeping, not the network: the
attention layers compute bucket ids and hand them over (`set_order`). An engine keeps one pool for all its
requests; `ReformerLM.prefill` without a pool makes a private one for its sequences.

Layout (Ll LSH layers, Lc local layers, S sequence slots, N pages of P positions, K buckets, R rounds):
  * LSH keys / values (Ll, H, N*P, D): page i of a sequence holds its positions [i*P, (i+1)*P) in rows
    [page*P, page*P + P) of every head; a per-slot page table maps the two. Pages are allocated as a
    sequence grows and returned when it ends: nothing is copied to grow a sequence.
  * LSH bucket order, split in two so that a decode step never shifts a long table:
      - the *static* order (Ll, H, R, N*P) int32: a sequence's positions sorted by (bucket, position), each
        held as the pool row of its key (page * P + offset; a decode step reads a window's keys without
        mapping positions through the page table), paged like the keys (sorted slot s lives where position
        s would), with inclusive cumulative per-bucket counts `cum_static` (Ll, S, H, R, K);
      - the *delta*: the last <= M decoded positions, sorted by (bucket, position), as pool rows too, with
        their buckets (`dorder`, `dbuckets`: (Ll, S, H, R, M) int32; unused entries hold bucket K). A new token is
        inserted into the delta (a vectorised shift of at most M entries for the whole batch); when a
        sequence's delta is full it is merged into its static order in one linear pass (O(T) once per M
        tokens, not per token).
    The merged order is never materialised for a step: delta entry k sits at merged slot
    cum_static[bucket_k] + k, and any other merged slot s is static entry s - (delta entries before s).
  * Local rings (Lc, S, H, ring, D): slot = position % ring (the positions are implied by the length).

All per-step work is batched over the sequences of a step; Python loops run only over layers, and per
sequence only once per page (P tokens) and once per merge (M tokens).
"""

from __future__ import annotations

import copy
import heapq
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache import SequenceCache
from .config import ReformerConfig

PAGE_SIZE = 64
DELTA_SIZE = 128
# The pool's tensors a decode step reads (attribute names): the inputs of an exported decode step
STEP_STATE = ("keys", "values", "order", "cum_static", "dbuckets", "dorder", "local_keys", "local_values",
              "page_table", "len_d", "hashed_d")


@dataclass
class StepPlan:
    """What the host decides for one decode step (between steps): which slots (a device tensor, uploaded only
    when the batch's sequences change), whether any needs the dense attention, and how the per-slot tensors
    are read. A decode step is a function of the plan and the pool's tensors alone."""

    slots: Tensor  # (n,) int64 pool slots (a pad slot fills the rows of a padded batch)
    first: int | None  # the slots are first, first + 1, ...: per-slot tensors are read through views
    dense_span: int  # positions the dense attention covers (0: every sequence decodes by LSH windows)


@dataclass
class StepBatch:
    """The device-side view of one decode step, read from the pool's per-slot tensors inside the step (no
    tensor is built from host values), so the step has no host sync and its shapes depend on n alone."""

    slots: Tensor  # (n,) int64 pool slots
    lengths: Tensor  # (n,) int64 positions of the new tokens
    hashed: Tensor  # (n, 1, 1) bool: decodes by LSH windows (else densely: shorter than one chunk so far)
    new_rows: Tensor  # (n,) pool row of each new token's position (its page row)
    first: int | None
    dense_span: int
    memo: dict = field(default_factory=dict)  # per-step tensors every LSH layer would otherwise rebuild

    def select(self, t: Tensor) -> Tensor:
        """Rows of per-slot tensor t (slots first) for the batch."""
        if self.first is not None:
            return t.narrow(0, self.first, self.slots.numel())
        return t.index_select(0, self.slots)


@dataclass
class StepUpdates:
    """What one decode step writes into the pool, computed without writing it (`ReformerLM.decode_compute`)
    and written by `DecodePool.apply_step`: a step is a pure function of the pool's tensors, so an exported
    graph of it returns these few rows instead of the whole pool. Keyed by layer index within its kind."""

    lsh: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=dict)  # keys, values (n, H, D),
    # the delta after the insert: buckets and rows (n, H, R, M) int32
    local: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # ring keys, values (n, H, D)


def _tracing() -> bool:
    """Whether the step is being traced for export (torch.export / ONNX, or TorchScript's tracer)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class DecodePool:
    """Paged decode state for many sequences of one model (see the module docstring)."""

    def __init__(self, config: ReformerConfig, *, num_hashes: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, sequences: int = 1, tokens: int = 0,
                 page_size: int = PAGE_SIZE, delta_size: int = DELTA_SIZE) -> None:
        cfg = config
        self.H, self.D = cfg.num_attention_heads, cfg.attention_head_size
        self.P, self.M = int(page_size), int(delta_size)
        if self.P < 1 or self.P & (self.P - 1) or self.M < 1:
            raise ValueError("page_size must be a power of two and delta_size positive")
        self.shift = self.P.bit_length() - 1  # page of a position: pos >> shift; offset: pos & (P - 1)
        kinds = cfg.attn_layers
        self.lsh_index = {i: j for j, i in enumerate(i for i, k in enumerate(kinds) if k == "lsh")}
        self.local_index = {i: j for j, i in enumerate(i for i, k in enumerate(kinds) if k != "lsh")}
        self.R = int(num_hashes) if self.lsh_index else 1
        self.K = cfg.total_buckets
        self.ring = cfg.local_ring_size
        self.max_pages_per_seq = -(-cfg.max_context // self.P) + 1
        self.device, self.dtype = torch.device(device), dtype
        self._free_slots: list[int] = []
        self._free_pages: list[int] = []
        self._scratch: dict[str, Tensor] = {}
        self.C = cfg.lsh_attn_chunk_length
        self._step_key: tuple[int, ...] = ()
        self._step_slots: Tensor | None = None
        self._pad: int | None = None
        self.generation = 0  # bumped whenever the pool's tensors are reallocated (captured steps are stale)
        # Slots and pages are taken and given back by the thread that runs the model (an engine defers the
        # release of an aborted request to its loop); the free lists are guarded all the same.
        self._lock = threading.RLock()
        self.S = self.N = 0
        # per-slot bookkeeping (host side)
        self.length: list[int] = []
        self.static_len: list[int] = []
        self.is_hashed: list[bool] = []
        self.pages: list[list[int]] = []
        self.live: list[bool] = []
        self.epoch: list[int] = []
        self.borrowed: list[int] = []  # leading pages a fork shares with the sequence it was forked from
        self.held: list[list[int]] = []  # per slot: the partial page of the sequence it was forked from
        self.refs: list[int] = []  # per page: sequences holding it (a page is free again at 0)
        self._alloc_slots(max(1, sequences))
        self._alloc_pages(max(1, -(-max(tokens, 1) // self.P) + sequences))
        # Index tensors of a step's writes: a step writes the pool's tensors themselves (`index_put_` on the
        # whole tensor, never on a view of one layer), which a compiler updates in place; a write into a
        # view became a copy of the whole tensor under torch.compile (inductor, CPU: 8 ms a step). The layer ids
        # are (1,) tensors, not 0-dim ones: AOTInductor (torch 2.13) packaged two 0-dim constants of one graph as
        # one, so every layer's write landed in the same layer (`step_graphs.aoti_capture`; a (1,) index
        # broadcasts as a 0-dim one does).
        nl = max(len(self.lsh_index), len(self.local_index), 1)
        self._layer_ids = [torch.tensor([j], device=self.device) for j in range(nl)]
        self._heads = torch.arange(self.H, device=self.device)

    # ---- storage ---------------------------------------------------------------------------------
    @torch.inference_mode(False)  # normal tensors: updated in place in and out of inference mode
    def _alloc_slots(self, S: int) -> None:
        """Grow every per-slot tensor to S slots (copying the old ones: rare, amortised by doubling)."""
        self.generation += 1
        Ll, Lc, H, D, R, K = len(self.lsh_index), len(self.local_index), self.H, self.D, self.R, self.K
        dev, dt = self.device, self.dtype
        new = {
            "cum_static": torch.zeros(Ll, S, H, R, K, dtype=torch.int32, device=dev),
            "dbuckets": torch.full((Ll, S, H, R, self.M), K, dtype=torch.int32, device=dev),
            "dorder": torch.zeros(Ll, S, H, R, self.M, dtype=torch.int32, device=dev),
            "local_keys": torch.zeros(Lc, S, H, self.ring, D, dtype=dt, device=dev),
            "local_values": torch.zeros(Lc, S, H, self.ring, D, dtype=dt, device=dev),
            "page_table": torch.zeros(S, self.max_pages_per_seq, dtype=torch.long, device=dev),
            # device copies of the lengths and the hashed flags, read by a decode step (no upload per step)
            "len_d": torch.zeros(S, dtype=torch.long, device=dev),
            "hashed_d": torch.zeros(S, dtype=torch.bool, device=dev),
        }
        for name, t in new.items():
            if self.S:
                old = getattr(self, name)
                if name in ("page_table", "len_d", "hashed_d"):
                    t[: self.S] = old
                else:
                    t[:, : self.S] = old
            setattr(self, name, t)
        grow = S - self.S
        self.length += [0] * grow
        self.static_len += [0] * grow
        self.is_hashed += [False] * grow
        self.pages += [[] for _ in range(grow)]
        self.live += [False] * grow
        self.epoch += [0] * grow
        self.borrowed += [0] * grow
        self.held += [[] for _ in range(grow)]
        for slot in range(self.S, S):
            heapq.heappush(self._free_slots, slot)
        self.S = S

    @torch.inference_mode(False)
    def _alloc_pages(self, N: int) -> None:
        """Grow the paged tensors to N pages. `torch.empty`: on a CPU, pages never written take no memory."""
        Ll, H, D, R, P = len(self.lsh_index), self.H, self.D, self.R, self.P
        dev, dt = self.device, self.dtype
        self.generation += 1
        if N * P >= 2**31:
            raise ValueError(f"a pool of {N * P} positions does not fit the int32 row numbers of its order tables")
        keys = torch.empty(Ll, H, N * P, D, dtype=dt, device=dev)
        values = torch.empty(Ll, H, N * P, D, dtype=dt, device=dev)
        order = torch.empty(Ll, H, R, N * P, dtype=torch.int32, device=dev)
        if self.N:
            keys[:, :, : self.N * P] = self.keys
            values[:, :, : self.N * P] = self.values
            order[..., : self.N * P] = self.order
        self.keys, self.values, self.order = keys, values, order
        self.refs += [0] * (N - self.N)
        self._free_pages = list(range(N - 1, self.N - 1, -1)) + self._free_pages
        self.N = N

    def _select_into(self, name: str, src: Tensor, index: Tensor, dim: int = 0) -> Tensor:
        """`src.index_select(dim, index)` into a buffer reused across steps (the caller is done with the last
        result before asking again under the same name). Window gathers are MBs per step; a fresh buffer
        each time would be fresh pages to fault in (large allocations are mmapped, see memory.py). CPU only."""
        if self.device.type != "cpu" or _tracing():  # a captured step keeps the addresses it read: no buffer
            return torch.index_select(src, dim, index)  # swaps there; a traced one has no buffers of its own
        shape = list(src.shape)
        shape[dim] = index.numel()
        numel = math.prod(shape)
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != src.dtype:
            buf = self._scratch[name] = src.new_empty(numel)
        return torch.index_select(src, dim, index, out=buf[:numel].view(shape))

    def _take_slot(self) -> int:
        with self._lock:
            if not self._free_slots:
                self._alloc_slots(2 * self.S)
            return heapq.heappop(self._free_slots)  # the lowest: running sequences stay on a compact range

    def _take_pages(self, n: int) -> list[int]:
        with self._lock:
            if len(self._free_pages) < n:
                self._alloc_pages(max(2 * self.N, self.N + n - len(self._free_pages)))
            got = [self._free_pages.pop() for _ in range(n)]
            for p in got:
                self.refs[p] = 1
            return got

    def _ensure_pages(self, slot: int, positions: int) -> None:
        need = -(-positions // self.P) - len(self.pages[slot])
        if need > 0:
            got = self._take_pages(need)
            first = len(self.pages[slot])
            self.pages[slot].extend(got)
            self.page_table[slot, first : first + need] = torch.tensor(got, device=self.device)

    # ---- sequences -------------------------------------------------------------------------------
    def allocate(self, capacity: int) -> SequenceCache:
        """A new, empty sequence with pages for `capacity` positions (it gets more as it grows)."""
        with self._lock:
            slot = self._take_slot()
            self.live[slot] = True
            self.epoch[slot] += 1
            self.pages[slot] = []
            self.length[slot] = self.static_len[slot] = 0
            self.is_hashed[slot] = False
        self.len_d[slot] = 0
        self.hashed_d[slot] = False
        try:
            self._ensure_pages(slot, max(1, capacity))
        except BaseException:
            self.release(slot, self.epoch[slot])
            raise
        self.dbuckets[:, slot] = self.K
        return SequenceCache(self, slot, self.epoch[slot])

    def holds(self, slot: int, epoch: int) -> bool:
        """Whether the sequence `epoch` of `slot` still holds its state (not released)."""
        return 0 <= slot < self.S and self.live[slot] and self.epoch[slot] == epoch

    def release(self, slot: int, epoch: int) -> None:
        """Return a sequence's slot and pages (a no-op for a sequence already released)."""
        with self._lock:
            if not self.holds(slot, epoch):
                return
            self._drop_pages(self.pages[slot] + self.held[slot])
            self.pages[slot] = []
            self.borrowed[slot] = 0
            self.held[slot] = []
            self.live[slot] = False
            self.length[slot] = self.static_len[slot] = 0
            self.is_hashed[slot] = False
            heapq.heappush(self._free_slots, slot)

    def _drop_pages(self, pages: list[int]) -> None:
        """One holder fewer for each of `pages`; those no sequence holds any more are free again (lock held)."""
        for p in reversed(pages):
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self._free_pages.append(p)

    # ---- sharing (contexts) --------------------------------------------------------------------
    @property
    def page_nbytes(self) -> int:
        """Bytes of one page (every LSH layer's keys, values and order entries of P positions)."""
        return page_bytes(len(self.lsh_index), self.H, self.D, self.R, self.P, self.dtype)

    def shared_pages(self, length: int) -> int:
        """Pages a fork of a sequence of `length` positions shares with it: the full ones (the last partial page
        is copied, since the fork writes its next positions there)."""
        return length >> self.shift

    def fork(self, src: SequenceCache, capacity: int) -> SequenceCache:
        """A new sequence that continues `src` (a prefilled sequence, left as it is) with room for `capacity`
        positions. It shares `src`'s full pages (refcounted, copy-on-write: `_own`), gets its own copy of the
        last partial page (its next positions go there) and of the per-slot state (bucket counts, delta order,
        local rings, lengths), so both decode on independently. The order entries are pool rows and some name
        rows of `src`'s partial page: the fork keeps that page alive too until it owns its order. `src` may be
        released before the fork: shared pages live on until their last holder releases them."""
        if src.released or src.pool is not self:
            raise ValueError("fork of a released sequence or of another pool's")
        a, T = src.slot, src.length
        shared = self.shared_pages(T)
        with self._lock:
            slot = self._take_slot()
            self.live[slot] = True
            self.epoch[slot] += 1
            self.pages[slot] = list(self.pages[a][:shared])
            for p in self.pages[slot]:
                self.refs[p] += 1
            self.borrowed[slot] = shared
            self.held[slot] = []
            if T > shared * self.P:
                partial = self.pages[a][shared]
                self.refs[partial] += 1
                self.held[slot] = [partial]
        seq = SequenceCache(self, slot, self.epoch[slot])
        try:
            self.page_table[slot, :shared] = self.page_table[a, :shared]
            self._ensure_pages(slot, max(T + 1, capacity))
            if self.held[slot]:  # the partial page: the fork's own copy, where its next positions go
                self._copy_page(self.held[slot][0], self.pages[slot][shared])
            for name in ("cum_static", "dbuckets", "dorder", "local_keys", "local_values"):
                t = getattr(self, name)
                t[:, slot] = t[:, a]
            self.len_d[slot] = self.len_d[a]
            self.hashed_d[slot] = self.hashed_d[a]
            self.length[slot], self.static_len[slot] = self.length[a], self.static_len[a]
            self.is_hashed[slot] = self.is_hashed[a]
        except BaseException:
            seq.release()
            raise
        return seq

    def _copy_page(self, src: int, dst: int) -> None:
        P = self.P
        self.keys[:, :, dst * P : dst * P + P] = self.keys[:, :, src * P : src * P + P]
        self.values[:, :, dst * P : dst * P + P] = self.values[:, :, src * P : src * P + P]
        self.order[..., dst * P : dst * P + P] = self.order[..., src * P : src * P + P]

    def _own(self, slot: int) -> None:
        """Copy-on-write: before a sequence rewrites the order of its positions (a delta merge, the hashing at
        one chunk), every page it shares gets its own copy, and its order entries (pool rows) that name rows
        of a shared page, or of the page it was forked from, are moved to its copies: from then on it holds
        nothing of another sequence's."""
        pages, held = self.pages[slot], self.held[slot]
        shared = [i for i, p in enumerate(pages) if self.refs[p] > 1]
        if not shared and not held:
            return
        got = self._take_pages(len(shared)) if shared else []
        remap = torch.arange(self.N, device=self.device)  # page -> page: identity but for the copied ones
        if held:  # the source's partial page: the fork's copy sits at the same page index
            remap[held[0]] = pages[self.borrowed[slot]]
        for i, new in zip(shared, got, strict=True):
            self._copy_page(pages[i], new)
            remap[pages[i]] = new
        with self._lock:
            self._drop_pages([pages[i] for i in shared] + held)
            for i, new in zip(shared, got, strict=True):
                pages[i] = new
            self.borrowed[slot] = 0
            self.held[slot] = []
        self.page_table[slot, : len(pages)] = torch.tensor(pages, device=self.device)
        if not self.is_hashed[slot]:  # no order yet (the hashing about to run writes it)
            return
        # the static order lives at sorted slots [0, static_len); the delta holds the rest
        rows = self._rows(slot, self.static_len[slot])
        for j in range(len(self.lsh_index)):
            self.order[j].index_copy_(-1, rows, self._moved(self.order[j].index_select(-1, rows), remap))
        self.dorder[:, slot] = self._moved(self.dorder[:, slot], remap)

    def _moved(self, rows: Tensor, remap: Tensor) -> Tensor:
        """Pool rows `rows` (int32) with their pages mapped through `remap`."""
        r = rows.long()
        return ((remap[r >> self.shift] << self.shift) | (r & (self.P - 1))).to(torch.int32)

    def trim(self, seq: SequenceCache) -> None:
        """Give back the pages past a sequence's length (a context keeps only what it holds)."""
        slot = seq.slot
        keep = max(1, -(-self.length[slot] // self.P))
        with self._lock:
            extra = self.pages[slot][keep:]
            if extra:
                self._drop_pages(extra)
                del self.pages[slot][keep:]

    @property
    def slots_in_use(self) -> int:
        """Slots held by sequences (the pad slot of padded batches not counted)."""
        return self.S - len(self._free_slots) - (self._pad is not None)

    @property
    def pages_in_use(self) -> int:
        return self.N - len(self._free_pages) - (len(self.pages[self._pad]) if self._pad is not None else 0)

    def sequence_bytes(self, slot: int) -> int:
        """Bytes a sequence holds as its own: a fork's pages shared with the sequence it was forked from are
        not counted (they are that sequence's)."""
        return (len(self.pages[slot]) - self.borrowed[slot]) * page_bytes(len(self.lsh_index), self.H, self.D, self.R, self.P, self.dtype) \
            + slot_bytes(len(self.lsh_index), len(self.local_index), self.H, self.D, self.R, self.K, self.M,
                         self.ring, self.dtype)

    # ---- prefill ---------------------------------------------------------------------------------
    def rows_of(self, slots: list[int], T: int) -> Tensor:
        """(B, T) pool rows of positions (or static sorted slots) [0, T) of the sequences in `slots` (their
        pages are held)."""
        return self._first_rows(self.page_table.index_select(0, upload(slots, self.device)), T)

    def table_rows(self, rows: Tensor) -> Tensor:
        """Rows of the (H * N * P, D) key / value tables (`lsh_tables`) of pool rows `rows` (n, H or 1, ...)
        in every head. Recompute after the pool grows (N changes; pool rows do not)."""
        return head_rows(rows, self.H, self.keys.shape[2])  # N * P, read from the tensor (symbolic when traced)

    def lsh_tables(self, j: int) -> tuple[Tensor, Tensor]:
        """LSH layer j's keys and values as (H * N * P, D) tables: head h's pool row r is table row
        h * N * P + r (see `table_rows`)."""
        return self.keys[j].view(-1, self.D), self.values[j].view(-1, self.D)

    def write_ring(self, j: int, seq: SequenceCache, k: Tensor, v: Tensor, T: int, start: int = 0) -> None:
        """Keep local layer j's ring share of a prefill of T positions: k, v (H, n, D) hold positions
        [start, start + n), so a prefill working slice by slice hands each slice over as it goes."""
        first, end = max(start, T - self.ring), min(T, start + k.shape[1])
        if first >= end:
            return
        at = torch.arange(first, end, device=k.device) % self.ring
        self.local_keys[j, seq.slot][:, at] = k[:, first - start : end - start]
        self.local_values[j, seq.slot][:, at] = v[:, first - start : end - start]

    def set_order(self, j: int, slots: list[int], order: Tensor, buckets: Tensor) -> None:
        """LSH layer j's bucket order of the sequences in `slots`, T positions each: order (B, H, R, T) their positions
        sorted by (bucket, position), buckets (B, H, R, T) each position's bucket. Becomes their static order
        (as pool rows) and per-bucket counts; their deltas are emptied."""
        B, T = len(slots), order.shape[-1]
        for s in slots:
            self._own(s)
        sl = upload(slots, self.device)
        table = self.page_table.index_select(0, sl)
        rows = self._first_rows(table, T).view(-1)  # where sorted slots [0, T) live
        for h in range(self.H):  # a head at a time: the position -> row temporaries of a 64K prefill stay small
            as_rows = self._page_rows(table, order[:, h].reshape(B, -1)).view(B, self.R, T).to(torch.int32)
            self.order[j, h].index_copy_(-1, rows, as_rows.transpose(0, 1).reshape(self.R, B * T))
        counts = torch.zeros(B, self.H, self.R, self.K, dtype=torch.int32, device=self.device)
        counts.scatter_add_(-1, buckets, torch.ones_like(buckets, dtype=torch.int32))
        self.cum_static[j].index_copy_(0, sl, counts.cumsum(-1, dtype=torch.int32))
        self.dbuckets[j].index_fill_(0, sl, self.K)

    def finish_prefill(self, seqs: list[SequenceCache], T: int, hashed: bool) -> None:
        """The prefill of T positions is written: the sequences decode from position T on."""
        for s in seqs:
            self._ensure_pages(s.slot, T + 1)
            self.length[s.slot] = self.static_len[s.slot] = T
            self.is_hashed[s.slot] = hashed
            self.len_d[s.slot] = T
            self.hashed_d[s.slot] = hashed

    def _page_rows(self, table: Tensor, pos: Tensor) -> Tensor:
        """Pool rows of positions (or static sorted slots) `pos` (n, ...) of the sequences whose page-table
        rows are `table` (n, pages)."""
        page = table.gather(1, (pos >> self.shift).reshape(table.shape[0], -1).long()).view(pos.shape)
        return page * self.P + (pos & (self.P - 1))

    def _first_rows(self, table: Tensor, n: int) -> Tensor:
        """(B, n) pool rows of positions (or static sorted slots) [0, n) of the sequences whose page-table
        rows are `table` (B, pages)."""
        return self._page_rows(table, torch.arange(n, device=self.device).expand(table.shape[0], n))

    def _rows(self, slot: int, n: int) -> Tensor:
        """Pool rows of a sequence's positions (or static sorted slots) [0, n)."""
        return self._first_rows(self.page_table[slot : slot + 1], n)[0]

    def _positions_of(self, slot: int, rows: Tensor) -> Tensor:
        """The positions of a sequence's pool rows (for inspection)."""
        inverse = torch.full((self.N,), -1, dtype=torch.long, device=self.device)
        pages = self.pages[slot]
        inverse[torch.tensor(pages, dtype=torch.long, device=self.device)] = torch.arange(len(pages), device=self.device)
        for p in self.held[slot]:  # a fork's order may name rows of the partial page it was forked from
            inverse[p] = self.borrowed[slot]
        rows = rows.long()
        return (inverse[rows >> self.shift] * self.P + (rows & (self.P - 1))).to(torch.int32)

    # ---- one decode step -----------------------------------------------------------------------
    def begin_step(self, slots: list[int], full_attention: bool = False, out: Tensor | None = None) -> StepPlan:
        """Plan a decode step of the sequences `slots` (host side, between steps): room for every new token
        (pages are normally held from the prefill on, sized to the request), the slot tensor (uploaded only
        when the batch's sequences change, or copied into `out`, a static buffer of a captured step whose
        extra rows take the pad slot), and whether a dense attention is needed."""
        for s in slots:
            self._ensure_pages(s, self.length[s] + 1)
        key = tuple(slots)
        if out is not None:
            first = None
            if key != self._step_key or self._step_slots is not out:
                full = slots + [self.pad_slot()] * (out.numel() - len(slots))
                out.copy_(upload(full, self.device))
                self._step_key, self._step_slots = key, out
        else:
            if key != self._step_key or self._step_slots is None or self._step_slots.numel() != len(slots):
                self._step_key, self._step_slots = key, upload(slots, self.device)
            first = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None
        # the dense attention covers the first chunk (every position a not-yet-hashed sequence has) when
        # some sequence still needs it; with full attention, every position so far
        dense = any(not self.is_hashed[s] for s in slots) or full_attention
        span = (max(self.length[s] for s in slots) + 1 if full_attention else self.C) if dense else 0
        return StepPlan(self._step_slots, first, span)

    def step_view(self, plan: StepPlan) -> StepBatch:
        """The step's index tensors, read from the device-side state (inside the step)."""
        sl, first = plan.slots, plan.first
        if first is not None:
            n = sl.numel()
            T, hashed, table = self.len_d.narrow(0, first, n), self.hashed_d.narrow(0, first, n), \
                self.page_table.narrow(0, first, n)
        else:
            T, hashed, table = self.len_d.index_select(0, sl), self.hashed_d.index_select(0, sl), \
                self.page_table.index_select(0, sl)
        rows = self._page_rows(table, T.view(-1, 1)).view(-1)
        return StepBatch(sl, T, hashed.view(-1, 1, 1), rows, first, plan.dense_span)

    def end_step(self, plan: StepPlan, slots: list[int]) -> list[int]:
        """Advance lengths (on the device too; pad rows stay); merge full deltas (between steps). Returns the
        slots that reached one LSH chunk with this token and must now be hashed (the attention layers do
        it: `set_order`, then `mark_hashed`)."""
        if plan.first is not None:
            self.len_d.narrow(0, plan.first, len(slots)).add_(1)
        else:
            real = plan.slots.narrow(0, 0, len(slots))
            self.len_d.index_add_(0, real, torch.ones_like(real))
        due = []
        for s in slots:
            self.length[s] += 1
            if self.is_hashed[s]:
                if self.length[s] - self.static_len[s] >= self.M:
                    self._merge(s)
            elif self.length[s] >= self.C and self.lsh_index:
                due.append(s)
        return due

    def can_decode_tokens(self, slot: int, n: int) -> bool:
        """Whether n tokens of sequence `slot` can run in one layer-by-layer pass (`token_batches`): it decodes by
        LSH windows already and its delta takes them without a merge (a merge rewrites every layer's order at
        once, between two tokens)."""
        return self.is_hashed[slot] and self.length[slot] + n - self.static_len[slot] < self.M

    def room_for_tokens(self, slot: int) -> int:
        """Tokens a layer-by-layer pass can take now for hashed sequence `slot`, merging its delta first when it
        is full enough to take none (a merge re-lays the same order out: the windows, and so the numbers,
        are the same whenever it happens)."""
        if self.length[slot] - self.static_len[slot] >= self.M - 1:
            self._merge(slot)
        return self.M - 1 - (self.length[slot] - self.static_len[slot])

    def token_batches(self, slots: list[int], counts: list[int]) -> list[StepBatch]:
        """Step views for a pass that runs the next counts[i] positions of sequences slots[i] layer by layer
        (see `can_decode_tokens`): view t holds, in order, the sequences with more than t tokens, at their
        position length + t, so each token of a layer runs exactly as in a decode step (`advance` after)."""
        for s, c in zip(slots, counts, strict=True):
            self._ensure_pages(s, self.length[s] + c)
        out = []
        for t in range(max(counts)):
            rows = [s for s, c in zip(slots, counts, strict=True) if c > t]
            sl = upload(rows, self.device)
            T = upload([self.length[s] + t for s in rows], self.device)
            table = self.page_table.index_select(0, sl)
            out.append(StepBatch(sl, T, self.hashed_d.index_select(0, sl).view(-1, 1, 1),
                                 self._page_rows(table, T.view(-1, 1)).view(-1), None, 0))
        return out

    def advance(self, slot: int, n: int) -> None:
        """A `token_batches` pass of n tokens is done: the sequence holds them."""
        self.length[slot] += n
        self.len_d[slot] += n

    def pad_slot(self) -> int:
        """A slot no sequence owns, for the extra rows of a padded batch: it holds one page, never advances,
        counts as hashed (pads never force the dense attention), and whatever a step writes there is never read
        by a real sequence."""
        if self._pad is None:
            with self._lock:
                slot = self._take_slot()
                self._ensure_pages(slot, 1)
                self._pad = slot
                self.hashed_d[slot] = True
        return self._pad

    def mark_hashed(self, slots: list[int]) -> None:
        """Sequences whose every position was just hashed and sorted (`set_order`): they decode by LSH windows."""
        for s in slots:
            self.is_hashed[s] = True
            self.static_len[s] = self.length[s]
            self.hashed_d[s] = True

    def apply_step(self, batch: StepBatch, updates: StepUpdates) -> None:
        """Write a step's updates into the pool: the new tokens' LSH keys/values at their page rows, the LSH
        deltas after the insert, the local rings' new entries at slot position % ring."""
        heads = self._heads
        for j, (k, v, dbk, dor) in updates.lsh.items():
            lj = self._layer_ids[j]
            at_rows = (lj, heads[:, None], batch.new_rows[None, :])  # (H, n) rows of layer j
            self.keys.index_put_(at_rows, k.transpose(0, 1))
            self.values.index_put_(at_rows, v.transpose(0, 1))
            if batch.first is not None:
                self.dbuckets[j].narrow(0, batch.first, dbk.shape[0]).copy_(dbk)
                self.dorder[j].narrow(0, batch.first, dor.shape[0]).copy_(dor)
            else:
                self.dbuckets.index_put_((lj, batch.slots), dbk)
                self.dorder.index_put_((lj, batch.slots), dor)
        at = (batch.slots[:, None], heads[None, :], (batch.lengths % self.ring)[:, None])  # (n, H)
        for j, (k, v) in updates.local.items():
            self.local_keys.index_put_((self._layer_ids[j], *at), k)
            self.local_values.index_put_((self._layer_ids[j], *at), v)

    def lsh_window(self, j: int, batch: StepBatch, buckets: Tensor, C: int, before: int, after: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The attention windows of the step's sequences, per head and round, and their deltas with the new
        tokens of the hashed ones inserted (the others' left as they are); writes nothing.

        buckets (n, H, R). The new token (position T) lands at slot p of its round's T+1 sorted entries (p =
        cached tokens with bucket <= its own) and sees slots [(p // C - before) * C, + W) modulo T + 1, as
        transformers' cached decode does. Returns the window's rows in the layer's key and value tables
        (`lsh_tables`) and where the window holds the new token itself, both (n, H, R, W), and the new delta
        buckets and rows (n, H, R, M). The new token's key is not in the tables yet: its window entries name
        a cached row instead (the caller masks them and adds the new token's own term). Rows of sequences
        not hashed yet are meaningless but in range (the caller masks them).
        Nothing here is O(buckets) or O(length), and every shape is fixed by n: the delta is read whole
        (unused entries hold bucket K), the merged order is addressed through the delta's slots.
        """
        N, K, M = self.order.shape[-1], self.K, self.M  # N * P rows (read from the tensor: symbolic when traced)
        sl, T1, last, hr, base, ar_m, ar, offs, pt, new = self._window_constants(batch, C * (1 + before + after))
        b = buckets.unsqueeze(-1).int()  # (n, H, R, 1)
        cum = self.cum_static[j].view(-1)
        dbk = batch.select(self.dbuckets[j]).contiguous()  # (n, H, R, M) sorted; unused entries hold K
        dor = batch.select(self.dorder[j])
        # int32 slot arithmetic (half the bytes; int32 remainder is ~1.6x faster than int64 on CPU)
        q = torch.searchsorted(dbk, b, right=True, out_int32=True)  # delta entries with bucket <= b: where it goes
        p = cum.take(base + b) + q  # the new token's slot in the merged order
        # merged slot of delta entry k: every static entry of its bucket and below, and the k delta entries
        # before it; unused entries sort last
        dms = torch.where(dbk < K, cum.take(base + dbk.clamp(max=K - 1)) + ar_m, torch.iinfo(torch.int32).max)
        start = (torch.div(p, C, rounding_mode="floor") - before) * C
        slots = torch.remainder(start + offs, T1)  # (n, H, R, W)
        is_new = slots == p
        s = torch.where(slots > p, slots - 1, slots).clamp_(max=last)  # among the T cached
        nd = torch.searchsorted(dms, s)  # delta entries before merged slot s
        ndc = nd.clamp(max=M - 1)
        in_delta = dms.gather(-1, ndc) == s
        si = (s - nd).clamp_(min=0)  # otherwise it is static entry s - nd
        srow = self.order[j].view(-1).take(hr * N + self._page_rows(pt, si))  # the order holds pool rows
        # (the pad slot has no cached position at all: whatever its order holds, kept in range)
        rows = torch.where(in_delta, dor.gather(-1, ndc), srow).clamp_(min=0, max=N - 1)
        # a sequence not hashed yet has no order: its rows are whatever the tables hold, kept in range
        rows = self.table_rows(torch.where(batch.hashed.unsqueeze(-1), rows, new).long())
        # insert the new token at q (after the delta entries of its bucket and below: its position is largest)
        src = (ar - (ar > q).long()).clamp_(min=0)  # int64: a gather index
        h = batch.hashed.unsqueeze(-1)
        new_dbk = torch.where(h & (ar == q), b, torch.where(h, dbk.gather(-1, src), dbk))
        new_dor = torch.where(h & (ar == q), new, torch.where(h, dor.gather(-1, src), dor))
        return rows, is_new, new_dbk, new_dor

    def _window_constants(self, batch: StepBatch, W: int) -> tuple[Tensor, ...]:
        """Index tensors of `lsh_window` that depend on the step's sequences only, built once per step (every
        LSH layer of the step reads them)."""
        key = ("lsh_window", W)
        if key not in batch.memo:
            H, R, K, M = self.H, self.R, self.K, self.M
            dev = batch.slots.device
            sl, T = batch.slots, batch.lengths.view(-1, 1, 1, 1).int()
            hr = torch.arange(H * R, device=dev).view(1, H, R, 1)
            base = (sl.view(-1, 1, 1, 1) * (H * R) + hr) * K  # row of each (sequence, head, round) in cum_static
            batch.memo[key] = (
                sl, T + 1, (T - 1).clamp(min=0), hr, base,
                torch.arange(M, device=dev, dtype=torch.int32), torch.arange(M, device=dev),
                torch.arange(W, device=dev, dtype=torch.int32), batch.select(self.page_table),
                batch.new_rows.view(-1, 1, 1, 1).int(),  # the new tokens' pool rows
            )
        return batch.memo[key]

    def _gather_kv(self, j: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (n, H, ..., D) of LSH layer j at pool rows `rows` (n, H or 1, ...), every head."""
        H, D = self.H, self.D
        shape = (rows.shape[0], H, *rows.shape[2:])
        flat = self.table_rows(rows).expand(shape).reshape(-1)
        kk = self._select_into("keys", self.keys[j].view(-1, D), flat).view(*shape, D)
        vv = self._select_into("values", self.values[j].view(-1, D), flat).view(*shape, D)
        return kk, vv

    def dense_keys(self, j: int, batch: StepBatch, span: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values (n, H, span, D) at positions [0, span) of the step's sequences, and those positions
        (span,). Positions past a sequence's new token are the caller's to mask (causally); they read
        whatever row their page-table entry names, never memory outside the pool."""
        pt = batch.select(self.page_table)  # (n, pages)
        pos = torch.arange(span, device=pt.device)
        kk, vv = self._gather_kv(j, self._page_rows(pt, pos.expand(pt.shape[0], span)).unsqueeze(1))
        return kk, vv, pos

    def keys_of(self, j: int, slots: list[int], T: int) -> Tensor:
        """LSH layer j's cached keys (S, H, T, D) at positions [0, T) of sequences `slots` (the dense-to-LSH
        transition hashes them all)."""
        rows = self.rows_of(slots, T).view(-1)
        return self.keys[j].index_select(1, rows).view(self.H, len(slots), T, self.D).transpose(0, 1)

    def _merged_order(self, j: int, slot: int) -> tuple[Tensor, Tensor]:
        """LSH layer j's (H, R, length) sorted order with its static order and delta merged (one linear
        pass), and the inclusive per-bucket cumulative counts of the merged order."""
        Ts, L = self.static_len[slot], self.length[slot]
        m = L - Ts
        cum = self.cum_static[j, slot]  # (H, R, K)
        dbk, dor = self.dbuckets[j, slot, :, :, :m].long(), self.dorder[j, slot, :, :, :m]
        dms = cum.gather(-1, dbk) + torch.arange(m, device=self.device)  # the delta entries' merged slots
        in_delta = torch.zeros(*cum.shape[:2], L, dtype=torch.bool, device=self.device)
        in_delta.scatter_(-1, dms, True)
        merged = torch.empty(*cum.shape[:2], L, dtype=torch.int32, device=self.device)
        merged.masked_scatter_(in_delta, dor.contiguous())  # every row holds m delta entries, in order
        merged.masked_scatter_(~in_delta, self.order[j].index_select(-1, self._rows(slot, Ts)))
        dcounts = torch.zeros_like(cum).scatter_add_(-1, dbk, torch.ones_like(dor))
        return merged, cum + dcounts.cumsum(-1)

    def _merge(self, slot: int) -> None:
        """Fold a sequence's full delta into its static order (O(length) once per `M` tokens)."""
        self._own(slot)
        rows = self._rows(slot, self.length[slot])
        for j in range(len(self.lsh_index)):
            merged, cum = self._merged_order(j, slot)
            self.order[j].index_copy_(-1, rows, merged)
            self.cum_static[j, slot] = cum
            self.dbuckets[j, slot] = self.K
        self.static_len[slot] = self.length[slot]

    # ---- local layers --------------------------------------------------------------------------
    def local_window(self, j: int, batch: StepBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Local layer j's rings (n, H, ring, D) of the step's sequences and the position each ring entry holds
        once the new token is in (n, ring; negative: never written). The new token's own entry (position T,
        slot T % ring) is not written yet: it holds an older position's key (the caller substitutes its own)."""
        ring = self.ring
        T = batch.lengths.view(-1, 1)
        r = torch.arange(ring, device=T.device)
        pos = T - torch.remainder(T - r, ring)
        lk, lv = self.local_keys[j], self.local_values[j]
        if batch.first is not None:  # a compact range of slots: views, no copies
            return lk.narrow(0, batch.first, T.shape[0]), lv.narrow(0, batch.first, T.shape[0]), pos
        return self._select_into("keys", lk, batch.slots), self._select_into("values", lv, batch.slots), pos

    def state(self) -> tuple[Tensor, ...]:
        """The tensors a decode step reads and writes, in the order of `STEP_STATE`."""
        return tuple(getattr(self, name) for name in STEP_STATE)

    def with_tensors(self, **tensors: Tensor) -> DecodePool:
        """This pool's layout and bookkeeping over other state tensors (same names and layout): export traces
        a decode step with the state as the graph's inputs."""
        view = copy.copy(self)
        view._scratch = {}
        for name, t in tensors.items():
            if not isinstance(getattr(self, name, None), Tensor):
                raise ValueError(f"{name!r} is not a state tensor of the pool")
            setattr(view, name, t)
        return view

    def hash_due(self, due: list[int], sort: Callable[[Tensor], tuple[Tensor, Tensor]]) -> None:
        """Sequences `due` reached one LSH chunk (`end_step`): every cached position is hashed and sorted, and
        they decode by LSH windows from the next token on, as transformers does. `sort` maps their keys
        (Ll, S, H, T, D) to the positions sorted by (bucket, position) and the buckets, (Ll, S, H, R, T) each
        (`ReformerLM.sort_keys`, or its exported graph)."""
        by_length: dict[int, list[int]] = {}
        for s in due:
            by_length.setdefault(self.length[s], []).append(s)
        for T, group in by_length.items():
            keys = torch.stack([self.keys_of(j, group, T) for j in range(len(self.lsh_index))])
            order, buckets = sort(keys)
            for j in range(len(self.lsh_index)):
                self.set_order(j, group, order[j], buckets[j])
        self.mark_hashed(due)

    # ---- inspection (tests, verification) ------------------------------------------------------
    def sorted_positions(self, layer: int, slot: int) -> Tensor | None:
        """The (H, R, length) order of a sequence's positions by (bucket, position) in LSH layer `layer`
        (None while the sequence is not hashed yet)."""
        if not self.is_hashed[slot]:
            return None
        return self._positions_of(slot, self._merged_order(self.lsh_index[layer], slot)[0])

    def bucket_counts(self, layer: int, slot: int) -> Tensor | None:
        """(H, R, K) tokens per bucket of a sequence in LSH layer `layer` (None while not hashed)."""
        if not self.is_hashed[slot]:
            return None
        cum = self._merged_order(self.lsh_index[layer], slot)[1]
        return torch.diff(cum, dim=-1, prepend=torch.zeros_like(cum[..., :1]))


def upload(values: list, device: torch.device) -> Tensor:
    """int64 tensor of host values on `device`: from pinned memory and asynchronous on CUDA."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def head_rows(rows: Tensor, H: int, per_head: int) -> Tensor:
    """Rows (n, H, ...) of a table holding H heads of `per_head` rows each (head h's row r is h * per_head +
    r), for per-head rows `rows` (n, H or 1, ...)."""
    return rows + torch.arange(H, device=rows.device).view(1, H, *[1] * (rows.dim() - 2)) * per_head


def page_bytes(Ll: int, H: int, D: int, R: int, P: int, dtype: torch.dtype) -> int:
    """Bytes of one page: P positions' LSH keys, values and order entries in every LSH layer."""
    return Ll * P * H * (2 * D * torch.empty((), dtype=dtype).element_size() + R * 4)


def slot_bytes(Ll: int, Lc: int, H: int, D: int, R: int, K: int, M: int, ring: int, dtype: torch.dtype) -> int:
    """Bytes a sequence's slot holds whatever its length: cumulative bucket counts, delta, local rings."""
    elt = torch.empty((), dtype=dtype).element_size()
    return Ll * H * R * (K + 2 * M) * 4 + Lc * H * ring * D * 2 * elt


def cache_bytes(config: ReformerConfig, num_hashes: int, dtype: torch.dtype, num_tokens: int,
                page_size: int = PAGE_SIZE, delta_size: int = DELTA_SIZE) -> int:
    """Bytes a sequence of `num_tokens` positions holds in a decode pool: the one measure of cache size
    (admission, metrics and `peak_cache_bytes` all use it)."""
    Ll = config.attn_layers.count("lsh")
    H, D = config.num_attention_heads, config.attention_head_size
    R = num_hashes if Ll else 1
    pages = -(-max(num_tokens, 1) // page_size)
    return pages * page_bytes(Ll, H, D, R, page_size, dtype) + slot_bytes(
        Ll, len(config.attn_layers) - Ll, H, D, R, config.total_buckets, delta_size, config.local_ring_size, dtype)
