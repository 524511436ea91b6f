"""Continuous-batching engine: one thread drives the model, asyncio callers stream events.

One engine step (vLLM v1 shape) is `schedule -> execute -> update`:
  * schedule: admit waiting requests while slots and cache bytes allow (`Scheduler`), expire deadlines;
  * execute: one batched `decode_step` over every decoding sequence (their caches in one shared decode
    pool), then about `prefill_chunk_tokens` units of resumable prefill (`model.prefill_iter`), so a 64K
    prompt is spread over many steps while running streams keep getting a token every step. Prompts take
    the budget oldest first and, every other step, least work left first (a short prompt does not wait
    for a long prefill to end); waiting prompts of one length are prefilled together in one batched pass;
  * update: the step sampled every row on the device (`sampling.SlotSampler`, inside the decode step) and
    fed the ids back as the next input; the host downloads them once, detokenises UTF-8-safely, matches stop
    strings and finishes requests, releasing their slot and bytes at once.

Overlap (`overlap_steps`, SGLang's overlap scheduler, vLLM's async scheduling): a decode step runs on a
device thread while the engine thread applies the previous step's tokens (detokenising, stop rules,
events). The step does not need them: its input ids are the ones the last step sampled, already on the
device. So the batch of step k is chosen before step k-1's tokens are applied: a sequence that stops on a
token of step k-1 (EOS, a stop token or string) takes part in step k, whose token it drops; one that reaches
`max_new_tokens` with it is left out. Anything else that touches the decode pool or the sampler (prefill,
a fork, a prompt fed after a context, releasing a finished sequence) first waits for the step in flight, so
the device work stays one sequence of steps; only the steady state of decoding overlaps.

Threading: the step runs in the engine thread (or its device thread) without holding the lock; the lock (a
Condition) guards the scheduler and every request's bookkeeping, so `add_request`, `abort` and `stats` from
other threads take effect between two steps (abort frees the reservation immediately; a sequence that is in
the middle of an executing step is dropped when that step ends). Events reach each caller through a bounded
`RequestStream`: the engine never blocks on a consumer; a consumer that fell behind takes every token event
waiting as one, and when the buffer is full, new token events are coalesced into the last one (no token or
text is lost, only granularity).

Failures (issue 18: one request's fault stays its own): an exception in one request's prefill (including
out-of-memory) or in applying its sampled token finishes only that request with ERROR; an exception in a
batched decode fails the sequences of that batch (logged with their ids) and the engine goes on. A decode
step or an engine step that raises counts as a step failure; only `max_step_failures` of them in a row
mark the engine dead (`stats().alive` is False), failing every request.

Admission (issue 18: no head-of-line blocking): long prompts may not take the `short_prompt_slots` last
slots, the queue ranks a request by arrival + prompt length / `queue_aging_rate` (see scheduler.py), and a
request waiting longer than `max_queue_time_s` fails with OverloadedError's kind ("overloaded").
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reformer_infer.cache import ReformerCache
from reformer_infer.contexts import Context, ContextInfo, ContextNotFoundError, ContextRegistry
from reformer_infer.requests import (
    ContextCreated,
    EngineStats,
    EngineStoppedError,
    FinishEvent,
    FinishReason,
    InvalidRequestError,
    OutOfMemoryError,
    PrefillProgress,
    RequestBounds,
    SamplingParams,
    TokenEvent,
    TokenizerUnavailableError,
    TokenLogprob,
    validate_prompt,
)
from reformer_infer.sampling import SampleOutput, SlotSampler, download, unpack
from reformer_infer.scheduler import RequestStatus, ScheduledRequest, Scheduler, SchedulerConfig
from reformer_infer.step_graphs import aoti_available, aoti_capture, decode_and_sample
from reformer_infer.streams import RequestStream, _wakeups_held
from reformer_infer.tokenizer import Detokenizer, IncrementalDetokenizer, StopStringMatcher, model_tokenizer

logger = logging.getLogger(__name__)

_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.EOS: RequestStatus.FINISHED_EOS,
    FinishReason.ABORTED: RequestStatus.FINISHED_ABORTED,
    FinishReason.ERROR: RequestStatus.FINISHED_ERROR,
}

# While nothing decodes, one batched prefill of equal-length prompts takes at most this many steps' worth of
# prefill work (bounds how long new arrivals and aborts wait for the step to end, and its activations).
GROUP_PREFILL_STEPS = 32

# Prompt tokens after contexts run in one layer-by-layer pass per step (`_execute_feed`), about this many
# (each sequence at most what its delta has room for, < 128; a longer prompt goes on in the next steps).
FEED_TOKENS_PER_STEP = 512

# Automatic reuse takes a context only when the rest of the prompt is at most this share of it: the rest runs
# token by token through the LSH windows (~3x a prefill's cost per token on a CPU), so a short context
# before a long rest would be slower than prefilling the whole prompt.
PREFIX_REUSE_MAX_REST = 0.5

# A fault hook gets (phase, request_id) at "step" (request_id None), before each "prefill" chunk, for each
# request of a batched "decode" step before it runs, and before a sampled token is applied ("update");
# whatever it raises is handled exactly like a failure of that phase. Tests use it to inject faults.
FaultHook = Callable[[str, "str | None"], None]


@dataclass
class EngineConfig:
    """Runtime knobs of the engine (the model's own config travels with its weights)."""

    max_batch: int = 16  # running sequences (prefilling or decoding) at once
    max_queue: int = 256  # waiting requests beyond this -> OverloadedError
    cache_memory_bytes: int = 2**30  # admission budget in projected cache bytes
    # Prefill work per step, in model.prefill_iter units (tokens x layers). None: sized for the device (512 on a
    # CPU keeps a step near a decode step's time; on a GPU that many positions are microseconds of launches
    # and a 64K prompt would take ~12K steps, so 16384 there).
    prefill_chunk_tokens: int | None = None
    max_context: int | None = None  # defaults to the model's context
    max_new_tokens_limit: int = 4096
    stream_buffer_events: int = 256  # bounded per-request hand-off; beyond it token events coalesce
    # A request's tokens after its first are handed to its consumer once this many wait (or with its finish):
    # one front-end message per `stream_interval` tokens (streams.RequestStream). 1: every token at once.
    stream_interval: int = 1
    # Woken from idle by a request, the engine waits while more keep arriving (each within a quarter of
    # this of the last), up to this long, so a burst is prefilled in one batched pass (0: no wait).
    arrival_window_s: float = 0.002
    # On CUDA, decode steps replay one captured graph per batch bucket (step_graphs.py) instead of launching
    # every op; elsewhere they run eagerly.
    cuda_graphs: bool = True
    # Off CUDA, decode steps replay the same step compiled ahead of time (torch.export + AOTInductor) per batch
    # bucket, variant and sampling mode (step_graphs.aoti_capture): ~3x one stream's tokens/s on the bundled
    # model on this project's CPU, but each recording compiles for ~20 s (the greedy ones in `warm_up`, the
    # others inside the engine's step at first use; docs/benchmarks.md section 7). Needs a C++ compiler and
    # torch >= 2.6.
    compile_step: bool = False
    # Run each decode step on a device thread while the engine thread applies the previous step's tokens
    # (module docstring, "Overlap"). Tokens are the same either way; a sequence that stops on EOS or a stop
    # string runs one extra step whose token is dropped. None: on CUDA only (there the engine's host work
    # hides behind the device's; on a CPU both threads need the same cores and the GIL: 4-7% slower on
    # the 2-core development machine, docs/benchmarks.md section 7).
    overlap_steps: bool | None = None
    bounds: RequestBounds = field(default_factory=RequestBounds)  # stop strings / stop token ids per request
    long_prompt_tokens: int | None = None  # prompts longer than this are long (None: no distinction)
    short_prompt_slots: int = 0  # slots long prompts may not take (needs long_prompt_tokens)
    queue_aging_rate: float | None = None  # prompt tokens/s of head start in the queue (None: FIFO)
    max_queue_time_s: float | None = None  # a request waiting longer fails as overloaded (None: no limit)
    max_step_failures: int = 3  # consecutive failed steps that mark the engine dead
    # Contexts (contexts.py): cache bytes they may pin in all (0: contexts are off), their TTL bounds, and
    # whether a prompt that starts with a live context's tokens (or equals a prompt being prefilled) reuses it.
    context_memory_bytes: int = 0
    max_context_ttl_s: float = 3600.0
    default_context_ttl_s: float = 600.0
    prefix_caching: bool = True


@dataclass
class _InFlight:
    """A decode step launched and not yet applied: its batch and its sampled output (`SampleOutput`)."""

    batch: list[_Request]
    output: Future


@dataclass
class _Request:
    """The engine's state of one request (guarded by the engine lock unless noted)."""

    sched: ScheduledRequest
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    arrival: float
    deadline: float | None
    detok: Detokenizer = field(default_factory=IncrementalDetokenizer)
    stop: StopStringMatcher = field(default_factory=lambda: StopStringMatcher(()))
    admitted: float | None = None
    first_token: float | None = None
    prefill_gen: Generator[tuple[int, int], None, Any] | None = None
    prefill_done_tokens: int = 0  # prompt tokens accounted in stats / progress
    prefill_done_work: int = 0  # prefill_iter work units done so far
    prefill_total_work: int = 0  # prefill_iter work units in all (known after the first unit)
    cache: Any | None = None
    row: int | None = None  # the request's row of the engine's SlotSampler (from its first token on)
    num_generated: int = 0
    peak_cache_bytes: int = 0
    finished: bool = False
    owner: str = ""  # the caller (contexts and prefix caching are per caller)
    making: Context | None = None  # a CreateContext request: the context its prefill makes
    source: Context | None = None  # the context this generation continues (forked at admission)
    feed: deque[int] | None = None  # prompt tokens after a context still to run as decode steps
    cached_tokens: int = 0  # prompt tokens taken from a context
    leader: _Request | None = None  # an identical prompt being prefilled: this one forks its state
    followers: list[_Request] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.sched.request_id


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, OutOfMemoryError, MemoryError))


class Engine:
    """Serves many generation requests at once on one model (see the module docstring)."""

    def __init__(self, model: Any, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        if self.config.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.config.stream_interval}")
        self.tokenizer = model_tokenizer(model)  # the checkpoint's (load_model attaches it)
        mcfg = model.config
        self._vocab_size = int(mcfg.vocab_size)
        self._eos_id = int(getattr(mcfg, "eos_token_id", self.tokenizer.eos_token_id))
        model_context = int(getattr(mcfg, "max_context", mcfg.max_position_embeddings))
        self.max_context = min(self.config.max_context or model_context, model_context)
        self._device = model_device(model)
        self._prefill_chunk = self.config.prefill_chunk_tokens or (16384 if self._device.type == "cuda" else 512)
        # A backend may bring its own cache type; the eager model uses ReformerCache.
        self._batch_caches: Callable[[Sequence[Any]], Any] = getattr(
            model, "batch_caches", ReformerCache.batch
        )
        # One decode pool for every sequence (the eager model): a step's ops do not grow with the batch.
        # Sized to the admission budget up front so it never grows (and copies) mid-serving; on a CPU its
        # pages take memory only once written.
        self._pool = None
        self._graphs = None
        if hasattr(model, "new_decode_pool"):
            per_token = max(float(model.cache_bytes_per_token()), 1.0)
            tokens = min(int(self.config.cache_memory_bytes / per_token), self.config.max_batch * self.max_context)
            cuda = self._device.type == "cuda"
            graphs = self.config.cuda_graphs if cuda else self.config.compile_step
            self._pool = model.new_decode_pool(self.config.max_batch + graphs, tokens)  # + the pad slot
            if graphs and not cuda and not aoti_available():
                raise ValueError(f"compile_step needs AOTInductor (torch >= 2.6); this is torch {torch.__version__}")
            if graphs:
                self._graphs = model.use_step_graphs(self._pool, None if cuda else aoti_capture)
        # Every generating request's sampling state, on the device (+ the pad row of padded batches).
        self._sampler = SlotSampler(self.config.max_batch + 1, self._vocab_size, self._device)
        self._pool_kw: dict[str, Any] = {} if self._pool is None else {"pool": self._pool}  # for prefills
        self._scheduler = Scheduler(
            SchedulerConfig(
                max_running=self.config.max_batch,
                max_waiting=self.config.max_queue,
                cache_budget_bytes=self.config.cache_memory_bytes,
                max_context=self.max_context,
                long_prompt_tokens=self.config.long_prompt_tokens,
                short_slots=self.config.short_prompt_slots,
                aging_rate=self.config.queue_aging_rate,
            ),
            model.cache_bytes,
        )
        self._cond = threading.Condition(threading.RLock())
        self._requests: dict[str, _Request] = {}
        self._prefilling: list[_Request] = []  # admitted, prompt not yet fully processed (FIFO)
        self._feeding: list[_Request] = []  # forked, their prompt to run in one pass (`_execute_feed`)
        self._decoding: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._stop_loop = False
        self._accepting = True
        self._alive = True
        self._fatal_error: str | None = None
        # (cache, prefill generator, request) of finished requests: given back on the engine thread
        self._to_release: list[tuple[Any, Any, _Request | None]] = []
        # Contexts need the eager model's pool (forks share its pages); other backends have none.
        self._contexts = ContextRegistry(
            self.config.context_memory_bytes if self._pool is not None else 0,
            max_ttl_s=self.config.max_context_ttl_s, default_ttl_s=self.config.default_context_ttl_s,
            block=self._pool.P if self._pool is not None else 64)
        self._prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self._prefix_hits = 0  # of which found in a live context (or an identical prompt's prefill)
        self.fault_hook: FaultHook | None = None
        # Decode steps run here when they overlap the engine's host work (`overlap_steps`); one at a time.
        overlap = self.config.overlap_steps
        self._device_thread = (ThreadPoolExecutor(1, thread_name_prefix="reformer-device", initializer=self._bind_device)
                               if (self._device.type == "cuda" if overlap is None else overlap) else None)
        self._inflight: _InFlight | None = None  # the decode step launched and not yet applied
        # statistics
        self._steps = 0
        self._step_failures = 0  # consecutive failed steps (reset by a step that succeeds)
        self._step_failures_total = 0
        self._decode_failure: tuple[Exception, list[str]] | None = None  # set by a step's failed decode
        self._arrivals = 0  # requests ever added (the idle engine's burst wait watches it)
        self._prefill_tokens_total = 0
        self._decode_tokens_total = 0
        self._last_step_time = 0.0
        self._last_step_tokens = 0
        self._last_decode_batch = 0

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine loop thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="reformer-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop admitting; with `drain` let accepted requests finish (up to `timeout`); abort the rest."""
        with self._cond:
            self._accepting = False
        if drain:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with self._cond:
                    if not self._requests or not self._alive or self._thread is None:
                        break
                await asyncio.sleep(0.01)
        with self._cond:
            for req in list(self._requests.values()):
                self._finish(req, FinishReason.ABORTED, error="engine shutting down")
            for ctx in self._contexts.all_live():
                if self._contexts.remove(ctx):
                    self._release_context(ctx)
            self._stop_loop = True
            self._cond.notify_all()
        thread = self._thread
        # Poll instead of run_in_executor(join): that would leave an executor thread behind.
        while thread is not None and thread.is_alive():
            await asyncio.sleep(0.005)

    # ---- public API -----------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None, *,
        context_id: str | None = None, owner: str = "",
    ) -> RequestStream:
        """Queue a request; returns its event stream. Call from a running asyncio loop.

        With `context_id` the prompt (which may then be empty) continues one of `owner`'s contexts
        (`create_context`); without it, and with prefix caching on, a prompt that starts with the tokens of
        one of `owner`'s live contexts continues that context the same way.

        Raises InvalidRequestError (bad parameters, too long, larger than the whole cache budget),
        ContextNotFoundError (no such context of `owner`), OverloadedError (waiting queue full) or
        EngineStoppedError (shutting down or dead).
        """
        loop = asyncio.get_running_loop()
        self._check_accepting()  # a draining engine answers "unavailable" before judging the request
        prompt = list(prompt_ids)
        params.validate(vocab_size=self._vocab_size, max_new_tokens_limit=self.config.max_new_tokens_limit,
                        bounds=self.config.bounds)
        if prompt or not context_id:  # a prompt may be empty only after a context
            validate_prompt(prompt, vocab_size=self._vocab_size)
        if params.stop and not self.tokenizer.has_text:
            raise TokenizerUnavailableError(f"stop strings are matched on text, and {self.tokenizer.reason}")
        if request_id is not None and not request_id:
            raise InvalidRequestError("request_id", "must be non-empty when given")
        rid = request_id or uuid.uuid4().hex
        with self._cond:
            source = self._contexts.get(context_id, owner) if context_id else None
            if source is None and self.prefix_caching:  # hits: here, or an identical prompt's prefill later
                self._prefix_queries += len(prompt)
                source = self._contexts.find_prefix(prompt, owner) if self._contexts.enabled else None
                if source is not None and len(prompt) - len(source.tokens) > PREFIX_REUSE_MAX_REST * len(source.tokens):
                    source = None
                if source is not None:
                    self._prefix_hits += len(source.tokens)
                    prompt = prompt[len(source.tokens):]
        context = list(source.tokens) if source is not None else []
        if source is None:
            self._check_padded_prompt(len(prompt))
        elif len(context) + len(prompt) + params.max_new_tokens > self.max_context:
            raise InvalidRequestError(
                "max_new_tokens", f"context ({len(context)}) + prompt ({len(prompt)}) + max_new_tokens "
                f"({params.max_new_tokens}) = {len(context) + len(prompt) + params.max_new_tokens} tokens exceeds "
                f"the model's context of {self.max_context} tokens")
        now = time.monotonic()
        sched = ScheduledRequest(
            request_id=rid,
            prompt_len=len(prompt),
            max_new_tokens=params.max_new_tokens,
            priority=params.priority,
            context_tokens=len(context),
            shared_bytes=self._fork_shared_bytes(source, len(prompt) + params.max_new_tokens),
        )
        req = _Request(
            sched=sched,
            prompt_ids=prompt,
            params=params,
            stream=RequestStream(rid, loop, self.config.stream_buffer_events, self.config.stream_interval),
            arrival=now,
            deadline=None if params.max_time_s is None else now + params.max_time_s,
            detok=self.tokenizer.detokenizer(context + prompt),
            stop=StopStringMatcher(params.stop),
            owner=owner,
            source=source,
            cached_tokens=len(context),
        )
        with self._cond:
            self._check_accepting()
            if source is not None and source.removed:  # deleted or expired since it was looked up
                raise ContextNotFoundError(f"no context {source.context_id!r} of this caller (deleted or expired)")
            self._scheduler.add(sched)
            if source is not None:
                source.active += 1
            self._requests[rid] = req
            self._arrivals += 1
            self._cond.notify_all()
        return req.stream

    async def warm_up(self) -> int:
        """Pay first-call costs before traffic (the server runs this before it reports SERVING): one short greedy
        generation (allocator, kernels); then, when decode steps are recorded (CUDA graphs, or `compile_step`),
        every (batch bucket, dense variant) of greedy decoding is recorded here instead of inside a serving step,
        as vLLM captures its batch sizes at startup: for each bucket, that many requests on prompts well short of
        one LSH chunk decode one token together (dense rows); then `max_batch` requests on prompts longer than a
        chunk, request i generating i + 2 tokens, so the batch shrinks through every bucket (hashed rows).
        Sampled steps are recorded at first use. Returns the recordings made."""
        tok = self.tokenizer
        base = tok.encode("warm-up ") if tok.has_text else [int(self.model.config.pad_token_id)]

        def prompt(i: int, n: int) -> list[int]:  # distinct prompts: identical ones would share one prefill
            head = tok.encode(f"{i}:") if tok.has_text else [i % self._vocab_size]
            return (head + base * n)[:n]

        async def run(prompts: list[list[int]], tokens: list[int]) -> None:
            streams = [self.add_request(p, SamplingParams(max_new_tokens=t, temperature=0.0, ignore_eos=True))
                       for p, t in zip(prompts, tokens, strict=True)]
            for stream in streams:
                async for _ev in stream:
                    pass

        graphs = self._graphs
        before = graphs.captures if graphs is not None else 0
        await run([prompt(0, 7)], [2])
        if graphs is None:
            return 0
        n = self.config.max_batch
        chunk = int(self.model.config.lsh_attn_chunk_length)
        short = max(1, min(8, chunk - 3))  # still dense after its decode step
        bucket = 1
        while bucket <= n:
            await run([prompt(i, short) for i in range(bucket)], [2] * bucket)
            bucket *= 2
        if bucket // 2 < n:  # max_batch not a power of two: its own bucket too
            await run([prompt(i, short) for i in range(n)], [2] * n)
        if chunk + 1 + n + 2 <= self.max_context:
            await run([prompt(i, chunk + 1) for i in range(n)], [i + 2 for i in range(n)])
        return graphs.captures - before

    def _fork_shared_bytes(self, source: Context | None, tokens: int) -> int:
        """Cache bytes a generation of `tokens` decode positions on `source` shares instead of owning: its full
        pages, unless the fork could copy them (a delta merge, or the hashing at one chunk, rewrites the order
        of every position: copy-on-write), in which case it reserves them as its own."""
        if source is None or self._pool is None:
            return 0
        seq = source.cache
        if not self._pool.is_hashed[seq.slot] or tokens - 1 >= self._pool.M:
            return 0
        return self._pool.shared_pages(len(source.tokens)) * self._pool.page_nbytes

    # ---- contexts -------------------------------------------------------------------------------
    def create_context(self, prompt_ids: Sequence[int], *, ttl_s: float | None = None, owner: str = ""
                       ) -> RequestStream:
        """Prefill `prompt_ids` once and pin the state as one of `owner`'s contexts. The stream carries
        PrefillProgress events, then ContextCreated, then a FinishEvent (an error or abort: no context; its
        bytes are freed). Its request id is the context id (abort it to cancel).

        Raises ContextsDisabledError (context memory 0), InvalidRequestError (bad tokens or ttl, too long),
        OverloadedError (context memory or queue full) or EngineStoppedError."""
        loop = asyncio.get_running_loop()
        self._check_accepting()
        prompt = list(prompt_ids)
        validate_prompt(prompt, vocab_size=self._vocab_size)
        if len(prompt) >= self.max_context:
            raise InvalidRequestError("prompt", f"a context of {len(prompt)} tokens leaves no room for a token in "
                                      f"the model's context of {self.max_context} tokens")
        self._check_padded_prompt(len(prompt))
        params = SamplingParams(max_new_tokens=1, temperature=0.0)
        with self._cond:
            self._check_accepting()
            ctx = self._contexts.reserve(owner, prompt, ttl_s, int(self.model.cache_bytes(len(prompt))))
            sched = ScheduledRequest(request_id=ctx.context_id, prompt_len=len(prompt), max_new_tokens=1)
            try:
                self._scheduler.add(sched)
            except BaseException:
                self._contexts.abandon(ctx)
                raise
            req = _Request(
                sched=sched, prompt_ids=prompt, params=params,
                stream=RequestStream(ctx.context_id, loop, self.config.stream_buffer_events),
                arrival=time.monotonic(), deadline=None, owner=owner, making=ctx,
            )
            self._requests[ctx.context_id] = req
            self._arrivals += 1
            self._cond.notify_all()
        return req.stream

    def delete_context(self, context_id: str, owner: str = "") -> int:
        """Delete one of `owner`'s contexts (ContextNotFoundError if it has none of that id): no new request may
        use it; returns the requests still generating on it (its memory is freed when the last one ends)."""
        with self._cond:
            ctx = self._contexts.get(context_id, owner)
            active = ctx.active
            if self._contexts.remove(ctx):
                self._release_context(ctx)
            self._cond.notify_all()
        return active

    def list_contexts(self, owner: str = "") -> list[ContextInfo]:
        """`owner`'s live contexts, oldest first."""
        with self._cond:
            return self._contexts.list(owner)

    def _release_context(self, ctx: Context) -> None:
        """(Lock held.) A removed context nobody uses: its sequence goes back on the engine thread."""
        self._scheduler.unpin(ctx.nbytes)
        self._to_release.append((ctx.cache, None, None))
        ctx.cache = ctx.logits = None
        self._cond.notify_all()

    def _expire_contexts(self) -> None:
        """(Lock held, engine thread.) Remove the contexts whose TTL has passed."""
        for ctx in self._contexts.expired():
            if self._contexts.remove(ctx):
                self._release_context(ctx)

    def _context_made(self, req: _Request, cache: Any, logits: torch.Tensor) -> int:
        """A CreateContext prefill is done: the context goes live (its pages trimmed to its tokens, its bytes
        pinned) and the request ends. Returns the prompt tokens it adds to the prefill count."""
        seq = cache.sequences[0]
        with self._cond:
            if req.finished or req.making is None:
                cache.release()
                return 0
            self._pool.trim(seq)
            nbytes = int(seq.nbytes())
            ctx = req.making
            delta = self._prefill_done(req)
            self._contexts.ready(ctx, seq, logits.detach().clone(), nbytes)
            self._scheduler.pin(nbytes)
            req.peak_cache_bytes = nbytes
            req.stream.put(ContextCreated(req.request_id, ctx.context_id, len(ctx.tokens), nbytes, ctx.ttl_s))
            self._finish(req, FinishReason.STOP)
        return delta

    def _start_fork(self, req: _Request, src: Any, logits: torch.Tensor, tail: list[int], now: float) -> None:
        """(Lock held, engine thread.) Start a generation that continues sequence `src` (a context's, or an
        identical prompt's just prefilled): fork it; its own prompt tokens `tail` then run as decode steps
        (samples discarded until the last), or, with no tail, its first token comes from `logits`."""
        self._prefilling = [r for r in self._prefilling if r is not req]
        try:
            seq = self._pool.fork(src, req.cached_tokens + len(tail) + req.params.max_new_tokens)
        except Exception as exc:
            oom = _is_oom(exc)
            logger.warning("fork for request %s failed: %r", req.request_id, exc, exc_info=not oom)
            self._finish(req, FinishReason.ERROR, error=("out of memory: " if oom else "fork failed: ") + str(exc),
                         kind="oom" if oom else "internal")
            return
        req.cache = ReformerCache([seq])
        req.peak_cache_bytes = max(req.peak_cache_bytes, _cache_nbytes(req.cache))
        req.prefill_done_tokens = len(req.prompt_ids)
        if len(tail) > 1 and hasattr(self.model, "decode_tokens") and self._pool.is_hashed[seq.slot]:
            req.feed = deque(tail)  # layer-by-layer passes of up to a delta's worth each (`_execute_feed`)
            self._feeding.append(req)
            return
        if tail:  # decode steps feed the tokens (`_update`); the step after the last one samples
            req.feed = deque(tail[1:])
            self._feed_next(req, tail[0])
        else:
            out = self._sample_first(logits.view(1, -1), [req])
            self._update(req, out.tokens[0], out.logprobs[0], now)
        if not req.finished:
            self._decoding.append(req)

    def _execute_feed(self, batch: list[_Request]) -> None:
        """Run forks' prompt tokens in one layer-by-layer pass (`model.decode_tokens`: the numbers of one decode
        step per token, the largest weights read once for all of them) and sample their first tokens. A
        failure fails these requests only (their state may be half-written)."""
        with self._cond:
            batch = [r for r in batch if not r.finished and r.cache is not None]
            seqs = [r.cache.sequences[0] for r in batch]
        if not batch:
            return
        try:
            if self.fault_hook is not None:
                for req in batch:
                    self.fault_hook("prefill", req.request_id)
            # each sequence takes what its delta has room for (a long prompt goes on in the next steps)
            tails = [list(r.feed or ())[: self._pool.room_for_tokens(s.slot)] for r, s in zip(batch, seqs, strict=True)]
            logits = self.model.decode_tokens(tails, seqs)  # (B, V)
            out = self._sample_first(logits, batch)  # (rows whose prompt goes on discard theirs)
        except Exception as exc:  # these requests' failure only
            oom = _is_oom(exc)
            logger.warning("prompt after a context failed for %s: %r", [r.request_id for r in batch], exc,
                           exc_info=not oom)
            with self._cond, _wakeups_held():
                for req in batch:
                    self._finish(req, FinishReason.ERROR, kind="oom" if oom else "internal",
                                 error=("out of memory: " if oom else "prompt after the context failed: ") + str(exc))
                self._feeding = [r for r in self._feeding if not r.finished]
            return
        now = time.monotonic()
        with self._cond, _wakeups_held():
            for req, tail in zip(batch, tails, strict=True):
                for _ in tail:
                    req.feed.popleft()
            done = [r for r in batch if not r.feed]
            self._feeding = [r for r in self._feeding if all(r is not q for q in done)]
            for req, token, lp in zip(batch, out.tokens, out.logprobs, strict=True):
                if req.finished or req.feed:  # finished meanwhile, or more prompt to go
                    continue
                req.feed = None
                self._update(req, token, lp, now)
                if not req.finished:
                    self._decoding.append(req)

    def _find_leader(self, req: _Request) -> _Request | None:
        """(Lock held.) A request with the same prompt whose prefill is under way or waiting (prefix caching)."""
        n = len(req.prompt_ids)
        for other in self._prefilling:
            if (other is not req and not other.finished and other.making is None and other.source is None
                    and other.leader is None and len(other.prompt_ids) == n and other.prompt_ids == req.prompt_ids):
                return other
        return None

    @property
    def context_memory_bytes(self) -> int:
        """Cache bytes contexts may pin (0: contexts are off, e.g. a backend without a decode pool)."""
        return self._contexts.memory_bytes

    @property
    def prefix_caching(self) -> bool:
        return self.config.prefix_caching and self._pool is not None

    def _check_accepting(self) -> None:
        with self._cond:
            if not self._alive:
                raise EngineStoppedError(f"engine has stopped: {self._fatal_error}")
            if not self._accepting:
                raise EngineStoppedError("engine is shutting down and admits no new requests")

    def _check_padded_prompt(self, n: int) -> None:
        # The prefill pads the prompt to a multiple of the chunk lengths (as transformers does); a prompt
        # whose padded length passes the context would only fail later, inside the engine loop.
        cfg = self.model.config
        if hasattr(cfg, "prompt_length_error") and n <= self.max_context:
            err = cfg.prompt_length_error(n, self.max_context)
            if err is not None:
                raise InvalidRequestError("prompt", f"prompt of {n} tokens: {err}")

    def abort(self, request_id: str) -> None:
        """Abort a request in any state; thread-safe and idempotent. Frees its slot and bytes at once."""
        with self._cond:
            req = self._requests.get(request_id)
            if req is not None:
                self._finish(req, FinishReason.ABORTED)

    def stats(self) -> EngineStats:
        with self._cond:
            actual = sum(_cache_nbytes(r.cache) for r in self._requests.values())
            return EngineStats(
                running=self._scheduler.num_running,
                waiting=self._scheduler.num_waiting,
                cache_bytes_in_use=self._scheduler.bytes_in_use,
                cache_bytes_budget=self.config.cache_memory_bytes,
                steps_total=self._steps,
                prefill_tokens_total=self._prefill_tokens_total,
                decode_tokens_total=self._decode_tokens_total,
                last_step_time_s=self._last_step_time,
                last_step_tokens=self._last_step_tokens,
                alive=self._alive,
                extra={
                    "cache_bytes_allocated": float(actual),
                    "prefilling": float(sum(1 for r in self._prefilling if not r.finished)),
                    "decoding": float(sum(1 for r in self._decoding if not r.finished)),
                    "last_decode_batch": float(self._last_decode_batch),
                    "step_failures_total": float(self._step_failures_total),
                    "contexts": float(self._contexts.live),
                    "context_cache_bytes": float(self._contexts.pinned_bytes),
                    "prefix_cache_queries": float(self._prefix_queries),
                    "prefix_cache_hits": float(self._prefix_hits),
                },
            )

    # ---- the loop -------------------------------------------------------------------------------
    def _bind_device(self) -> None:
        """(On each engine thread.) Make the model's GPU this thread's current device: CUDA's current device is
        per thread, and streams and graphs captured without a device argument go to the current one."""
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)

    def _run(self) -> None:
        self._bind_device()
        idle = True  # the first requests after start are a burst like any other
        try:
            while True:
                self._release_finished()
                with self._cond:
                    idle = idle or not self._requests
                    while not self._stop_loop and not self._requests:
                        self._expire_contexts()
                        if self._to_release:
                            break
                        self._cond.wait(self._contexts.next_expiry_in())
                    if self._to_release:
                        continue
                    if idle:
                        self._await_burst()
                        idle = False
                    if self._stop_loop:
                        break
                with torch.inference_mode():
                    try:
                        self.step()
                    except Exception as exc:
                        self._step_failed(exc)  # re-raises once too many steps in a row failed
                        continue
                # a failed decode step is seen when its tokens are due (with overlap, in a later step)
                failure, self._decode_failure = self._decode_failure, None
                if failure is not None:
                    self._step_failed(*failure)
                else:
                    self._step_succeeded()
        except BaseException as exc:  # the loop must report every failure before it stops
            logger.exception("engine loop failed; failing all requests")
            with self._cond:
                self._alive = False
                self._fatal_error = f"{type(exc).__name__}: {exc}"
                for req in list(self._requests.values()):
                    self._finish(
                        req, FinishReason.ERROR, error=f"engine failure: {self._fatal_error}", kind="internal"
                    )
        self._sync()
        self._release_finished()
        if self._device_thread is not None:
            self._device_thread.shutdown(wait=True)

    def _step_failed(self, exc: Exception, request_ids: Sequence[str] = ()) -> None:
        """Count a failed step; the engine goes on unless `max_step_failures` steps in a row failed (then
        this re-raises and the loop dies). A short pause keeps a persistent fault from spinning the loop."""
        with self._cond:
            self._step_failures += 1
            self._step_failures_total += 1
            failures = self._step_failures
        limit = self.config.max_step_failures
        logger.error("engine step failed (%d in a row, limit %d)%s: %r", failures, limit,
                     f", failing requests {', '.join(request_ids)}" if request_ids else "", exc, exc_info=exc)
        if failures >= limit:
            raise exc
        time.sleep(min(0.01 * failures, 0.1))

    def _step_succeeded(self) -> None:
        if self._step_failures:
            with self._cond:
                self._step_failures = 0

    def _await_burst(self) -> None:
        """(Lock held; the engine was idle and a request arrived.) Wait while more requests keep arriving,
        each within a quarter of `arrival_window_s` of the last, up to `arrival_window_s` in all. A client
        that sends 16 requests at once hands them over one by one; without the wait the engine took the
        first alone and the rest a few per step (their prefills staggered, the batch short of 16 for the
        first steps). A request arriving alone waits a quarter of the window (0.5 ms by default)."""
        window = self.config.arrival_window_s
        if window <= 0:
            return
        deadline = time.monotonic() + window
        seen = self._arrivals
        while not self._stop_loop:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(min(window / 4, left))
            if self._arrivals == seen:  # nothing new within the gap
                return
            seen = self._arrivals

    def _release_finished(self) -> None:
        """(Engine thread, between steps.) Give finished requests' decode state back: close unfinished
        prefills (their slots go back) and release caches (after the decode step in flight, which may still
        be reading them)."""
        with self._cond:
            pending = bool(self._to_release)
        if pending:
            self._sync()
        with self._cond:
            done, self._to_release = self._to_release, []
        for cache, gen, req in done:
            if gen is not None:
                gen.close()
            if cache is not None:
                cache.release()
            if req is not None and req.row is not None:  # rows are taken and given back on this thread only
                self._sampler.free_row(req.row)
                req.row = None

    def step(self) -> None:
        """One engine iteration: schedule -> execute (batched decode + one prefill chunk) -> update."""
        self._release_finished()
        t0 = time.perf_counter()
        if self.fault_hook is not None:
            self.fault_hook("step", None)
        with self._cond:
            self._steps += 1
            self._schedule(time.monotonic())
            decode_batch = [r for r in self._decoding if not r.finished]
            prefill_queue = [r for r in self._prefilling if not r.finished]
            self._feeding = [r for r in self._feeding if not r.finished]
            feed, total = [], 0
            for r in self._feeding:  # prompts after a context: about FEED_TOKENS_PER_STEP in one pass
                if feed and total + min(len(r.feed or ()), self._pool.M) > FEED_TOKENS_PER_STEP:
                    break
                feed.append(r)
                total += min(len(r.feed or ()), self._pool.M)
        decoded = self._execute_decode(decode_batch)
        if feed or prefill_queue:  # they use the pool and the sampler: the step in flight ends first
            decoded += self._sync()
        if feed:
            self._execute_feed(feed)
        # Prefill budget of this step. Every other step the prompts with the least work left go first, so a
        # short prompt does not wait behind a long prefill for its whole length; on the other steps the
        # oldest goes first, so nothing starves. Prompts that finish leave the rest of the budget to the
        # next ones. A prompt not started yet is prefilled together with the other waiting prompts of its
        # length in one batched pass (16 prompts of 64 tokens cost ~0.6x of 16 passes): while sequences
        # decode, as many as the budget allows, counted one by one; while none does, no stream's inter-token
        # latency is at stake and up to GROUP_PREFILL_STEPS steps' worth of work goes in one pass.
        if self._steps % 2 == 0:
            prefill_queue.sort(key=self._work_left)  # stable: FIFO among equals
        prefilled = 0
        remaining = self._prefill_chunk
        done: set[int] = set()
        failed: set[int] = set()  # prompt lengths whose batched pass raised this step: one at a time now
        for req in prefill_queue:
            if id(req) in done or req.leader is not None or req.cache is not None:
                continue  # a follower forks its leader's prefill (in this very step, perhaps)
            group = None
            if len(req.prompt_ids) not in failed:
                group = self._prefill_group(req, prefill_queue, done, remaining if decode_batch else None)
            if group is not None:
                tokens = self._execute_prefill_group(group)
                if tokens is None:
                    failed.add(len(req.prompt_ids))
                else:
                    prefilled += tokens
                    done.update(id(r) for r in group)
                    if decode_batch:
                        remaining -= len(group) * self._prefill_work(len(req.prompt_ids))
                        if remaining <= 0:
                            break
                    continue
            tokens, used = self._execute_prefill(req, remaining)
            prefilled += tokens
            remaining -= max(used, 1)
            if remaining <= 0:
                break
        with self._cond:
            self._last_step_tokens = decoded + prefilled
            self._last_step_time = time.perf_counter() - t0
            self._last_decode_batch = len(decode_batch)

    def _schedule(self, now: float) -> None:
        max_wait = self.config.max_queue_time_s
        for req in list(self._requests.values()):
            if req.deadline is not None and now >= req.deadline:
                self._finish(req, FinishReason.ERROR, error="max_time_s exceeded", kind="timeout")
            elif max_wait is not None and req.admitted is None and now - req.arrival > max_wait:
                self._finish(req, FinishReason.ERROR, kind="overloaded",
                             error=f"waited {now - req.arrival:.1f}s for admission, longer than the queue time "
                                   f"limit of {max_wait:g}s (--max-queue-time)")
        self._expire_contexts()
        for sched in self._scheduler.schedule():
            req = self._requests[sched.request_id]
            req.admitted = now
            self._prefilling.append(req)
            if req.source is not None:  # a context's pages stay alive while requests on it are unfinished
                self._sync()  # the fork copies pool state: after the step in flight
                self._start_fork(req, req.source.cache, req.source.logits, req.prompt_ids, now)
            elif self.config.prefix_caching and req.making is None and self._pool is not None:
                req.leader = self._find_leader(req)
                if req.leader is not None:  # an identical prompt's prefill: one prefill for both
                    req.leader.followers.append(req)
        self._prefilling = [r for r in self._prefilling if not r.finished]
        self._decoding = [r for r in self._decoding if not r.finished]

    # ---- execute: prefill ------------------------------------------------------------------------
    def _execute_prefill(self, req: _Request, budget: int) -> tuple[int, int]:
        """Advance `req`'s prefill by about `budget` work units; return (prompt tokens done, units used).

        Units are `model.prefill_iter`'s (tokens x layers); one unit is at most `prefill_chunk_tokens`.
        After a unit, the next runs only if at least half of it (judged by the last one) fits the budget
        left: a pass of a 65535-token prompt ends with a 4095-unit slice, and running one more 4096-unit
        slice after it made that step twice the others (the largest inter-token gap of the streams
        decoding beside it).
        """
        chunk = self._prefill_chunk
        n = len(req.prompt_ids)
        start_work = req.prefill_done_work
        try:
            if self.fault_hook is not None:
                self.fault_hook("prefill", req.request_id)
            gen = req.prefill_gen
            if gen is None:
                ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self._device)  # (1, T)
                capacity = n + req.params.max_new_tokens
                gen = self.model.prefill_iter(ids, capacity=capacity, last_only=True, work_tokens=chunk,
                                              **self._pool_kw)
                with self._cond:
                    if req.finished:
                        return 0, 0
                    req.prefill_gen = gen
            result = None
            while True:
                before = req.prefill_done_work
                try:
                    done, total = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                req.prefill_done_work, req.prefill_total_work = done, total
                left = budget - (done - start_work)
                if left <= 0 or 2 * left < done - before or req.finished:
                    break
            if result is None:
                tokens_done = n * req.prefill_done_work // max(req.prefill_total_work, 1)
                with self._cond:
                    if req.finished:
                        return 0, req.prefill_done_work - start_work
                    delta = tokens_done - req.prefill_done_tokens
                    req.prefill_done_tokens = tokens_done
                    self._prefill_tokens_total += delta
                    # only prompts longer than one chunk report progress, and only when it moved (a step's
                    # work can be a small share of a long prompt's, e.g. a slice of its embeddings)
                    if n > chunk and delta > 0:
                        req.stream.put(PrefillProgress(req.request_id, tokens_done, n))
                return delta, req.prefill_done_work - start_work
            logits, cache = result
            if req.making is not None:  # CreateContext: no token, the state becomes a context
                return self._context_made(req, cache, logits[0, -1]), \
                    max(req.prefill_total_work, req.prefill_done_work) - start_work
            out = self._sample_first(logits[:, -1, :], [req])
        except Exception as exc:  # one request's failure (OOM included) must not take the engine down
            oom = _is_oom(exc)
            if oom and self._device.type == "cuda":
                torch.cuda.empty_cache()
            logger.warning("prefill of request %s failed: %r", req.request_id, exc, exc_info=not oom)
            with self._cond:
                self._finish(
                    req,
                    FinishReason.ERROR,
                    error=("out of memory during prefill: " if oom else "prefill failed: ") + str(exc),
                    kind="oom" if oom else "internal",
                )
            return 0, budget
        used = max(req.prefill_total_work, req.prefill_done_work) - start_work
        return self._prefill_finished(req, cache, out.tokens[0], out.logprobs[0], time.monotonic(),
                                      logits[0, -1]), used

    def _prefill_work(self, n: int) -> int:
        """Work units of a prefill of n prompt tokens (what `prefill_iter` counts); 0 if the model does not
        say (exported backends), which turns batched prefills off."""
        work = getattr(self.model, "prefill_work", None)
        return int(work(n)) if work is not None else 0

    def _work_left(self, req: _Request) -> int:
        total = req.prefill_total_work or self._prefill_work(len(req.prompt_ids))
        return total - req.prefill_done_work

    def _prefill_group(self, req: _Request, queue: list[_Request], done: set[int],
                       budget: int | None) -> list[_Request] | None:
        """`req` and the other not-started prompts of its length in `queue` that one batched prefill takes:
        at most `budget` work units when given, else GROUP_PREFILL_STEPS steps' worth; None when that is
        fewer than two prompts (long prompts keep their chunked, reported prefill)."""
        n = len(req.prompt_ids)
        work = self._prefill_work(n)
        if req.prefill_gen is not None or work <= 0 or req.making is not None:
            return None
        size = (budget if budget is not None else GROUP_PREFILL_STEPS * self._prefill_chunk) // work
        group = [r for r in queue if id(r) not in done and not r.finished and r.prefill_gen is None
                 and r.making is None and r.leader is None and r.cache is None and len(r.prompt_ids) == n][:size]
        return group if len(group) > 1 and group[0] is req else None

    def _execute_prefill_group(self, group: list[_Request]) -> int | None:
        """Prefill `group` (equal-length prompts, none started) in one batched pass and emit each first
        token; returns the prompt tokens done. None, having changed nothing, when the pass raised: the caller
        then prefills each prompt alone, so a failure (an out-of-memory included) stays with its request."""
        n = len(group[0].prompt_ids)
        try:
            if self.fault_hook is not None:
                for req in group:
                    self.fault_hook("prefill", req.request_id)
            ids = torch.tensor([r.prompt_ids for r in group], dtype=torch.long, device=self._device)  # (G, n)
            # in one go: the group is sized to the budget it may take (`prefill` equals `prefill_iter` exactly)
            logits, cache = self.model.prefill(ids, capacity=[n + r.params.max_new_tokens for r in group],
                                               last_only=True, **self._pool_kw)
            out = self._sample_first(logits[:, -1, :], group)
        except Exception as exc:
            logger.info("batched prefill of %d prompts failed (%r); prefilling them one by one", len(group), exc)
            return None
        now = time.monotonic()
        with _wakeups_held():
            return sum(self._prefill_finished(req, type(cache)([cache.sequences[b]]), out.tokens[b],
                                              out.logprobs[b], now, logits[b, -1]) for b, req in enumerate(group))

    def _join_row(self, req: _Request) -> None:
        """(Engine thread.) Give `req` its sampler row, afresh: parameters, draw counter 0, and every prompt id
        (a context's too) as seen for the penalty."""
        if req.row is None:
            req.row = self._sampler.take_row()
        context = list(req.source.tokens) if req.source is not None else []
        self._sampler.join(req.row, req.params, context + list(req.prompt_ids))

    def _sample_first(self, logits: Tensor, reqs: list[_Request]) -> SampleOutput:
        """(Engine thread.) Give each request its sampler row (its parameters go up once) and sample its first
        token from its prefill's last logits (n, V); the row then feeds every decode step."""
        for req in reqs:  # (again after a failed batched prefill: the retry starts the row afresh)
            self._join_row(req)
        return self._sampler.sample_now(logits, [r.row for r in reqs])

    def _feed_next(self, req: _Request, token: int) -> None:
        """(Lock held, engine thread.) The next decode step of `req` processes prompt token `token` (after a
        context) instead of its last sample. Before its last prompt token the row is joined afresh, so the first
        generated token is drawn as if nothing had been sampled before it (the fed steps' discarded samples
        touched the row's counter and seen ids)."""
        if req.row is None or not req.feed:
            self._join_row(req)
        self._sampler.set_next(req.row, token)

    def _prefill_done(self, req: _Request) -> int:
        """(Lock held.) `req`'s prompt is processed: count its remaining prompt tokens in the statistics (the
        count returned), forget its prefill generator and take it off the prefilling list."""
        delta = len(req.prompt_ids) - req.prefill_done_tokens
        req.prefill_done_tokens = len(req.prompt_ids)
        self._prefill_tokens_total += delta
        req.prefill_gen = None
        self._prefilling = [r for r in self._prefilling if r is not req]
        return delta

    def _prefill_finished(self, req: _Request, cache: Any, token: int, logprob: TokenLogprob | None,
                          now: float, logits: torch.Tensor | None = None) -> int:
        """Hand a finished prefill's cache and first token to its request; returns the prompt tokens it adds
        to the prefill count (0 if the request finished meanwhile: its cache is given back)."""
        with self._cond:
            if req.finished:
                cache.release()
                return 0
            # Counted before the first token is emitted, so a caller that saw it also sees the stats.
            delta = self._prefill_done(req)
            req.cache = cache
            req.peak_cache_bytes = max(req.peak_cache_bytes, _cache_nbytes(cache))
            followers, req.followers = req.followers, []
            for f in followers:  # identical prompts: each forks this state and samples from these logits
                f.leader = None
                if not f.finished and logits is not None and len(cache) == 1:
                    f.cached_tokens = len(f.prompt_ids)
                    self._prefix_hits += len(f.prompt_ids)
                    self._start_fork(f, cache.sequences[0], logits, [], now)
            self._update(req, token, logprob, now)
            if not req.finished:
                self._decoding.append(req)
        return delta

    # ---- execute: decode -------------------------------------------------------------------------
    def _execute_decode(self, batch: list[_Request]) -> int:
        """Launch one batched decode step over every decoding sequence and apply the tokens of the step before
        it (with `overlap_steps`, while the new one runs; else the new one's too). Returns the number of
        tokens applied."""
        with self._cond:
            prev, self._inflight = self._inflight, None
            batch = [r for r in batch if not r.finished and r.cache is not None]
            if prev is not None:  # a sequence that reaches its token limit with the step in flight is done
                pending = {id(r) for r in prev.batch}
                batch = [r for r in batch if id(r) not in pending or r.num_generated + 1 < r.params.max_new_tokens]
            if self._pool is not None:  # in slot order: a compact range of slots is read through views
                batch.sort(key=lambda r: r.cache.sequences[0].slot)
            # a prompt fed after a context sets its row's next input when its token is applied: no overlap
            overlap = self._device_thread is not None and all(r.feed is None for r in batch)
        applied = 0
        if not overlap:
            applied, prev = self._complete(prev), None
            with self._cond:  # some may have finished with those tokens
                batch = [r for r in batch if not r.finished]
        launched = self._launch_decode(batch) if batch else None
        applied += self._complete(prev)  # while the new step runs
        if overlap and launched is not None:
            self._inflight = launched
        else:
            applied += self._complete(launched)
        return applied

    def _sync(self) -> int:
        """Wait for the decode step in flight, if any, and apply its tokens; returns their number."""
        inflight, self._inflight = self._inflight, None
        return self._complete(inflight)

    def _launch_decode(self, batch: list[_Request]) -> _InFlight | None:
        """Start a decode step of `batch` (on the device thread with `overlap_steps`, else here); None when it
        failed before starting (its requests are finished with the error)."""
        caches = [r.cache for r in batch]
        rows = [r.row for r in batch]
        wants = self._sampler.wants(rows)
        try:
            if self.fault_hook is not None:
                for req in batch:
                    self.fault_hook("decode", req.request_id)
            if self._device_thread is not None:
                return _InFlight(batch, self._device_thread.submit(self._device_step, caches, rows, wants))
            output: Future = Future()
            output.set_result(self._device_step(caches, rows, wants))
            return _InFlight(batch, output)
        except Exception as exc:
            self._decode_failed(batch, exc)
            return None

    @torch.inference_mode()
    def _device_step(self, caches: list[Any], rows: list[int], wants: list[int]) -> SampleOutput:
        """The device part of a decode step (on the device thread with `overlap_steps`): decode and sample
        every row on the device, download the packed output once and unpack it on the host."""
        sampler = self._sampler
        if self._pool is not None:
            # decode and sampling in one device step (one replay with CUDA graphs): the input ids are the
            # rows' last sampled ids, already on the device
            slots = [c.sequences[0].slot for c in caches]
            packed = decode_and_sample(self.model, self._pool, slots, sampler, rows, self._graphs)
        else:  # an exported backend: its own decode step, then the same sampling
            rows_t = sampler.rows_tensor(rows)
            logits, _ = self.model.decode_step(sampler.next_input(rows_t).view(-1, 1),
                                               self._batch_caches(caches))  # (B, 1, V)
            packed = sampler.sample(logits[:, -1, :], rows_t, sampler.mode(rows))
        return unpack(download(packed), wants)  # the step's one download

    def _complete(self, inflight: _InFlight | None) -> int:
        """Wait for a launched decode step and apply its tokens (or fail its requests); returns their number."""
        if inflight is None:
            return 0
        batch = inflight.batch
        try:
            out = inflight.output.result()
        except Exception as exc:
            self._decode_failed(batch, exc)
            return 0
        now = time.monotonic()
        with self._cond, _wakeups_held():
            self._decode_tokens_total += len(batch)
            for req, token, lp in zip(batch, out.tokens, out.logprobs, strict=True):
                if not req.finished:
                    self._update(req, token, lp, now)
        return len(batch)

    def _decode_failed(self, batch: list[_Request], exc: Exception) -> None:
        """A decode step raised: its sequences fail (their state may be half-written); the others' stays."""
        oom = _is_oom(exc)
        if oom and self._device.type == "cuda":
            torch.cuda.empty_cache()
        with self._cond, _wakeups_held():
            for req in batch:
                self._finish(req, FinishReason.ERROR, kind="oom" if oom else "internal",
                             error=("out of memory during decode: " if oom else "decode step failed: ")
                             + f"{type(exc).__name__}: {exc}")
        if oom:
            logger.warning("decode step of %d sequences ran out of memory: %r", len(batch), exc)
        else:  # a bug or a broken device: the loop counts it, and too many in a row end the engine
            self._decode_failure = (exc, [r.request_id for r in batch])

    # ---- update ----------------------------------------------------------------------------------
    def _update(self, req: _Request, token: int, logprob: TokenLogprob | None, now: float) -> None:
        """Apply one sampled token to a request (lock held); a failure here fails that request only."""
        if req.feed is not None:  # a prompt token after a context was just processed: its sample is not used
            if req.feed:
                self._feed_next(req, req.feed.popleft())
                return
            req.feed = None  # the last prompt token was: this is the first generated token
        try:
            if self.fault_hook is not None:
                self.fault_hook("update", req.request_id)
            self._apply_token(req, token, logprob, now)
        except Exception as exc:
            logger.error("request %s failed applying token %d: %r", req.request_id, token, exc, exc_info=exc)
            self._finish(req, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}", kind="internal")

    def _apply_token(self, req: _Request, token: int, logprob: TokenLogprob | None, now: float) -> None:
        """Emit one sampled token's text and finish the request when a stop rule fires (lock held)."""
        params = req.params
        if req.first_token is None:
            req.first_token = now
        if token in params.stop_token_ids:
            self._finish(req, FinishReason.STOP)
            return
        if token == self._eos_id and not params.ignore_eos:
            self._finish(req, FinishReason.EOS)
            return
        req.num_generated += 1
        text, stopped = req.stop.push(req.detok.push([token]))
        req.stream.put(TokenEvent(req.request_id, (token,), text, (logprob,) if logprob is not None else ()))
        if stopped:
            self._finish(req, FinishReason.STOP)
        elif req.num_generated >= params.max_new_tokens:
            self._finish(req, FinishReason.LENGTH)
        elif req.deadline is not None and now >= req.deadline:
            self._finish(req, FinishReason.ERROR, error="max_time_s exceeded", kind="timeout")

    def _finish(
        self, req: _Request, reason: FinishReason, error: str | None = None, kind: str | None = None
    ) -> None:
        """Final transition (lock held; idempotent): free slot and bytes, drop the cache, emit FinishEvent."""
        if req.finished:
            return
        req.finished = True
        self._scheduler.finish(req.request_id, _STATUS[reason])
        self._requests.pop(req.request_id, None)
        req.peak_cache_bytes = max(req.peak_cache_bytes, _cache_nbytes(req.cache))
        # The sequence's state goes back to the pool on the engine thread, between steps: an abort comes
        # from another thread and may land while a step runs on this very sequence.
        self._to_release.append((req.cache, req.prefill_gen, req))
        req.cache = None
        req.prefill_gen = None
        for f in req.followers:  # they prefill on their own after all
            f.leader = None
        req.followers = []
        if req.making is not None:
            self._contexts.abandon(req.making)  # no-op once the context is live
        if req.source is not None and self._contexts.finished_using(req.source):
            self._release_context(req.source)
        tail = ""
        if not req.stop.stopped:
            released, _ = req.stop.push(req.detok.flush())
            tail = released + req.stop.flush()
        now = time.monotonic()
        admitted = req.admitted if req.admitted is not None else now
        req.stream.put(
            FinishEvent(
                request_id=req.request_id,
                finish_reason=reason,
                prompt_tokens=len(req.prompt_ids) + (req.cached_tokens if req.source is not None else 0),
                generated_tokens=req.num_generated,
                text=tail,
                queue_time_s=admitted - req.arrival,
                prefill_time_s=(req.first_token - admitted) if req.first_token is not None else 0.0,
                first_token_time_s=(req.first_token - req.arrival) if req.first_token is not None else 0.0,
                total_time_s=now - req.arrival,
                peak_cache_bytes=req.peak_cache_bytes,
                error=error if reason is FinishReason.ERROR else None,
                error_kind=kind if reason is FinishReason.ERROR else None,
                cached_tokens=req.cached_tokens,
            )
        )
        self._cond.notify_all()


def model_device(model: Any) -> torch.device:
    """The device a model runs on: its `device` attribute (exported backends) or its first parameter's."""
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def _cache_nbytes(cache: Any | None) -> int:
    return 0 if cache is None else int(cache.nbytes)
