"""Model-free request scheduler: admission by free slots and projected cache bytes, priority, then FIFO or
shortest-prompt-first with aging.

The scheduler knows nothing about tensors. It sees each request as a prompt length, a token budget and a
priority, and a cost function `cache_bytes(num_tokens)` (the model's `cache_bytes`) that projects the
cache size of one sequence. A request reserves `cache_bytes(prompt_len + max_new_tokens)` when it is
admitted and releases it the moment it finishes or is aborted, so the sum of reservations never exceeds
the budget and the real caches (which only grow up to that projection) cannot either.

Lifecycle (vLLM v1 style names): WAITING -> RUNNING -> FINISHED_*; abort is a normal transition from any
unfinished state. Requests that could never be admitted (longer than the context, or needing more
bytes than the whole budget) are rejected in `add` with InvalidRequestError instead of waiting forever.

No head-of-line blocking (issue 18; the problem of vllm#21495 and sglang#8211): with `long_prompt_tokens`
set, prompts longer than it are *long*. Long requests may hold at most `max_running - short_slots` slots,
so a short request always finds a slot even behind a flood of long prompts (the engine then prefills the
least work first every other step). With `aging_rate` set, the queue is ordered by
`arrival + prompt_len / aging_rate` (within a priority): a shorter prompt overtakes a longer one that
arrived less than (difference in length) / rate seconds before it, so a long prompt is overtaken only for
a bounded time, and once its rank time has passed nothing is admitted past it while it waits for bytes.
Without these settings admission is strict priority-then-FIFO and stops at the first request that does
not fit.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from reformer_infer.requests import InvalidRequestError, OverloadedError


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"  # admitted: prefilling or decoding, holds a slot and its cache reservation
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_EOS = "finished_eos"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED_")


@dataclass
class ScheduledRequest:
    """What the scheduler tracks about one request."""

    request_id: str
    prompt_len: int
    max_new_tokens: int
    priority: int = 0
    context_tokens: int = 0  # tokens of the context it continues (its prompt follows them)
    shared_bytes: int = 0  # cache bytes it shares with that context (the context's, not its own)
    status: RequestStatus = RequestStatus.WAITING
    reserved_bytes: int = 0  # projected cache bytes, set at add time, counted while RUNNING
    arrival_seq: int = field(default=-1, repr=False)
    rank: float = field(default=0.0, repr=False)  # queue order within a priority (see the module docstring)


@dataclass
class SchedulerConfig:
    max_running: int  # slots: sequences prefilling or decoding at once
    max_waiting: int  # bound on the waiting queue (beyond it: OverloadedError)
    cache_budget_bytes: int  # sum of reservations of running requests may not exceed this
    max_context: int  # prompt_len + max_new_tokens may not exceed this
    long_prompt_tokens: int | None = None  # longer prompts are "long" (None: no distinction, no overtaking)
    short_slots: int = 0  # slots long requests may not take (needs long_prompt_tokens)
    aging_rate: float | None = None  # prompt tokens per second of head start (None: FIFO within a priority)


# Waiting requests looked at per schedule() beyond the free slots: bounds its cost when many long requests
# wait for the long slots (shorter prompts rank ahead of them anyway).
SCAN_LIMIT = 64


class Scheduler:
    """Decides which waiting requests run next. Not thread-safe: the engine serialises calls."""

    def __init__(
        self, config: SchedulerConfig, cache_bytes: Callable[[int], int], clock: Callable[[], float] = time.monotonic
    ) -> None:
        if (config.max_running < 1 or config.max_waiting < 0 or config.cache_budget_bytes < 1
                or not 0 <= config.short_slots < config.max_running
                or (config.short_slots and config.long_prompt_tokens is None)
                or (config.aging_rate is not None and not (config.aging_rate > 0 and math.isfinite(config.aging_rate)))):
            raise ValueError(f"invalid scheduler config {config}")
        self.config = config
        self._cache_bytes = cache_bytes
        self._clock = clock
        self._requests: dict[str, ScheduledRequest] = {}
        # Heap of (-priority, rank, arrival_seq, request_id); aborted entries are skipped lazily.
        self._queue: list[tuple[int, float, int, str]] = []
        self._num_long_running = 0
        self._num_waiting = 0
        self._running: dict[str, ScheduledRequest] = {}
        self._bytes_in_use = 0
        self._seq = itertools.count()

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def bytes_in_use(self) -> int:
        return self._bytes_in_use

    @property
    def running(self) -> list[ScheduledRequest]:
        return list(self._running.values())

    def get(self, request_id: str) -> ScheduledRequest | None:
        return self._requests.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- transitions ---------------------------------------------------------------------------
    def check(self, prompt_len: int, max_new_tokens: int) -> int:
        """Raise InvalidRequestError if the request can never run; return its projected cache bytes."""
        ctx = self.config.max_context
        if prompt_len > ctx:
            raise InvalidRequestError(
                "prompt", f"prompt has {prompt_len} tokens; the model's context is {ctx} tokens"
            )
        if prompt_len + max_new_tokens > ctx:
            raise InvalidRequestError(
                "max_new_tokens",
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
                f"tokens exceeds the model's context of {ctx} tokens",
            )
        need = int(self._cache_bytes(prompt_len + max_new_tokens))
        budget = self.config.cache_budget_bytes
        if need > budget:
            field_name = "prompt" if self._cache_bytes(prompt_len + 1) > budget else "max_new_tokens"
            raise InvalidRequestError(
                field_name,
                f"request needs {need} cache bytes ({prompt_len} prompt + {max_new_tokens} new tokens) "
                f"but the engine's whole cache budget is {budget} bytes",
            )
        return need

    def add(self, request: ScheduledRequest) -> None:
        """Queue a request (WAITING). Raises InvalidRequestError or OverloadedError and queues nothing."""
        if request.request_id in self._requests:
            raise InvalidRequestError("request_id", f"request id {request.request_id!r} is already in use")
        need = self.check(request.context_tokens + request.prompt_len, request.max_new_tokens) - request.shared_bytes
        if self._num_waiting >= self.config.max_waiting:
            raise OverloadedError(
                f"waiting queue is full ({self._num_waiting} requests waiting, limit {self.config.max_waiting})"
            )
        request.reserved_bytes = need
        request.status = RequestStatus.WAITING
        request.arrival_seq = next(self._seq)
        rate = self.config.aging_rate
        request.rank = 0.0 if rate is None else self._clock() + request.prompt_len / rate
        self._requests[request.request_id] = request
        heapq.heappush(self._queue, (-request.priority, request.rank, request.arrival_seq, request.request_id))
        self._num_waiting += 1

    def is_long(self, request: ScheduledRequest) -> bool:
        limit = self.config.long_prompt_tokens
        return limit is not None and request.prompt_len > limit

    def schedule(self) -> list[ScheduledRequest]:
        """Admit waiting requests in queue order while a slot and the bytes are free.

        Without `long_prompt_tokens` admission stops at the first request that does not fit (no overtaking),
        so a large request is never starved by a stream of small ones. With it, a long request that finds
        the long slots taken is passed over (the slots it may not use go to short ones), and a request
        that waits for bytes is passed by *short* requests only until its rank time has passed.
        """
        cfg = self.config
        admitted: list[ScheduledRequest] = []
        passed: list[tuple[int, float, int, str]] = []  # passed over this time, back into the heap after
        long_slots = cfg.max_running - cfg.short_slots
        bytes_blocked = False  # a request ahead waits for bytes: only short ones may still pass it
        scanned = 0
        now = self._clock() if cfg.aging_rate is not None else math.inf
        while self._queue and len(self._running) < cfg.max_running and scanned < cfg.max_running + SCAN_LIMIT:
            entry = self._queue[0]
            _, _, seq, rid = entry
            req = self._requests.get(rid)
            if req is None or req.arrival_seq != seq or req.status is not RequestStatus.WAITING:
                heapq.heappop(self._queue)  # aborted while waiting
                continue
            scanned += 1
            long = self.is_long(req)
            if long and (bytes_blocked or self._num_long_running >= long_slots):
                passed.append(heapq.heappop(self._queue))
                continue
            if self._bytes_in_use + req.reserved_bytes > cfg.cache_budget_bytes:
                if cfg.long_prompt_tokens is None or now >= req.rank:
                    break
                bytes_blocked = True
                passed.append(heapq.heappop(self._queue))
                continue
            heapq.heappop(self._queue)
            self._num_waiting -= 1
            req.status = RequestStatus.RUNNING
            self._running[rid] = req
            self._bytes_in_use += req.reserved_bytes
            self._num_long_running += long
            admitted.append(req)
        for entry in passed:
            heapq.heappush(self._queue, entry)
        return admitted

    def finish(self, request_id: str, status: RequestStatus) -> ScheduledRequest | None:
        """Move a request to a FINISHED_* status, freeing its slot and bytes at once.

        Idempotent: returns None if the request is unknown or already finished.
        """
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            del self._running[request_id]
            self._bytes_in_use -= req.reserved_bytes
            self._num_long_running -= self.is_long(req)
        elif req.status is RequestStatus.WAITING:
            self._num_waiting -= 1  # its heap entry is dropped lazily in schedule()
            if len(self._queue) > 2 * self._num_waiting + 64:
                # Many waiting requests aborted behind a blocked head: rebuild so the heap stays bounded.
                self._queue = [
                    e
                    for e in self._queue
                    if e[3] in self._requests and self._requests[e[3]].arrival_seq == e[2]
                ]
                heapq.heapify(self._queue)
        req.status = status
        return req

    def pin(self, nbytes: int) -> None:
        """Count `nbytes` held outside any request (a context's pinned state) against the budget."""
        self._bytes_in_use += nbytes

    def unpin(self, nbytes: int) -> None:
        self._bytes_in_use -= nbytes

    def abort(self, request_id: str) -> ScheduledRequest | None:
        """Abort in any unfinished state (WAITING or RUNNING); None if unknown or already finished."""
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)
