"""Contexts: prefilled decode states pinned in the engine's pool for many generations to continue from.

A context is made by a prefill-only engine request (`Engine.create_context`); once its prefill is done its
sequence (`SequenceCache`) belongs to the `ContextRegistry` below, with its owner, tokens, the logits of its
last position (an empty prompt on a context samples its first token from them), its bytes and its expiry.
A generation on a context forks that sequence (`DecodePool.fork`: full pages shared, copy-on-write) and runs
its own prompt tokens as cached decode steps (docs/semantics.md).

The registry is plain bookkeeping, guarded by the engine's lock; the engine releases a context's sequence
on its own thread between steps, when the context is deleted or expires and no generation uses it any more
(`active` == 0). Until then its bytes stay counted (pinned in the scheduler and against --context-memory).

Automatic reuse (prefix caching) looks contexts up by their tokens: like vLLM's block hashes, a context is
keyed by the chained hashes of its page-sized token blocks plus its tail, so a prompt is hashed once and
each distinct context length costs one dictionary lookup; a hit is verified token by token.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from reformer_infer.requests import InvalidRequestError, OverloadedError, RequestError


class ContextNotFoundError(RequestError):
    """No live context of this caller has that id (unknown, expired, deleted, or another caller's): NOT_FOUND."""


class ContextsDisabledError(RequestError):
    """The server runs with --context-memory 0: FAILED_PRECONDITION."""


@dataclass
class Context:
    """One context (guarded by the engine lock)."""

    context_id: str
    owner: str
    tokens: tuple[int, ...]
    ttl_s: float
    reserved_bytes: int  # counted against --context-memory (projected until ready, then actual)
    cache: Any | None = None  # the SequenceCache once prefilled
    logits: Any | None = None  # (V,) logits of the last position
    nbytes: int = 0  # bytes its sequence holds (once ready)
    created: float = 0.0
    expires: float = math.inf
    active: int = 0  # generations using it (added, not finished)
    ready: bool = False
    removed: bool = False  # deleted or expired: no new generation may use it

    _key: tuple[int, int, int] = field(default=(0, 0, 0), repr=False)


@dataclass(frozen=True)
class ContextInfo:
    context_id: str
    prompt_tokens: int
    cache_bytes: int
    expires_in_s: float
    active_requests: int


def block_hashes(tokens: Sequence[int], block: int) -> list[int]:
    """Chained hashes of the full `block`-token blocks of `tokens`: entry i covers tokens [0, i * block)
    (entry 0 is the empty prefix). Python hashes of int tuples are not randomised per process."""
    out = [0]
    h = 0
    for i in range(len(tokens) // block):
        h = hash((h, tuple(tokens[i * block : (i + 1) * block])))
        out.append(h)
    return out


def _key(tokens: Sequence[int], chain: list[int], block: int) -> tuple[int, int, int]:
    n = len(tokens)
    full = n // block
    return n, chain[full], hash(tuple(tokens[full * block : n]))


class ContextRegistry:
    """Live contexts by id and by token blocks, and the bytes they take (see the module docstring)."""

    def __init__(self, memory_bytes: int, *, max_ttl_s: float, default_ttl_s: float, block: int,
                 clock: Any = time.monotonic) -> None:
        if memory_bytes < 0 or not (0 < default_ttl_s <= max_ttl_s) or not math.isfinite(max_ttl_s):
            raise ValueError("context memory must be >= 0 and 0 < default ttl <= max ttl (finite)")
        self.memory_bytes = int(memory_bytes)
        self.max_ttl_s, self.default_ttl_s = float(max_ttl_s), float(default_ttl_s)
        self.block = int(block)
        self.clock = clock
        self.reserved = 0  # bytes of every context not yet released (pending, live, or removed but in use)
        self._by_id: dict[str, Context] = {}  # findable: ready or pending, not removed
        self._by_key: dict[tuple[int, int, int], list[Context]] = {}
        self._lengths: dict[int, int] = {}  # context length -> live contexts of that length
        self.held: list[Context] = []  # removed but still used by generations (bytes still counted)

    @property
    def enabled(self) -> bool:
        return self.memory_bytes > 0

    # ---- creation -------------------------------------------------------------------------------
    def ttl(self, ttl_s: float | None) -> float:
        if ttl_s is None:
            return self.default_ttl_s
        if not (ttl_s > 0 and ttl_s <= self.max_ttl_s):  # refuses NaN too
            raise InvalidRequestError("ttl_seconds", f"must be in (0, {self.max_ttl_s:g}] (--max-context-ttl), "
                                      f"got {ttl_s}")
        return float(ttl_s)

    def reserve(self, owner: str, tokens: Sequence[int], ttl_s: float | None, nbytes: int) -> Context:
        """A pending context of `nbytes` projected bytes (RESOURCE_EXHAUSTED past --context-memory)."""
        if not self.enabled:
            raise ContextsDisabledError("contexts are disabled on this server (--context-memory 0)")
        ttl = self.ttl(ttl_s)
        if nbytes > self.memory_bytes:
            raise InvalidRequestError("prompt", f"a context of {len(tokens)} tokens needs {nbytes} cache bytes, "
                                      f"more than the whole --context-memory of {self.memory_bytes} bytes")
        if self.reserved + nbytes > self.memory_bytes:
            raise OverloadedError(f"context memory is full: {self.reserved} of {self.memory_bytes} bytes "
                                  f"(--context-memory) in use, {nbytes} more needed; delete a context or wait "
                                  "for one to expire")
        self.reserved += nbytes
        return Context("ctx-" + secrets.token_hex(16), owner, tuple(tokens), ttl, nbytes)

    def ready(self, ctx: Context, cache: Any, logits: Any, nbytes: int) -> None:
        """The context's prefill is done: it can be used (and found) from now on."""
        self.reserved += nbytes - ctx.reserved_bytes
        ctx.reserved_bytes = ctx.nbytes = nbytes
        ctx.cache, ctx.logits, ctx.ready = cache, logits, True
        ctx.created = self.clock()
        ctx.expires = ctx.created + ctx.ttl_s
        ctx._key = _key(ctx.tokens, block_hashes(ctx.tokens, self.block), self.block)
        self._by_id[ctx.context_id] = ctx
        self._by_key.setdefault(ctx._key, []).append(ctx)
        self._lengths[len(ctx.tokens)] = self._lengths.get(len(ctx.tokens), 0) + 1

    def abandon(self, ctx: Context) -> None:
        """A pending context whose prefill ended without it (cancelled, failed): its bytes go back."""
        if not ctx.ready and not ctx.removed:
            ctx.removed = True
            self.reserved -= ctx.reserved_bytes

    # ---- lookup ---------------------------------------------------------------------------------
    def get(self, context_id: str, owner: str) -> Context:
        ctx = self._by_id.get(context_id)
        if ctx is None or ctx.owner != owner or ctx.expires <= self.clock():
            raise ContextNotFoundError(f"no context {context_id!r} of this caller (unknown, expired or deleted)")
        return ctx

    def find_prefix(self, prompt: Sequence[int], owner: str) -> Context | None:
        """The longest live context of `owner` whose every token starts `prompt` (verified), or None."""
        if not self._lengths:
            return None
        chain = block_hashes(prompt, self.block)
        now = self.clock()
        for n in sorted((n for n in self._lengths if n <= len(prompt)), reverse=True):
            for ctx in self._by_key.get(_key(prompt[:n], chain, self.block), ()):
                if ctx.owner == owner and ctx.expires > now and ctx.tokens == tuple(prompt[:n]):
                    return ctx
        return None

    def list(self, owner: str) -> list[ContextInfo]:
        now = self.clock()
        return [ContextInfo(c.context_id, len(c.tokens), c.nbytes, c.expires - now, c.active)
                for c in sorted(self._by_id.values(), key=lambda c: c.created)
                if c.owner == owner and c.expires > now]

    @property
    def live(self) -> int:
        return len(self._by_id)

    @property
    def pinned_bytes(self) -> int:
        """Bytes held by ready contexts (live, or removed but still used)."""
        return sum(c.nbytes for c in self._by_id.values()) + sum(c.nbytes for c in self.held)

    # ---- removal --------------------------------------------------------------------------------
    def remove(self, ctx: Context) -> bool:
        """No new generation may use `ctx`; True when nothing uses it either (release it now), else it is
        held until `finished_using` says the last generation on it is done."""
        if not ctx.removed:
            ctx.removed = True
            self._by_id.pop(ctx.context_id, None)
            same = self._by_key.get(ctx._key, [])
            if ctx in same:
                same.remove(ctx)
                if not same:
                    del self._by_key[ctx._key]
            n = len(ctx.tokens)
            self._lengths[n] -= 1
            if not self._lengths[n]:
                del self._lengths[n]
            if ctx.active:
                self.held.append(ctx)
                return False
            self.reserved -= ctx.reserved_bytes
            return True
        return False

    def finished_using(self, ctx: Context) -> bool:
        """One generation on `ctx` ended; True when `ctx` was removed and is now unused (release it now)."""
        ctx.active -= 1
        if ctx.removed and ctx.active == 0 and ctx in self.held:
            self.held.remove(ctx)
            self.reserved -= ctx.reserved_bytes
            return True
        return False

    def expired(self) -> list[Context]:
        now = self.clock()
        return [c for c in self._by_id.values() if c.expires <= now]

    def next_expiry_in(self) -> float | None:
        """Seconds until the next live context expires (None: none live)."""
        if not self._by_id:
            return None
        return max(0.0, min(c.expires for c in self._by_id.values()) - self.clock())

    def all_live(self) -> list[Context]:
        return list(self._by_id.values())
