"""Pooled decode state: every running sequence's cache in shared, paged tensors, so that one decode step does
the same number of tensor ops for 1 or 64 sequences.

A prefill given a pool writes a sequence's state straight into a run of free pages (`reserve_run`); a
prefill without one builds it in its own tensors (`cache.SequenceCache`) and the sequence is *adopted* at
its first decode step (one copy; its own tensors are then freed). From then on it decodes in the pool,
batched with every other sequence of the same pool. The engine keeps one pool for all its requests;
`decode_step` on caches that belong to no pool creates one for them.

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

import heapq
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .cache import SequenceCache
    from .model import LSHSelfAttention, ReformerLM

PAGE_SIZE = 64
DELTA_SIZE = 128


@dataclass
class StepBatch:
    """The sequences of one decode step, as index tensors (built once per step, shared by all layers)."""

    slots: Tensor  # (n,) int64 pool slots
    lengths: Tensor  # (n,) int64 positions of the new tokens
    length_list: list[int]
    hashed_idx: Tensor  # (n_h,) rows of the batch decoding by LSH windows
    dense_idx: Tensor  # (n_d,) the others
    new_rows: Tensor  # (n,) pool row of each new token's position (its page row)
    first: int | None  # the slots are first, first + 1, ...: per-slot tensors are read through views
    delta_used: int = 0  # most LSH delta entries any hashed sequence of the step holds (before its insert)
    memo: dict = field(default_factory=dict)  # per-step tensors every LSH layer would otherwise rebuild

    def select(self, t: Tensor, idx: Tensor | None = None) -> Tensor:
        """Rows of per-slot tensor t (slots first) for the batch rows `idx` (all rows when None)."""
        if idx is None or idx.numel() == self.slots.numel():
            if self.first is not None:
                return t.narrow(0, self.first, self.slots.numel())
            return t.index_select(0, self.slots)
        return t.index_select(0, self.slots[idx])


class DecodePool:
    """Paged decode state for many sequences of one model (see the module docstring)."""

    def __init__(self, model: ReformerLM, *, sequences: int = 1, tokens: int = 0, page_size: int = PAGE_SIZE,
                 delta_size: int = DELTA_SIZE) -> None:
        cfg = model.config
        self.H, self.D = cfg.num_attention_heads, cfg.attention_head_size
        self.P, self.M = int(page_size), int(delta_size)
        if self.P < 1 or self.P & (self.P - 1) or self.M < 1:
            raise ValueError("page_size must be a power of two and delta_size positive")
        self.shift = self.P.bit_length() - 1  # page of a position: pos >> shift; offset: pos & (P - 1)
        kinds = cfg.attn_layers
        self.lsh_index = {i: j for j, i in enumerate(i for i, k in enumerate(kinds) if k == "lsh")}
        self.local_index = {i: j for j, i in enumerate(i for i, k in enumerate(kinds) if k != "lsh")}
        self.R = next(model.lsh_layers()).num_hashes if self.lsh_index else 1
        self.K = cfg.total_buckets
        self.ring = (cfg.local_num_chunks_before + 1) * cfg.local_attn_chunk_length
        self.max_pages_per_seq = -(-cfg.max_context // self.P) + 1
        self.device, self.dtype = model.device, model.dtype
        self._free_slots: list[int] = []
        self._free_pages: list[int] = []
        self._scratch: dict[str, Tensor] = {}
        # Slots and pages are taken by the engine thread and given back by whichever thread drops a
        # sequence's last reference (an abort): the free lists are guarded.
        self._lock = threading.RLock()
        self.S = self.N = 0
        self._alloc_slots(max(1, sequences))
        self._alloc_pages(max(1, -(-max(tokens, 1) // self.P) + sequences))
        # per-slot bookkeeping (host side)
        self.length = [0] * self.S
        self.static_len = [0] * self.S
        self.is_hashed = [False] * self.S
        self.pages: list[list[int]] = [[] for _ in range(self.S)]

    # ---- storage ---------------------------------------------------------------------------------
    def _alloc_slots(self, S: int) -> None:
        """Grow every per-slot tensor to S slots (copying the old ones: rare, amortised by doubling)."""
        Ll, Lc, H, D, R, K = len(self.lsh_index), len(self.local_index), self.H, self.D, self.R, self.K
        dev, dt = self.device, self.dtype
        new = {
            "cum_static": torch.zeros(Ll, S, H, R, K, dtype=torch.int32, device=dev),
            "dbuckets": torch.full((Ll, S, H, R, self.M), K, dtype=torch.int32, device=dev),
            "dorder": torch.zeros(Ll, S, H, R, self.M, dtype=torch.int32, device=dev),
            "local_keys": torch.zeros(Lc, S, H, self.ring, D, dtype=dt, device=dev),
            "local_values": torch.zeros(Lc, S, H, self.ring, D, dtype=dt, device=dev),
            "page_table": torch.zeros(S, self.max_pages_per_seq, dtype=torch.long, device=dev),
        }
        for name, t in new.items():
            if self.S:
                old = getattr(self, name)
                if name == "page_table":
                    t[: self.S] = old
                else:
                    t[:, : self.S] = old
            setattr(self, name, t)
        if self.S:
            self.length += [0] * (S - self.S)
            self.static_len += [0] * (S - self.S)
            self.is_hashed += [False] * (S - self.S)
            self.pages += [[] for _ in range(S - self.S)]
        for slot in range(self.S, S):
            heapq.heappush(self._free_slots, slot)
        self.S = S

    def _alloc_pages(self, N: int) -> None:
        """Grow the paged tensors to N pages. `torch.empty`: on a CPU, pages never written take no memory."""
        Ll, H, D, R, P = len(self.lsh_index), self.H, self.D, self.R, self.P
        dev, dt = self.device, self.dtype
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
        self._free_pages = list(range(N - 1, self.N - 1, -1)) + self._free_pages
        self.N = N

    def _gather_rows(self, name: str, src: Tensor, index: Tensor, dim: int = 0) -> Tensor:
        """`src.index_select(dim, index)` into a buffer reused across steps (the caller is done with the last
        result before asking again under the same name). Window gathers are MBs per step; a fresh buffer
        each time would be fresh pages to fault in (large allocations are mmapped, see memory.py)."""
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
            return [self._free_pages.pop() for _ in range(n)]

    def _ensure_pages(self, slot: int, positions: int) -> None:
        need = -(-positions // self.P) - len(self.pages[slot])
        if need > 0:
            got = self._take_pages(need)
            first = len(self.pages[slot])
            self.pages[slot].extend(got)
            self.page_table[slot, first : first + need] = torch.tensor(got, device=self.device)

    def release(self, slot: int) -> None:
        """Return a sequence's slot and pages (idempotent per adoption)."""
        with self._lock:
            if self.pages[slot] is None:
                return
            self._free_pages.extend(reversed(self.pages[slot]))
            self.pages[slot] = None  # type: ignore[call-overload]
            self.length[slot] = self.static_len[slot] = 0
            self.is_hashed[slot] = False
            heapq.heappush(self._free_slots, slot)

    @property
    def slots_in_use(self) -> int:
        return self.S - len(self._free_slots)

    @property
    def pages_in_use(self) -> int:
        return self.N - len(self._free_pages)

    def page_bytes(self) -> int:
        return _page_bytes(len(self.lsh_index), self.H, self.D, self.R, self.P, self.dtype)

    def slot_bytes(self) -> int:
        return _slot_bytes(len(self.lsh_index), len(self.local_index), self.H, self.D, self.R, self.K, self.M,
                           self.ring, self.dtype)

    def sequence_bytes(self, slot: int) -> int:
        return len(self.pages[slot] or ()) * self.page_bytes() + self.slot_bytes()

    # ---- prefill placement and adoption ---------------------------------------------------------
    def reserve_run(self, capacity: int) -> tuple[int, int] | None:
        """A slot and a run of consecutive pages for `capacity` positions (slot, first page), so that a
        prefill can write its keys, values and order straight into the pool; None if no run is free."""
        n = max(1, -(-capacity // self.P))
        with self._lock:
            first, count, prev = -1, 0, -2
            top = self._free_pages[-n:]  # the next pages to be handed out are usually a run already
            if len(top) == n and top == list(range(top[0], top[0] - n, -1)):
                del self._free_pages[-n:]
                return self._place_run(top[-1], n)
            for page in sorted(self._free_pages):
                count = count + 1 if page == prev + 1 else 1
                prev = page
                if count == n:
                    first = page - n + 1
                    break
            if first < 0:
                return None
            self._free_pages = [p for p in self._free_pages if not first <= p < first + n]
            return self._place_run(first, n)

    def _place_run(self, first: int, n: int) -> tuple[int, int]:
        slot = self._take_slot()
        self.pages[slot] = list(range(first, first + n))
        self.page_table[slot, :n] = torch.arange(first, first + n, device=self.device)
        return slot, first

    def lsh_views(self, layer: int, place: tuple[int, int], capacity: int) -> tuple[Tensor, Tensor, Tensor]:
        """(H, capacity, D) keys and values and (H, R, capacity) order of a reserved run, as views."""
        j, r0 = self.lsh_index[layer], place[1] * self.P
        return (self.keys[j, :, r0 : r0 + capacity], self.values[j, :, r0 : r0 + capacity],
                self.order[j, :, :, r0 : r0 + capacity])

    def local_views(self, layer: int, place: tuple[int, int]) -> tuple[Tensor, Tensor]:
        j = self.local_index[layer]
        return self.local_keys[j, place[0]], self.local_values[j, place[0]]

    def hold(self, seq: SequenceCache, slot: int) -> None:
        """Tie a reserved slot to the sequence being prefilled into it: released if it is dropped unadopted."""
        seq.reserved = (self, slot)
        seq._finalizer = weakref.finalize(seq, _release_if_alive, weakref.ref(self), slot)

    def adopt(self, seq: SequenceCache) -> None:
        """Move a prefilled sequence's state into the pool: nothing to copy if it was prefilled into a run of
        this pool (unless the pool grew since, which moved its tensors), else one copy. The sequence's own
        tensors are dropped."""
        from .cache import LSHLayerState

        if seq.pool is self:
            return
        if seq.pool is not None:
            raise ValueError("the sequence already belongs to another pool")
        reserved = seq.reserved is not None and seq.reserved[0] is self
        if seq.reserved is not None and not reserved:
            raise ValueError("the sequence was prefilled into another pool")
        if reserved:
            slot = seq.reserved[1]
        else:
            slot = self._take_slot()
            self.pages[slot] = []
        try:
            T = seq.length
            self._ensure_pages(slot, T + 1)
            hashed = False
            rows = self._rows(slot, T)
            for i, st in enumerate(seq.layers):
                if isinstance(st, LSHLayerState):
                    j = self.lsh_index[i]
                    if not _same(st.keys, self.keys[j], 1, rows):
                        self.keys[j].index_copy_(1, rows, st.keys[:, :T])
                        self.values[j].index_copy_(1, rows, st.values[:, :T])
                    if st.order is not None:
                        hashed = True
                        # positions -> pool rows (in place when the prefill wrote into this pool)
                        self.order[j].index_copy_(-1, rows, self._pool_rows_of(slot, st.order[:, :, :T]))
                        self.cum_static[j, slot] = st.counts.cumsum(-1)
                    self.dbuckets[j, slot] = self.K
                else:
                    j = self.local_index[i]
                    if st.keys.data_ptr() != self.local_keys[j, slot].data_ptr():
                        self.local_keys[j, slot] = st.keys
                        self.local_values[j, slot] = st.values
        except BaseException:
            self.release(slot)
            raise
        self.length[slot] = T
        self.static_len[slot] = T
        self.is_hashed[slot] = hashed
        seq.layers = []
        seq.pool, seq.slot, seq.reserved = self, slot, None
        if not reserved:
            seq._finalizer = weakref.finalize(seq, _release_if_alive, weakref.ref(self), slot)

    def _page_rows(self, table: Tensor, pos: Tensor) -> Tensor:
        """Pool rows of positions (or static sorted slots) `pos` (n, ...) of the sequences whose page-table
        rows are `table` (n, pages)."""
        page = table.gather(1, (pos >> self.shift).reshape(table.shape[0], -1).long()).view(pos.shape)
        return page * self.P + (pos & (self.P - 1))

    def _rows(self, slot: int, n: int) -> Tensor:
        """Pool rows of a sequence's positions (or static sorted slots) [0, n)."""
        return self._page_rows(self.page_table[slot : slot + 1], torch.arange(n, device=self.device).view(1, n))[0]

    def _pool_rows_of(self, slot: int, positions: Tensor) -> Tensor:
        """int32 pool rows (what the order tables hold) of a sequence's positions (any shape)."""
        table = self.page_table[slot : slot + 1]
        return self._page_rows(table, positions.reshape(1, -1).long()).view(positions.shape).to(torch.int32)

    def _positions_of(self, slot: int, rows: Tensor) -> Tensor:
        """The positions of a sequence's pool rows (the inverse of `_pool_rows_of`; for inspection)."""
        inverse = torch.full((self.N,), -1, dtype=torch.long, device=self.device)
        pages = self.pages[slot]
        inverse[torch.tensor(pages, dtype=torch.long, device=self.device)] = torch.arange(len(pages), device=self.device)
        rows = rows.long()
        return (inverse[rows >> self.shift] * self.P + (rows & (self.P - 1))).to(torch.int32)

    # ---- one decode step -----------------------------------------------------------------------
    def begin_step(self, slots: list[int]) -> StepBatch:
        """Make room for every sequence's new token and build the step's index tensors."""
        for s in slots:
            self._ensure_pages(s, self.length[s] + 1)
        dev = self.device
        sl = torch.tensor(slots, device=dev)
        lens = [self.length[s] for s in slots]
        T = torch.tensor(lens, device=dev)
        hashed = [i for i, s in enumerate(slots) if self.is_hashed[s]]
        dense = [i for i, s in enumerate(slots) if not self.is_hashed[s]]
        rows = self._page_rows(self.page_table.index_select(0, sl), T.view(-1, 1)).view(-1)
        first = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None
        used = max((self.length[slots[i]] - self.static_len[slots[i]] for i in hashed), default=0)
        return StepBatch(sl, T, lens, torch.tensor(hashed, dtype=torch.long, device=dev),
                         torch.tensor(dense, dtype=torch.long, device=dev), rows, first, used)

    def end_step(self, slots: list[int], hashed_now: list[int]) -> None:
        """Advance lengths; merge full deltas."""
        for s in slots:
            self.length[s] += 1
        for s in hashed_now:
            self.is_hashed[s] = True
            self.static_len[s] = self.length[s]
        for s in slots:
            if self.is_hashed[s] and self.length[s] - self.static_len[s] >= self.M:
                self._merge(s)

    def write_lsh(self, j: int, batch: StepBatch, k: Tensor, v: Tensor) -> None:
        """Store the new tokens' keys/values (n, H, D) of LSH layer j."""
        self.keys[j].index_copy_(1, batch.new_rows, k.transpose(0, 1))
        self.values[j].index_copy_(1, batch.new_rows, v.transpose(0, 1))

    def lsh_window(self, j: int, batch: StepBatch, idx: Tensor, buckets: Tensor, C: int, before: int, after: int
                   ) -> tuple[Tensor, Tensor]:
        """The attention windows of the hashed sequences `idx` (rows of the batch), per head and round; then
        inserts their new tokens into the delta order.

        buckets (n, H, R). The new token (position T) lands at slot p of its round's T+1 sorted entries (p =
        cached tokens with bucket <= its own) and sees slots [(p // C - before) * C, + W) modulo T + 1, as
        transformers' cached decode does. Returns the window's rows in the layer's key and value tables
        (`lsh_tables`), and where the window holds the new token itself (its self-attention is masked), both
        (n, H, R, W): the attention gathers the key rows and sums the value rows where they lie.
        Nothing here is O(buckets) or O(length): the merged order is addressed through the delta's slots.
        """
        N, K = self.N * self.P, self.K
        sl, T1, last, hr, base, ar_m, ar, offs, pt, new = self._window_constants(batch, idx, C * (1 + before + after))
        # Only the first M entries of the delta can be in use, M = one more than the most any of these
        # sequences holds (room for its new one): the rest hold bucket K in every row, so the delta's
        # per-entry work is over the entries in use, not the delta's capacity.
        M = ar.numel()
        b = buckets.unsqueeze(-1).int()  # (n, H, R, 1)
        cum = self.cum_static[j].view(-1)
        dbuckets, dorder = self.dbuckets[j].narrow(-1, 0, M), self.dorder[j].narrow(-1, 0, M)
        dbk = batch.select(dbuckets, idx).contiguous()  # (n, H, R, M) sorted; unused entries hold K
        dor = batch.select(dorder, idx)
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
        si = s - nd  # otherwise it is static entry s - nd
        srow = self.order[j].view(-1).take(hr * N + self._page_rows(pt, si))  # the order holds pool rows
        rows = self._table_rows(torch.where(is_new, new, torch.where(in_delta, dor.gather(-1, ndc), srow)).long())
        # insert the new token at q (after the delta entries of its bucket and below: its position is largest)
        src = (ar - (ar > q).long()).clamp_(min=0)  # int64: a gather index
        dbuckets.index_copy_(0, sl, torch.where(ar == q, b, dbk.gather(-1, src)))
        dorder.index_copy_(0, sl, torch.where(ar == q, new, dor.gather(-1, src)))
        return rows, is_new

    def _window_constants(self, batch: StepBatch, idx: Tensor, W: int) -> tuple[Tensor, ...]:
        """Index tensors of `lsh_window` that depend on the step's sequences only, built once per step (every
        LSH layer of the step reads them)."""
        key = ("lsh_window", id(idx), W)
        if key not in batch.memo:
            H, R, K = self.H, self.R, self.K
            # entries of the delta in use (see `lsh_window`); all of it for rows other than the step's hashed ones
            M = min(self.M, batch.delta_used + 1) if idx is batch.hashed_idx else self.M
            dev = idx.device
            sl, T = batch.slots[idx], batch.lengths[idx].view(-1, 1, 1, 1).int()
            hr = torch.arange(H * R, device=dev).view(1, H, R, 1)
            base = (sl.view(-1, 1, 1, 1) * (H * R) + hr) * K  # row of each (sequence, head, round) in cum_static
            batch.memo[key] = (
                sl, T + 1, (T - 1).clamp(min=0), hr, base,
                torch.arange(M, device=dev, dtype=torch.int32), torch.arange(M, device=dev),
                torch.arange(W, device=dev, dtype=torch.int32), batch.select(self.page_table, idx),
                batch.new_rows[idx].view(-1, 1, 1, 1).int(),  # the new tokens' pool rows
                idx,  # keeps id(idx) from being reused by another tensor while the step lasts
            )
        return batch.memo[key][:-1]

    def lsh_tables(self, j: int) -> tuple[Tensor, Tensor]:
        """LSH layer j's keys and values as (H * N * P, D) tables: head h's pool row r is table row
        h * N * P + r (see `_table_rows`)."""
        return self.keys[j].view(-1, self.D), self.values[j].view(-1, self.D)

    def _table_rows(self, rows: Tensor) -> Tensor:
        """Table rows (n, H, ...) of pool rows `rows` (n, H or 1, ...) in every head."""
        H = self.H
        return rows + torch.arange(H, device=rows.device).view(1, H, *[1] * (rows.dim() - 2)) * (self.N * self.P)

    def _gather_kv(self, j: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (n, H, ..., D) of LSH layer j at pool rows `rows` (n, H or 1, ...), every head."""
        H, D = self.H, self.D
        shape = (rows.shape[0], H, *rows.shape[2:])
        flat = self._table_rows(rows).expand(shape).reshape(-1)
        kk = self._gather_rows("keys", self.keys[j].view(-1, D), flat).view(*shape, D)
        vv = self._gather_rows("values", self.values[j].view(-1, D), flat).view(*shape, D)
        return kk, vv

    def dense_keys(self, j: int, batch: StepBatch, idx: Tensor, span: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values (n, H, span, D) at positions [0, span) of the sequences `idx`, and those positions
        (span,). Positions past a sequence's new token are the caller's to mask (causally); they read
        whatever row their page-table entry names, never memory outside the pool."""
        pt = batch.select(self.page_table, idx)  # (n, pages)
        pos = torch.arange(span, device=pt.device)
        kk, vv = self._gather_kv(j, self._page_rows(pt, pos.expand(pt.shape[0], span)).unsqueeze(1))
        return kk, vv, pos

    def hash_all(self, j: int, slots: list[int], T1: int, layer: LSHSelfAttention) -> None:
        """Sequences reaching one chunk (T1 positions each, the new token's included): hash every position
        and sort them, as transformers does when it starts decoding by LSH windows; all in one pass."""
        S = len(slots)
        sl = torch.tensor(slots, device=self.device)
        rows = self._page_rows(self.page_table.index_select(0, sl),
                               torch.arange(T1, device=self.device).expand(S, T1)).view(-1)  # (S * T1,)
        keys = self.keys[j].index_select(1, rows).view(self.H, S, T1, self.D).transpose(0, 1)  # (S, H, T1, D)
        buckets = layer.hash(keys)  # (S, H, R, T1); argmax ignores the key norm
        pos = torch.arange(T1, device=keys.device)
        order = torch.argsort(buckets * T1 + pos, dim=-1)  # (S, H, R, T1) positions
        order = self._page_rows(self.page_table.index_select(0, sl), order).to(torch.int32)  # as pool rows
        self.order[j].index_copy_(-1, rows, order.permute(1, 2, 0, 3).reshape(self.H, self.R, S * T1))
        counts = torch.zeros(S, *self.cum_static.shape[2:], dtype=self.cum_static.dtype, device=self.device)
        counts.scatter_add_(-1, buckets, torch.ones_like(buckets, dtype=counts.dtype))
        self.cum_static[j].index_copy_(0, sl, counts.cumsum(-1).to(counts.dtype))
        self.dbuckets[j].index_fill_(0, sl, self.K)

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
        rows = self._rows(slot, self.length[slot])
        for j in range(len(self.lsh_index)):
            merged, cum = self._merged_order(j, slot)
            self.order[j].index_copy_(-1, rows, merged)
            self.cum_static[j, slot] = cum
            self.dbuckets[j, slot] = self.K
        self.static_len[slot] = self.length[slot]

    # ---- local layers --------------------------------------------------------------------------
    def local_step(self, j: int, batch: StepBatch, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write the new tokens' local keys/values (n, H, D) and return every ring (n, H, ring, D) with the
        position each ring entry holds (n, ring; negative: never written)."""
        ring = self.ring
        at = batch.lengths % ring
        lk, lv = self.local_keys[j], self.local_values[j]
        lk[batch.slots, :, at] = k
        lv[batch.slots, :, at] = v
        T = batch.lengths.view(-1, 1)
        r = torch.arange(ring, device=k.device)
        pos = T - torch.remainder(T - r, ring)
        if batch.first is not None:  # a compact range of slots: views, no copies
            return lk.narrow(0, batch.first, T.shape[0]), lv.narrow(0, batch.first, T.shape[0]), pos
        return self._gather_rows("keys", lk, batch.slots), self._gather_rows("values", lv, batch.slots), pos

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


def _page_bytes(Ll: int, H: int, D: int, R: int, P: int, dtype: torch.dtype) -> int:
    return Ll * P * H * (2 * D * torch.empty((), dtype=dtype).element_size() + R * 4)  # keys, values, order


def _slot_bytes(Ll: int, Lc: int, H: int, D: int, R: int, K: int, M: int, ring: int, dtype: torch.dtype) -> int:
    elt = torch.empty((), dtype=dtype).element_size()
    return Ll * H * R * (K + 2 * M) * 4 + Lc * H * ring * D * 2 * elt  # cumulative counts, delta; local rings


def pooled_bytes(model: ReformerLM, num_tokens: int, page_size: int = PAGE_SIZE, delta_size: int = DELTA_SIZE) -> int:
    """Bytes a sequence of `num_tokens` positions holds in a pool with this layout."""
    cfg = model.config
    Ll = cfg.attn_layers.count("lsh")
    H, D = cfg.num_attention_heads, cfg.attention_head_size
    R = next(model.lsh_layers()).num_hashes if Ll else 1
    ring = (cfg.local_num_chunks_before + 1) * cfg.local_attn_chunk_length
    pages = -(-num_tokens // page_size)
    return pages * _page_bytes(Ll, H, D, R, page_size, model.dtype) + _slot_bytes(
        Ll, len(cfg.attn_layers) - Ll, H, D, R, cfg.total_buckets, delta_size, ring, model.dtype)


def _same(view: Tensor, pooled: Tensor, dim: int, rows: Tensor) -> bool:
    """Whether `view` is the pool's own storage from row rows[0] of `dim` on (a prefill written in place)."""
    return rows.numel() == 0 or view.data_ptr() == pooled.select(dim, int(rows[0])).data_ptr()


def _release_if_alive(pool_ref: weakref.ref, slot: int) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.release(slot)

