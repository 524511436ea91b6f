"""The hand-off of a request's events from the engine thread to its caller's event loop.

`RequestStream` is an async iterator filled from the engine thread without ever blocking it; `_LoopWaker`
wakes each event loop once per batch of events (`_wakeups_held`: once per engine step), not once per stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from reformer_infer.requests import Event, FinishEvent, PrefillProgress, TokenEvent

logger = logging.getLogger(__name__)

_HELD = threading.local()  # .wakers: the loop wakers whose wake-up this thread holds back (None: not holding)


@contextmanager
def _wakeups_held() -> Iterator[None]:
    """Events put by this thread inside the block wake their event loops once, when the block ends.

    Without it the first event of a 16-stream step woke the consumers' loop at once, and its Python ran
    against the engine's for the GIL while the other 15 were still being emitted (then again for those)."""
    if getattr(_HELD, "wakers", None) is not None:  # nested: the outermost block releases
        yield
        return
    _HELD.wakers = held = set()
    try:
        yield
    finally:
        _HELD.wakers = None
        for waker in held:
            try:
                waker.kick()
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass


class _LoopWaker:
    """One cross-thread wake-up of an event loop for every stream that got events since the last one.
    Each `call_soon_threadsafe` writes to the loop's self-pipe (~20 us); one per stream per step was a
    visible share of a 16-stream decode step, one per step is not."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[RequestStream] = []
        self._scheduled = False

    def schedule(self, stream: RequestStream) -> None:
        with self._lock:
            self._pending.append(stream)
            if self._scheduled:
                return
            held = getattr(_HELD, "wakers", None)
            if held is not None:
                held.add(self)
                return
            self._scheduled = True
        self._call()

    def kick(self) -> None:
        """Wake the loop for the streams that got events while a `_wakeups_held` block held them."""
        with self._lock:
            if self._scheduled or not self._pending:
                return
            self._scheduled = True
        self._call()

    def _call(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:
            with self._lock:
                self._pending.clear()
                self._scheduled = False
            raise

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for stream in pending:
            stream._wake()


_WAKERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = weakref.WeakKeyDictionary()
_WAKERS_LOCK = threading.Lock()


def _waker_for(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    with _WAKERS_LOCK:
        waker = _WAKERS.get(loop)
        if waker is None:
            waker = _WAKERS[loop] = _LoopWaker(loop)
        return waker


def _merged(first: TokenEvent, then: TokenEvent) -> TokenEvent:
    """One token event holding two consecutive ones (no token, text or logprob lost)."""
    return TokenEvent(request_id=first.request_id, token_ids=first.token_ids + then.token_ids,
                      text=first.text + then.text, logprobs=first.logprobs + then.logprobs)


class RequestStream:
    """Async iterator over one request's events; filled from the engine thread without ever blocking it.

    The buffer is a deque under a small lock; the consumer is woken with `loop.call_soon_threadsafe`
    (at most one wake-up in flight) and takes consecutive waiting TokenEvents as one (a server that fell
    behind at 16 streams then writes one message for several tokens). When more than `max_events` events
    wait, a new TokenEvent is merged into the last buffered one and a PrefillProgress replaces the last one,
    so memory stays bounded by the request's own output while the engine never waits for the consumer.

    `interval` (the server's `--stream-interval`, as vLLM's and SGLang's): after the first token, which is
    handed over at once, tokens are handed over once at least `interval` of them wait, or with whatever
    event comes after them (the finish, an error): one front-end message (gRPC, SSE) per `interval` tokens,
    so the front-end and its clients do that much less work per token (docs/benchmarks.md section 7).
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, max_events: int,
                 interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"stream interval must be >= 1, got {interval}")
        self.request_id = request_id
        self._loop = loop
        self._max_events = max(1, max_events)
        self._interval = interval
        self._tokens_waiting = 0  # token ids in the buffer's TokenEvents
        self._first_given = False  # the first TokenEvent was handed to the consumer
        self._lock = threading.Lock()
        self._buf: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._wake_pending = False
        self._closed = False  # FinishEvent queued: nothing more is accepted
        self._done = False  # FinishEvent handed to the consumer
        self.coalesced = 0  # token events merged because the consumer was behind

    # ---- producer side (any thread) ---------------------------------------------------------
    def put(self, event: Event) -> None:
        with self._lock:
            if self._closed:
                return
            if isinstance(event, FinishEvent):
                self._closed = True
                self._buf.append(event)
            elif len(self._buf) >= self._max_events and self._merge(event):
                self.coalesced += 1
            else:
                self._buf.append(event)
            if isinstance(event, TokenEvent):
                self._tokens_waiting += len(event.token_ids)
            if self._wake_pending or not self._ready_locked():
                return
            self._wake_pending = True
        try:
            _waker_for(self._loop).schedule(self)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            logger.debug("stream %s: event loop closed, dropping events", self.request_id)

    def _merge(self, event: Event) -> bool:
        last = self._buf[-1]
        if isinstance(event, TokenEvent) and isinstance(last, TokenEvent):
            self._buf[-1] = _merged(last, event)
            return True
        if isinstance(event, PrefillProgress) and isinstance(last, PrefillProgress):
            self._buf[-1] = event
            return True
        return False

    def _ready_locked(self) -> bool:
        """(Lock held.) Whether the consumer may take the buffer's head now: anything but tokens at once;
        tokens when they are the first, or `interval` of them wait, or another event follows them."""
        if self._interval == 1 or not self._first_given or self._tokens_waiting >= self._interval:
            return True
        return not all(isinstance(e, TokenEvent) for e in self._buf)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    # ---- consumer side (the caller's event loop) --------------------------------------------
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        while True:
            with self._lock:
                if self._buf and self._ready_locked():
                    event = self._buf.popleft()
                    if isinstance(event, FinishEvent):
                        self._done = True
                    elif isinstance(event, TokenEvent):
                        # a consumer that fell behind takes every token waiting in one event: one message
                        # (gRPC, SSE) for several tokens costs it about what one for one token does
                        while self._buf and isinstance(self._buf[0], TokenEvent):
                            event = _merged(event, self._buf.popleft())
                            self.coalesced += 1
                        self._tokens_waiting -= len(event.token_ids)
                        self._first_given = True
                    return event
                if self._done:
                    raise StopAsyncIteration
            # Cleared and awaited on the loop thread, where `_wake` also runs, so no wake-up is lost.
            self._ready.clear()
            await self._ready.wait()

    @property
    def finished(self) -> bool:
        return self._closed
