"""Contexts in the engine (issue 19): a generation on a context equals prefill(context) followed by decode_step
over its prompt and generated tokens; forks share the context's pages; delete and TTL expiry free every byte
once the last fork ends; automatic reuse (prefix caching) and identical prompts sharing one prefill."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence

import pytest
import torch

from reformer_infer.config import ReformerConfig
from reformer_infer.contexts import ContextNotFoundError, ContextsDisabledError
from reformer_infer.engine import Engine, EngineConfig, RequestStream
from reformer_infer.generation import generate
from reformer_infer.model import ReformerLM
from reformer_infer.requests import (
    ContextCreated,
    Event,
    FinishEvent,
    FinishReason,
    InvalidRequestError,
    OverloadedError,
    PrefillProgress,
    SamplingParams,
    TokenEvent,
)
from reformer_infer.sampling import SlotSampler


@pytest.fixture(scope="module")
def model() -> ReformerLM:
    torch.manual_seed(0)
    cfg = ReformerConfig(
        attn_layers=["local", "lsh", "local", "lsh"], hidden_size=32, num_attention_heads=2, attention_head_size=16,
        feed_forward_size=64, lsh_attn_chunk_length=4, local_attn_chunk_length=8, num_buckets=4, num_hashes=2,
        vocab_size=258, axial_pos_shape=[16, 16], axial_pos_embds_dim=[16, 16], max_position_embeddings=256,
    )
    return ReformerLM(cfg).eval()


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 258) for _ in range(n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


async def collect(stream: RequestStream) -> list[Event]:
    return [ev async for ev in stream]


def tokens_of(events: Sequence[Event]) -> list[int]:
    return [t for ev in events if isinstance(ev, TokenEvent) for t in ev.token_ids]


def finish_of(events: Sequence[Event]) -> FinishEvent:
    assert isinstance(events[-1], FinishEvent), events[-1]
    return events[-1]


def engine_of(model: ReformerLM, **kw) -> Engine:
    cfg = dict(max_batch=16, prefill_chunk_tokens=32, context_memory_bytes=2**24, arrival_window_s=0.0)
    cfg.update(kw)
    engine = Engine(model, EngineConfig(**cfg))
    engine.start()
    return engine


async def make_context(engine: Engine, tokens: list[int], **kw) -> ContextCreated:
    events = await collect(engine.create_context(tokens, **kw))
    made = [ev for ev in events if isinstance(ev, ContextCreated)]
    assert finish_of(events).finish_reason is FinishReason.STOP and len(made) == 1, events[-1]
    return made[0]


def reference(model: ReformerLM, context: list[int], tail: list[int], n: int,
              pick: Callable[[torch.Tensor], int] = lambda last: int(last.argmax())) -> list[int]:
    """The library contract: prefill(context), then decode_step over the prompt and the generated tokens, each
    chosen by `pick` from the last logits (greedy by default)."""
    logits, cache = model.prefill(torch.tensor([context]))
    last = logits[0, -1]
    with cache:
        for t in tail:
            out, _ = model.decode_step(torch.tensor([[t]]), cache)
            last = out[0, -1]
        got = []
        for _ in range(n):
            t = pick(last)
            got.append(t)
            out, _ = model.decode_step(torch.tensor([[t]]), cache)
            last = out[0, -1]
    return got


def test_generation_on_a_context_equals_prefill_then_decode_steps(model: ReformerLM) -> None:
    """Token-id prompts of several lengths, an empty prompt, and text (the byte tokenizer): greedy tokens equal
    the library reference; usage counts the context's tokens as cached."""
    ctx_tokens = prompt(45, seed=1)
    tails = [[], prompt(1, seed=2), prompt(7, seed=3), prompt(20, seed=4)]

    async def go() -> tuple[list[list[Event]], list[Event]]:
        engine = engine_of(model)
        made = await make_context(engine, ctx_tokens, owner="a")
        assert made.prompt_tokens == 45 and made.cache_bytes == model.cache_bytes(45)
        out = [await collect(engine.add_request(t, greedy(12), context_id=made.context_id, owner="a"))
               for t in tails]
        text_ids = engine.tokenizer.encode("héllo, wörld")
        text = await collect(engine.add_request(text_ids, greedy(5), context_id=made.context_id, owner="a"))
        engine.delete_context(made.context_id, "a")
        await asyncio.sleep(0.05)
        assert engine.stats().cache_bytes_in_use == 0 and engine._pool.pages_in_use == 0
        await engine.shutdown()
        return out, [text_ids, text]

    out, (text_ids, text) = asyncio.run(go())
    for tail, events in zip(tails, out, strict=True):
        fin = finish_of(events)
        assert fin.finish_reason is FinishReason.LENGTH
        assert fin.cached_tokens == 45 and fin.prompt_tokens == 45 + len(tail)
        assert tokens_of(events) == reference(model, ctx_tokens, tail, 12), len(tail)
    assert tokens_of(text) == reference(model, ctx_tokens, text_ids, 5)


def sampled_reference(model: ReformerLM, context: list[int], tail: list[int], n: int,
                      params: SamplingParams) -> list[int]:
    """The library contract with seeded sampling: `reference`, each token drawn by a sampler row joined with
    every prompt id (the context's too) as seen, draw counter 0."""
    sampler = SlotSampler(2, model.config.vocab_size)
    row = sampler.take_row()
    sampler.join(row, params, context + tail)
    return reference(model, context, tail, n, lambda last: sampler.sample_now(last.view(1, -1), [row]).tokens[0])


def test_seeded_penalised_sampling_on_a_context_equals_the_library_reference(model: ReformerLM) -> None:
    """Sampled tokens on a context (no prompt, a one-token prompt fed as a decode step, a prompt run as one
    pass) equal the reference: the discarded samples of the prompt's steps leave no trace in the draws or in
    the penalty's seen ids."""
    ctx_tokens = prompt(45, seed=5)
    tails = [[], prompt(1, seed=6), prompt(7, seed=7)]
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, repetition_penalty=1.5, seed=11,
                            ignore_eos=True)

    async def go() -> list[list[Event]]:
        engine = engine_of(model)
        made = await make_context(engine, ctx_tokens, owner="a")
        out = [await collect(engine.add_request(t, params, context_id=made.context_id, owner="a")) for t in tails]
        # a context shorter than one LSH chunk (not hashed yet): its prompt goes in as decode steps
        short = await make_context(engine, ctx_tokens[:3], owner="a")
        out.append(await collect(engine.add_request(tails[2][:4], params, context_id=short.context_id, owner="a")))
        await engine.shutdown()
        return out

    cases = [(ctx_tokens, t) for t in tails] + [(ctx_tokens[:3], tails[2][:4])]
    for (context, tail), events in zip(cases, asyncio.run(go()), strict=True):
        assert tokens_of(events) == sampled_reference(model, context, tail, 10, params), (len(context), len(tail))


def test_eight_forks_decode_together_like_each_alone_and_count_only_their_own_pages(model: ReformerLM) -> None:
    ctx_tokens = prompt(150, seed=5)  # several full pages of 64 positions and a partial one
    tails = [prompt(1 + i, seed=10 + i) for i in range(8)]

    async def go() -> tuple[list[list[Event]], list[list[Event]]]:
        engine = engine_of(model)
        made = await make_context(engine, ctx_tokens)
        together = await asyncio.gather(*(collect(engine.add_request(t, greedy(10), context_id=made.context_id))
                                          for t in tails))
        alone = [await collect(engine.add_request(t, greedy(10), context_id=made.context_id)) for t in tails]
        engine.delete_context(made.context_id)
        await asyncio.sleep(0.05)
        assert engine.stats().cache_bytes_in_use == 0
        await engine.shutdown()
        return together, alone

    together, alone = asyncio.run(go())
    pool_page = model.cache_bytes(128) - model.cache_bytes(64)
    for t, a, tail in zip(together, alone, tails, strict=True):
        assert tokens_of(t) == tokens_of(a) == reference(model, ctx_tokens, tail, 10)
        # its own pages only: the two full pages of the context are shared
        own = model.cache_bytes(150 + len(tail) + 10) - 2 * pool_page
        assert finish_of(t).peak_cache_bytes == own


def test_delete_and_expiry_free_every_byte_once_running_forks_finish(model: ReformerLM) -> None:
    ctx_tokens = prompt(70, seed=6)

    async def go() -> None:
        engine = engine_of(model)
        made = await make_context(engine, ctx_tokens)
        pinned = engine.stats().cache_bytes_in_use
        assert pinned == made.cache_bytes and engine.stats().extra["contexts"] == 1
        stream = engine.add_request(prompt(3), greedy(40), context_id=made.context_id)
        first = await stream.__anext__()
        assert isinstance(first, TokenEvent)
        assert engine.delete_context(made.context_id) == 1  # one request still generating on it
        with pytest.raises(ContextNotFoundError):
            engine.add_request(prompt(3), greedy(4), context_id=made.context_id)
        assert engine.list_contexts() == []
        assert engine.stats().extra["context_cache_bytes"] == made.cache_bytes  # held by the running fork
        rest = await collect(stream)
        assert finish_of(rest).finish_reason is FinishReason.LENGTH
        await asyncio.sleep(0.05)
        assert engine.stats().cache_bytes_in_use == 0 and engine._pool.pages_in_use == 0
        assert engine.stats().extra["context_cache_bytes"] == 0

        # TTL: expires while a fork runs; the fork finishes, then everything is free
        made = await make_context(engine, ctx_tokens, ttl_s=0.3)
        info = engine.list_contexts()
        assert [c.context_id for c in info] == [made.context_id] and 0 < info[0].expires_in_s <= 0.3
        # each decode step takes >= 5 ms: the fork's 150 tokens outlast the TTL
        engine.fault_hook = lambda phase, rid: time.sleep(0.005) if phase == "decode" else None
        stream = engine.add_request(prompt(3), greedy(150), context_id=made.context_id)
        await asyncio.sleep(0.4)
        with pytest.raises(ContextNotFoundError):
            engine.add_request([], greedy(4), context_id=made.context_id)
        assert not stream.finished and engine.stats().extra["context_cache_bytes"] == made.cache_bytes
        assert finish_of(await collect(stream)).generated_tokens == 150
        engine.fault_hook = None
        made = await make_context(engine, ctx_tokens, ttl_s=0.1)  # expiry of an idle engine
        await asyncio.sleep(0.3)
        assert engine.list_contexts() == []
        assert engine.stats().cache_bytes_in_use == 0 and engine._pool.pages_in_use == 0
        await engine.shutdown()

    asyncio.run(go())


def test_context_errors_unknown_other_owner_disabled_cap_ttl_and_length(model: ReformerLM) -> None:
    async def go() -> None:
        engine = engine_of(model, context_memory_bytes=model.cache_bytes(100))
        made = await make_context(engine, prompt(60), owner="a")
        for cid, owner in (("ctx-nope", "a"), (made.context_id, "b")):
            with pytest.raises(ContextNotFoundError):
                engine.add_request([5], greedy(2), context_id=cid, owner=owner)
            with pytest.raises(ContextNotFoundError):
                engine.delete_context(cid, owner)
        assert engine.list_contexts("b") == []
        with pytest.raises(OverloadedError, match="context memory"):  # the cap (RESOURCE_EXHAUSTED)
            engine.create_context(prompt(60), owner="a")
        with pytest.raises(InvalidRequestError, match="ttl"):
            engine.create_context(prompt(3), ttl_s=1e9)
        with pytest.raises(InvalidRequestError, match="ttl"):
            engine.create_context(prompt(3), ttl_s=0)
        with pytest.raises(InvalidRequestError, match="max_new_tokens"):
            engine.add_request(prompt(100), greedy(100), context_id=made.context_id, owner="a")
        await engine.shutdown()
        off = engine_of(model, context_memory_bytes=0)
        with pytest.raises(ContextsDisabledError):
            off.create_context(prompt(3))
        await off.shutdown()

    asyncio.run(go())


def test_cancelling_create_context_frees_its_bytes(model: ReformerLM) -> None:
    async def go() -> None:
        engine = engine_of(model, prefill_chunk_tokens=8)
        stream = engine.create_context(prompt(200, seed=9))
        ev = await stream.__anext__()
        assert isinstance(ev, PrefillProgress)  # a long prompt reports progress, as Generate does
        engine.abort(stream.request_id)
        events = await collect(stream)
        assert finish_of(events).finish_reason is FinishReason.ABORTED
        assert not any(isinstance(e, ContextCreated) for e in events)
        await asyncio.sleep(0.05)
        assert engine.stats().cache_bytes_in_use == 0 and engine._pool.pages_in_use == 0
        assert engine._contexts.reserved == 0 and engine.list_contexts() == []
        await engine.shutdown()

    asyncio.run(go())


def test_automatic_reuse_hits_and_misses_are_counted_in_prompt_tokens(model: ReformerLM) -> None:
    ctx_tokens = prompt(40, seed=11)
    tail = prompt(5, seed=12)

    async def go() -> None:
        engine = engine_of(model)
        made = await make_context(engine, ctx_tokens, owner="a")
        hit = await collect(engine.add_request(ctx_tokens + tail, greedy(6), owner="a"))
        assert finish_of(hit).cached_tokens == 40
        assert tokens_of(hit) == reference(model, ctx_tokens, tail, 6)
        same = await collect(engine.add_request(ctx_tokens, greedy(6), owner="a"))  # the whole context
        assert tokens_of(same) == reference(model, ctx_tokens, [], 6)
        miss = await collect(engine.add_request(ctx_tokens[:-1] + tail, greedy(6), owner="a"))
        other = await collect(engine.add_request(ctx_tokens + tail, greedy(6), owner="b"))  # not b's context
        assert finish_of(miss).cached_tokens == finish_of(other).cached_tokens == 0
        x = engine.stats().extra
        assert x["prefix_cache_queries"] == 45 + 40 + 44 + 45
        assert x["prefix_cache_hits"] == 40 + 40
        engine.delete_context(made.context_id, "a")
        await engine.shutdown()
        off = engine_of(model, prefix_caching=False)
        made = await make_context(off, ctx_tokens, owner="a")
        plain = await collect(off.add_request(ctx_tokens + tail, greedy(6), owner="a"))
        assert finish_of(plain).cached_tokens == 0 and off.stats().extra["prefix_cache_queries"] == 0
        await off.shutdown()

    asyncio.run(go())


def test_identical_concurrent_prompts_share_one_prefill(model: ReformerLM) -> None:
    p = prompt(90, seed=13)

    async def go() -> tuple[list[list[Event]], Engine]:
        engine = engine_of(model, prefill_chunk_tokens=64)
        streams = [engine.add_request(p, greedy(8)) for _ in range(4)]
        out = await asyncio.gather(*(collect(s) for s in streams))
        await asyncio.sleep(0.05)
        assert engine.stats().cache_bytes_in_use == 0 and engine._pool.pages_in_use == 0
        await engine.shutdown()
        return out, engine

    out, engine = asyncio.run(go())
    ref = list(generate(model, p, 8, temperature=0.0))
    assert all(tokens_of(o) == ref for o in out)
    assert engine.stats().prefill_tokens_total == 90  # one prefill for all four
    assert engine.stats().extra["prefix_cache_hits"] == 3 * 90
    assert sum(finish_of(o).cached_tokens for o in out) == 3 * 90


def test_context_survives_time_and_lists_oldest_first(model: ReformerLM) -> None:
    async def go() -> None:
        engine = engine_of(model)
        a = await make_context(engine, prompt(10, seed=1), owner="o")
        time.sleep(0.01)
        b = await make_context(engine, prompt(12, seed=2), owner="o")
        assert [c.context_id for c in engine.list_contexts("o")] == [a.context_id, b.context_id]
        assert engine.stats().cache_bytes_in_use == a.cache_bytes + b.cache_bytes
        await engine.shutdown()
        assert engine._pool.pages_in_use == 0

    asyncio.run(go())


def test_a_prompt_longer_than_the_delta_after_a_context_runs_in_several_passes(model: ReformerLM) -> None:
    """150 prompt tokens after a context: passes of what each delta has room for, merged in between (the
    fork copies the shared pages then); still the library reference, and every byte back after."""
    ctx_tokens = prompt(70, seed=21)
    tail = prompt(150, seed=22)

    async def go() -> list[list[Event]]:
        engine = engine_of(model)
        made = await make_context(engine, ctx_tokens)
        out = await asyncio.gather(*(collect(engine.add_request(t, greedy(8), context_id=made.context_id))
                                     for t in (tail, tail[:5])))
        # automatic reuse only when the rest is at most half the context
        await collect(engine.add_request(ctx_tokens + tail, greedy(2)))
        assert engine.stats().extra["prefix_cache_hits"] == 0
        engine.delete_context(made.context_id)
        await asyncio.sleep(0.05)
        assert engine.stats().cache_bytes_in_use == 0 and engine._pool.pages_in_use == 0
        await engine.shutdown()
        return out

    long, short = asyncio.run(go())
    assert tokens_of(long) == reference(model, ctx_tokens, tail, 8)
    assert tokens_of(short) == reference(model, ctx_tokens, tail[:5], 8)
