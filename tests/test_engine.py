"""Continuous-batching engine on a tiny random ReformerLM (CPU, seconds)."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest
import torch

from reformer_infer.cache import ReformerCache
from reformer_infer.config import ReformerConfig
from reformer_infer.engine import Engine, EngineConfig, RequestStream
from reformer_infer.generation import generate
from reformer_infer.model import ReformerLM
from reformer_infer.requests import (
    EngineStoppedError,
    Event,
    FinishEvent,
    FinishReason,
    InvalidRequestError,
    OverloadedError,
    PrefillProgress,
    SamplingParams,
    TokenEvent,
)

T = TypeVar("T")


@pytest.fixture(scope="module")
def model() -> ReformerLM:
    torch.manual_seed(0)
    cfg = ReformerConfig(
        attn_layers=["local", "lsh", "local", "lsh"],
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=64,
        lsh_attn_chunk_length=4,
        local_attn_chunk_length=8,
        num_buckets=4,
        num_hashes=2,
        vocab_size=258,
        axial_pos_shape=[16, 16],
        axial_pos_embds_dim=[16, 16],
        max_position_embeddings=256,
    )
    return ReformerLM(cfg).eval()


def run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(make())


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 258) for _ in range(n)]


async def collect(stream: RequestStream) -> list[Event]:
    return [ev async for ev in stream]


def tokens_of(events: Sequence[Event]) -> list[int]:
    return [t for ev in events if isinstance(ev, TokenEvent) for t in ev.token_ids]


def text_of(events: Sequence[Event]) -> str:
    text = "".join(ev.text for ev in events if isinstance(ev, TokenEvent))
    return text + (events[-1].text if isinstance(events[-1], FinishEvent) else "")


def finish_of(events: Sequence[Event]) -> FinishEvent:
    assert isinstance(events[-1], FinishEvent), events[-1]
    assert sum(isinstance(ev, FinishEvent) for ev in events) == 1
    return events[-1]


def greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_batched_decode_step_equals_each_sequence_decoded_alone(model: ReformerLM) -> None:
    lengths = [3, 9, 17, 30]
    prompts = [prompt(n, seed=n) for n in lengths]
    alone, batched = [], []
    for p in prompts:
        _, c = model.prefill(torch.tensor([p]))
        alone.append(c)
        _, c = model.prefill(torch.tensor([p]))
        batched.append(c)
    steps = 6
    for s in range(steps):
        ids = [[(7 * s + i) % 250 + 3] for i in range(len(prompts))]
        solo = [model.decode_step(torch.tensor([row]), c)[0][0, 0] for row, c in zip(ids, alone, strict=True)]
        together, _ = model.decode_step(torch.tensor(ids), ReformerCache.batch(batched))
        for i in range(len(prompts)):
            torch.testing.assert_close(together[i, 0], solo[i], atol=1e-5, rtol=1e-5)
    assert ReformerCache.batch(batched).lengths == [n + steps for n in lengths]


def test_engine_greedy_streams_equal_generate_alone(model: ReformerLM) -> None:
    prompts = [prompt(n, seed=n) for n in (5, 12, 31, 44, 70, 9)]

    async def go() -> list[list[Event]]:
        engine = Engine(model, EngineConfig(max_batch=4, prefill_chunk_tokens=32))
        engine.start()
        streams = [engine.add_request(p, greedy(12)) for p in prompts]
        out = await asyncio.gather(*(collect(s) for s in streams))
        assert engine.stats().cache_bytes_in_use == 0
        await engine.shutdown()
        return out

    results = run(go)
    for p, events in zip(prompts, results, strict=True):
        assert finish_of(events).finish_reason is FinishReason.LENGTH
        assert tokens_of(events) == list(generate(model, p, 12, temperature=0.0))


def test_seeded_sampling_is_independent_of_batch_composition(model: ReformerLM) -> None:
    target = prompt(20, seed=1)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)

    async def go(with_others: bool) -> list[int]:
        engine = Engine(model, EngineConfig(max_batch=8, prefill_chunk_tokens=16))
        engine.start()
        others = []
        if with_others:
            for i in range(5):
                others.append(
                    engine.add_request(
                        prompt(7 + 9 * i, seed=50 + i),
                        SamplingParams(
                            max_new_tokens=5 + 3 * i, temperature=0.7 + 0.1 * i, top_p=0.9, seed=i
                        ),
                    )
                )
        stream = engine.add_request(target, params)
        events, *_ = await asyncio.gather(collect(stream), *(collect(o) for o in others))
        await engine.shutdown()
        return tokens_of(events)

    alone = run(lambda: go(False))
    assert len(alone) == 16
    assert run(lambda: go(True)) == alone
    assert list(generate(model, target, 16, temperature=1.0, top_k=50, seed=1234)) == alone


def test_64_concurrent_requests_with_random_aborts_leave_nothing_behind(model: ReformerLM) -> None:
    threads_before = threading.active_count()

    async def go() -> None:
        engine = Engine(model, EngineConfig(max_batch=16, max_queue=64, prefill_chunk_tokens=24))
        engine.start()
        rng = random.Random(7)
        streams = [
            engine.add_request(
                prompt(rng.randint(1, 60), seed=i), SamplingParams(max_new_tokens=rng.randint(1, 20))
            )
            for i in range(64)
        ]
        to_abort = rng.sample(streams, 24)

        async def aborter() -> None:
            for s in to_abort:
                await asyncio.sleep(rng.random() * 0.01)
                engine.abort(s.request_id)

        results = await asyncio.gather(*(collect(s) for s in streams), aborter())
        for events in results[:64]:
            fin = finish_of(events)
            assert fin.finish_reason in (FinishReason.LENGTH, FinishReason.EOS, FinishReason.ABORTED)
        reasons = [finish_of(ev).finish_reason for ev in results[:64]]
        assert reasons.count(FinishReason.ABORTED) >= 1
        stats = engine.stats()
        assert stats.alive
        assert stats.cache_bytes_in_use == 0
        assert stats.extra["cache_bytes_allocated"] == 0
        assert stats.running == 0 and stats.waiting == 0
        await engine.shutdown()
        assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()
        # every slot and page of the shared decode pool came back (aborted prefills' reserved runs included)
        assert engine._pool.slots_in_use == 0 and engine._pool.pages_in_use == 0

    run(go)
    assert threading.active_count() == threads_before


def test_abort_in_every_state_finishes_with_aborted_and_frees_bytes(model: ReformerLM) -> None:
    async def go() -> None:
        engine = Engine(model, EngineConfig(max_batch=2, prefill_chunk_tokens=8))
        engine.start()
        decoding = engine.add_request(prompt(5), SamplingParams(max_new_tokens=200))
        prefilling = engine.add_request(prompt(200, seed=3), SamplingParams(max_new_tokens=10))
        waiting = engine.add_request(prompt(5, seed=4), SamplingParams(max_new_tokens=10))
        first = await decoding.__anext__()
        assert isinstance(first, TokenEvent)
        progress = await prefilling.__anext__()
        assert isinstance(progress, PrefillProgress) and progress.done_tokens < progress.total_tokens == 200
        assert engine.stats().waiting == 1
        for s in (waiting, prefilling, decoding):
            engine.abort(s.request_id)
            engine.abort(s.request_id)  # idempotent
        for s in (waiting, prefilling, decoding):
            assert finish_of(await collect(s)).finish_reason is FinishReason.ABORTED
        stats = engine.stats()
        assert stats.cache_bytes_in_use == 0 and stats.running == 0 and stats.waiting == 0
        engine.abort("unknown-id")
        await engine.shutdown()

    run(go)


def test_out_of_memory_in_one_prefill_fails_only_that_request(model: ReformerLM) -> None:
    async def go() -> None:
        engine = Engine(model, EngineConfig(max_batch=4, prefill_chunk_tokens=16))
        calls = []

        def hook(phase: str, request_id: str | None) -> None:
            calls.append(phase)
            if phase == "prefill" and request_id == "victim":
                raise torch.OutOfMemoryError("injected: CUDA out of memory")

        engine.fault_hook = hook
        engine.start()
        others = [engine.add_request(prompt(10 + i, seed=i), greedy(8)) for i in range(3)]
        victim = engine.add_request(prompt(40, seed=9), greedy(8), request_id="victim")
        results = await asyncio.gather(collect(victim), *(collect(s) for s in others))
        fin = finish_of(results[0])
        assert fin.finish_reason is FinishReason.ERROR and fin.error_kind == "oom"
        assert "out of memory" in (fin.error or "")
        for p_seed, events in enumerate(results[1:]):
            assert finish_of(events).finish_reason is FinishReason.LENGTH
            assert tokens_of(events) == list(
                generate(model, prompt(10 + p_seed, seed=p_seed), 8, temperature=0.0)
            )
        stats = engine.stats()
        assert stats.alive and stats.cache_bytes_in_use == 0
        # The engine keeps serving after the contained failure.
        after = await collect(engine.add_request(prompt(6), greedy(3)))
        assert finish_of(after).finish_reason is FinishReason.LENGTH
        await engine.shutdown()

    run(go)


def test_repeated_step_failures_fail_all_requests_and_mark_engine_dead(model: ReformerLM) -> None:
    async def go() -> None:
        engine = Engine(model, EngineConfig(max_batch=2, prefill_chunk_tokens=16, max_step_failures=3))
        steps = 0

        def hook(phase: str, request_id: str | None) -> None:
            nonlocal steps
            if phase == "step":
                steps += 1
                if steps >= 5:  # every step from the fifth on: a broken device
                    raise RuntimeError("injected loop failure")

        engine.fault_hook = hook
        engine.start()
        streams = [engine.add_request(prompt(8, seed=i), greedy(50)) for i in range(4)]
        for events in await asyncio.gather(*(collect(s) for s in streams)):
            fin = finish_of(events)
            assert fin.finish_reason is FinishReason.ERROR and fin.error_kind == "internal"
            assert "injected loop failure" in (fin.error or "")
        stats = engine.stats()
        assert not stats.alive and stats.cache_bytes_in_use == 0
        assert steps == 4 + 3 and stats.extra["step_failures_total"] == 3
        with pytest.raises(EngineStoppedError):
            engine.add_request(prompt(3), greedy(2))
        await engine.shutdown()

    run(go)


def test_a_failed_step_or_decode_fails_only_its_requests_and_the_engine_keeps_serving(model: ReformerLM) -> None:
    """A step that raises once is retried; a decode step that raises fails the requests it was decoding
    (INTERNAL, state released) and nothing else; the engine stays alive and serves greedy tokens equal to
    the library's."""

    async def go() -> None:
        engine = Engine(model, EngineConfig(max_batch=4, prefill_chunk_tokens=16, max_step_failures=2))
        steps = 0
        poisoned = {"victim"}

        def hook(phase: str, request_id: str | None) -> None:
            nonlocal steps
            if phase == "step":
                steps += 1
                if steps == 3:
                    raise RuntimeError("injected one-off step failure")
            if phase == "decode" and request_id in poisoned:
                poisoned.discard(request_id)  # once: the next step succeeds, so the count starts again
                raise RuntimeError("injected decode bug")

        engine.fault_hook = hook
        engine.start()
        victim = await collect(engine.add_request(prompt(9, seed=9), greedy(20), request_id="victim"))
        fin = finish_of(victim)
        assert fin.finish_reason is FinishReason.ERROR and fin.error_kind == "internal"
        assert "decode step failed: RuntimeError: injected decode bug" in (fin.error or "")
        streams = [engine.add_request(prompt(10 + i, seed=i), greedy(8)) for i in range(3)]
        poisoned.add("late-victim")
        late = engine.add_request(prompt(5, seed=5), greedy(8), request_id="late-victim")
        results = await asyncio.gather(*(collect(s) for s in streams), collect(late))
        # the late victim's decode step failed, and with it whoever shared that batch; the rest are untouched
        assert finish_of(results[-1]).error_kind == "internal"
        for seed, events in enumerate(results[:-1]):
            fin = finish_of(events)
            if fin.finish_reason is FinishReason.ERROR:
                assert "injected decode bug" in (fin.error or "")
            else:
                assert tokens_of(events) == list(generate(model, prompt(10 + seed, seed=seed), 8, temperature=0.0))
        stats = engine.stats()
        assert stats.alive and stats.cache_bytes_in_use == 0 and stats.extra["cache_bytes_allocated"] == 0
        assert stats.extra["step_failures_total"] >= 2
        for seed in range(3):
            again = await collect(engine.add_request(prompt(10 + seed, seed=seed), greedy(8)))
            assert finish_of(again).finish_reason is FinishReason.LENGTH
            assert tokens_of(again) == list(generate(model, prompt(10 + seed, seed=seed), 8, temperature=0.0))
        await engine.shutdown()

    run(go)


def test_stop_strings_end_generation_without_leaking_a_partial_match(model: ReformerLM) -> None:
    p = [b + 2 for b in b"The quick brown fox "]
    full = list(generate(model, p, 40, temperature=0.0))
    full_text = bytes(t - 2 for t in full if t > 2).decode("utf-8", errors="replace")
    stop = full_text[10:13]
    cut = full_text.find(stop)

    async def go() -> list[Event]:
        engine = Engine(model, EngineConfig(prefill_chunk_tokens=64, stream_buffer_events=1000))
        engine.start()
        events = await collect(engine.add_request(p, greedy(40, stop=(stop, "never-matches-xyz"))))
        await engine.shutdown()
        return events

    events = run(go)
    assert finish_of(events).finish_reason is FinishReason.STOP
    released = ""
    for ev in events:
        if isinstance(ev, TokenEvent):
            released += ev.text
            assert stop not in released
            # Released text is always a prefix of the text before the stop string: nothing is retracted.
            assert full_text[:cut].startswith(released)
    assert text_of(events) == full_text[:cut]


def test_stop_token_and_eos_end_generation_without_being_emitted(model: ReformerLM) -> None:
    p = prompt(15, seed=5)
    full = list(generate(model, p, 20, temperature=0.0))
    stop_tok = full[6]
    k = full.index(stop_tok)

    async def go(params: SamplingParams) -> list[Event]:
        engine = Engine(model, EngineConfig())
        engine.start()
        events = await collect(engine.add_request(p, params))
        await engine.shutdown()
        return events

    events = run(lambda: go(greedy(20, stop_token_ids=(stop_tok,))))
    assert finish_of(events).finish_reason is FinishReason.STOP
    assert tokens_of(events) == full[:k]
    assert finish_of(events).generated_tokens == k


def test_long_prompt_is_prefilled_in_chunks_while_running_streams_keep_decoding(model: ReformerLM) -> None:
    async def go() -> list[tuple[str, Event]]:
        engine = Engine(model, EngineConfig(max_batch=4, prefill_chunk_tokens=16))
        engine.start()
        order: list[tuple[str, Event]] = []

        async def consume(name: str, stream: RequestStream) -> None:
            async for ev in stream:
                order.append((name, ev))

        running = engine.add_request(prompt(4), greedy(150))
        first = await running.__anext__()
        order.append(("run", first))
        long = engine.add_request(prompt(240, seed=2), greedy(2))
        await asyncio.gather(consume("run", running), consume("long", long))
        fin = finish_of([ev for name, ev in order if name == "long"])
        assert fin.prefill_time_s > 0 and fin.first_token_time_s >= fin.prefill_time_s
        await engine.shutdown()
        return order

    order = run(go)
    progress_idx = [i for i, (name, ev) in enumerate(order) if isinstance(ev, PrefillProgress)]
    assert len(progress_idx) >= 5
    done = [order[i][1].done_tokens for i in progress_idx]  # type: ignore[union-attr]
    assert done == sorted(done) and all(0 < d <= 240 for d in done)
    tokens_during = [
        i for i, (name, ev) in enumerate(order) if name == "run" and progress_idx[0] < i < progress_idx[-1]
    ]
    # Decode steps interleave with prefill chunks: the running stream got tokens between progress events.
    assert len(tokens_during) >= len(progress_idx) // 2


def test_slow_consumer_gets_coalesced_events_and_never_stalls_the_engine(model: ReformerLM) -> None:
    async def go() -> None:
        engine = Engine(model, EngineConfig(max_batch=4, stream_buffer_events=4))
        engine.start()
        slow = engine.add_request(prompt(6), greedy(60))
        fast = engine.add_request(prompt(7, seed=1), greedy(60))
        fast_events = await collect(fast)  # the slow stream is not read at all meanwhile
        assert finish_of(fast_events).finish_reason is FinishReason.LENGTH
        for _ in range(200):
            if slow.finished:
                break
            await asyncio.sleep(0.01)
        assert slow.finished  # generation finished although nobody read the stream
        slow_events = await collect(slow)
        assert len(slow_events) <= 5
        assert tokens_of(slow_events) == list(generate(model, prompt(6), 60, temperature=0.0))
        await engine.shutdown()

    run(go)


def test_stream_interval_hands_tokens_over_in_groups_after_the_first() -> None:
    async def go() -> None:
        stream = RequestStream("r", asyncio.get_running_loop(), max_events=64, interval=3)

        def tok(t: int) -> TokenEvent:
            return TokenEvent("r", (t,), chr(96 + t), ())

        stream.put(tok(1))
        first = await asyncio.wait_for(stream.__anext__(), 5)
        assert first.token_ids == (1,)  # the first token goes at once
        taking = asyncio.ensure_future(stream.__anext__())
        for t in (2, 3):
            stream.put(tok(t))
            await asyncio.sleep(0.02)
            assert not taking.done()  # fewer than 3 tokens wait: the consumer is not woken
        stream.put(tok(4))
        group = await asyncio.wait_for(taking, 5)
        assert (group.token_ids, group.text) == ((2, 3, 4), "bcd")
        stream.put(tok(5))
        stream.put(FinishEvent(request_id="r", finish_reason=FinishReason.LENGTH, prompt_tokens=1,
                               generated_tokens=5))
        rest = [e async for e in stream]  # the finish flushes the tokens before it
        assert [type(e) for e in rest] == [TokenEvent, FinishEvent] and rest[0].token_ids == (5,)
        with pytest.raises(ValueError):
            RequestStream("r", asyncio.get_running_loop(), max_events=64, interval=0)

    run(go)


def test_engine_stream_interval_keeps_every_token(model: ReformerLM) -> None:
    async def go() -> None:
        engine = Engine(model, EngineConfig(max_batch=2, stream_interval=4))
        engine.start()
        events = await collect(engine.add_request(prompt(6), greedy(30)))
        counts = [len(e.token_ids) for e in events if isinstance(e, TokenEvent)]
        # the first event carries the first token, plus any that waited while the consumer was busy (timing:
        # the test above checks the first token alone deterministically); then >= 4 an event but the last
        assert counts[0] >= 1 and all(c >= 4 for c in counts[1:-1]) and counts[-1] >= 1
        assert len(counts) <= 1 + -(-29 // 4)
        assert tokens_of(events) == list(generate(model, prompt(6), 30, temperature=0.0))
        assert finish_of(events).finish_reason is FinishReason.LENGTH
        await engine.shutdown()
        with pytest.raises(ValueError):
            Engine(model, EngineConfig(stream_interval=0))

    run(go)


def test_add_request_rejects_bad_impossible_and_overflowing_requests(model: ReformerLM) -> None:
    async def go() -> None:
        engine = Engine(
            model, EngineConfig(max_batch=1, max_queue=1, cache_memory_bytes=model.cache_bytes(100))
        )
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request(prompt(250), SamplingParams(max_new_tokens=10))
        assert e.value.field == "max_new_tokens" and "256" in str(e.value)
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request(prompt(50), SamplingParams(max_new_tokens=100))
        assert "whole cache budget" in str(e.value)
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request([], SamplingParams())
        assert e.value.field == "prompt"
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request(prompt(3), SamplingParams(temperature=-1))
        assert e.value.field == "temperature"
        # Not started: the first request waits, the second overflows the queue of one.
        a = engine.add_request(prompt(3), greedy(2), request_id="a")
        with pytest.raises(InvalidRequestError, match="already in use"):
            engine.add_request(prompt(3), greedy(2), request_id="a")
        with pytest.raises(OverloadedError):
            engine.add_request(prompt(3), greedy(2))
        engine.start()
        assert finish_of(await collect(a)).finish_reason is FinishReason.LENGTH
        await engine.shutdown()

    run(go)


def test_shutdown_drains_running_requests_then_refuses_new_ones(model: ReformerLM) -> None:
    async def go() -> None:
        engine = Engine(model, EngineConfig(max_batch=2))
        engine.start()
        streams = [engine.add_request(prompt(5, seed=i), greedy(20)) for i in range(3)]
        gathering = asyncio.gather(*(collect(s) for s in streams))
        await engine.shutdown(drain=True, timeout=30.0)
        for events in await gathering:
            assert finish_of(events).finish_reason is FinishReason.LENGTH
        with pytest.raises(EngineStoppedError):
            engine.add_request(prompt(3), greedy(2))

    run(go)


def test_shutdown_without_drain_aborts_everything(model: ReformerLM) -> None:
    async def go() -> None:
        engine = Engine(model, EngineConfig(max_batch=1))
        engine.start()
        streams = [engine.add_request(prompt(5, seed=i), greedy(200)) for i in range(3)]
        await streams[0].__anext__()
        await engine.shutdown(drain=False)
        for s in streams:
            assert finish_of(await collect(s)).finish_reason is FinishReason.ABORTED
        assert engine.stats().cache_bytes_in_use == 0

    run(go)


def test_finish_event_reports_timings_peak_cache_and_logprobs(model: ReformerLM) -> None:
    async def go() -> list[Event]:
        engine = Engine(model, EngineConfig())
        engine.start()
        events = await collect(engine.add_request(prompt(30), greedy(5, logprobs=3)))
        stats = engine.stats()
        assert stats.decode_tokens_total == 4 and stats.prefill_tokens_total == 30 and stats.steps_total >= 5
        await engine.shutdown()
        return events

    events = run(go)
    fin = finish_of(events)
    assert fin.prompt_tokens == 30 and fin.generated_tokens == 5
    assert 0 <= fin.queue_time_s <= fin.first_token_time_s <= fin.total_time_s
    assert 0 < fin.peak_cache_bytes <= model.cache_bytes(35)
    lps = [lp for ev in events if isinstance(ev, TokenEvent) for lp in ev.logprobs]
    assert len(lps) == 5 and all(len(lp.top) == 3 and lp.top[0][0] == lp.token_id for lp in lps)


def test_max_time_limit_finishes_request_with_timeout(model: ReformerLM) -> None:
    async def go() -> FinishEvent:
        engine = Engine(model, EngineConfig())
        engine.start()
        events = await collect(engine.add_request(prompt(5), greedy(250, max_time_s=0.05)))
        await engine.shutdown()
        return finish_of(events)

    fin = run(go)
    assert fin.finish_reason is FinishReason.ERROR and fin.error_kind == "timeout"


def test_prompt_whose_padded_prefill_passes_the_context_is_rejected_up_front(model: ReformerLM) -> None:
    async def go() -> None:
        engine = Engine(model, EngineConfig(max_context=250))  # chunk lengths 4/8: prompts pad to x8
        assert engine.max_context == 250
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request(prompt(249), SamplingParams(max_new_tokens=1))  # pads to 256
        assert e.value.field == "prompt" and "padded to 256" in str(e.value)
        ok = engine.add_request(prompt(245), greedy(1))  # pads to 248
        engine.start()
        assert finish_of(await collect(ok)).finish_reason is FinishReason.LENGTH
        await engine.shutdown()

    run(go)


def test_generate_is_seed_reproducible_and_stops_before_a_stop_id(model: ReformerLM) -> None:
    p = prompt(12, seed=11)
    a = list(generate(model, p, 20, temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=5))
    b = list(generate(model, p, 20, temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=5))
    assert a == b and len(a) == 20
    assert list(generate(model, p, 20, temperature=0.9, seed=6)) != list(
        generate(model, p, 20, temperature=0.9, seed=7)
    )
    full = list(generate(model, p, 20, temperature=0.0))
    k = full.index(full[4])
    assert list(generate(model, p, 20, temperature=0.0, stop_ids=(full[4],))) == full[:k]
    with pytest.raises(InvalidRequestError):
        list(generate(model, p, 0))
    with pytest.raises(InvalidRequestError, match="context of 256"):
        list(generate(model, p, 250))


def test_burst_of_short_prompts_is_prefilled_within_one_step_budget(model: ReformerLM) -> None:
    async def go() -> int:
        engine = Engine(model, EngineConfig(max_batch=8, prefill_chunk_tokens=100_000))
        streams = [engine.add_request(prompt(6, seed=i), greedy(3)) for i in range(8)]
        engine.start()
        for events in await asyncio.gather(*(collect(s) for s in streams)):
            assert len(tokens_of(events)) == 3
        steps = engine.stats().steps_total
        await engine.shutdown()
        return steps

    # One step prefills all eight prompts (first tokens), two batched decode steps give the rest.
    assert run(go) <= 4


def test_equal_length_burst_is_prefilled_in_one_batched_pass_with_the_same_results(
    model: ReformerLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts of one length that arrive while nothing decodes share one prefill pass; each request keeps
    its own budget, seed and result, and an abort during the pass gives its cache back."""
    prompts = [prompt(9, seed=i) for i in range(5)] + [prompt(14, seed=9)]
    budgets = [4, 6, 8, 5, 7, 6]
    batches: list[int] = []
    prefill_iter = model.prefill_iter

    def counting(ids: torch.Tensor, **kw: Any) -> Any:
        batches.append(ids.shape[0])
        return prefill_iter(ids, **kw)

    async def go() -> list[list[Event]]:
        engine = Engine(model, EngineConfig(max_batch=8, prefill_chunk_tokens=64))
        aborted = engine.add_request(prompt(9, seed=20), greedy(5), request_id="gone")
        streams = [
            engine.add_request(p, SamplingParams(max_new_tokens=n, temperature=0.8, seed=i, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts, budgets, strict=True))
        ]
        engine.fault_hook = lambda phase, rid: engine.abort("gone") if rid == "gone" else None
        engine.start()
        out = await asyncio.gather(*(collect(s) for s in streams))
        assert finish_of(await collect(aborted)).finish_reason is FinishReason.ABORTED
        assert engine.stats().cache_bytes_in_use == 0
        await engine.shutdown()  # the last step's own references to finished sequences are gone after it
        assert engine._pool.slots_in_use == 0 and engine._pool.pages_in_use == 0
        return out

    monkeypatch.setattr(model, "prefill_iter", counting)
    results = run(go)
    assert batches[0] == 6  # the five 9-token prompts and the aborted one; the 14-token prompt alone
    for i, (p, n, events) in enumerate(zip(prompts, budgets, results, strict=True)):
        assert finish_of(events).finish_reason is FinishReason.LENGTH
        assert tokens_of(events) == list(generate(model, p, n, temperature=0.8, seed=i))


def test_a_failure_applying_one_requests_token_fails_only_that_request(model: ReformerLM) -> None:
    async def go() -> list[list[Event]]:
        engine = Engine(model, EngineConfig(max_batch=4, prefill_chunk_tokens=64))
        seen = 0

        def hook(phase: str, request_id: str | None) -> None:
            nonlocal seen
            if phase == "update" and request_id == "victim":
                seen += 1
                if seen == 3:  # its third token: detokenising / stop matching of that request raised
                    raise UnicodeError("injected: broken detokenizer state")

        engine.fault_hook = hook
        engine.start()
        streams = [engine.add_request(prompt(12, seed=i), greedy(6)) for i in range(2)]
        streams.append(engine.add_request(prompt(12, seed=7), greedy(6), request_id="victim"))
        out = await asyncio.gather(*(collect(s) for s in streams))
        stats = engine.stats()
        assert stats.alive and stats.cache_bytes_in_use == 0 and stats.extra["step_failures_total"] == 0
        await engine.shutdown()
        return out

    *others, victim = run(go)
    fin = finish_of(victim)
    assert fin.finish_reason is FinishReason.ERROR and fin.error_kind == "internal"
    assert fin.error == "UnicodeError: injected: broken detokenizer state" and fin.generated_tokens == 2
    for seed, events in enumerate(others):
        assert tokens_of(events) == list(generate(model, prompt(12, seed=seed), 6, temperature=0.0))


def test_failure_in_a_batched_prefill_fails_only_its_request(model: ReformerLM) -> None:
    async def go() -> list[list[Event]]:
        engine = Engine(model, EngineConfig(max_batch=4, prefill_chunk_tokens=64))

        def hook(phase: str, request_id: str | None) -> None:
            if phase == "prefill" and request_id == "victim":
                raise torch.OutOfMemoryError("injected: out of memory")

        engine.fault_hook = hook
        streams = [engine.add_request(prompt(12, seed=i), greedy(6)) for i in range(3)]
        streams.insert(1, engine.add_request(prompt(12, seed=7), greedy(6), request_id="victim"))
        engine.start()
        out = await asyncio.gather(*(collect(s) for s in streams))
        assert engine.stats().cache_bytes_in_use == 0
        await engine.shutdown()
        return out

    victim, *others = (lambda r: [r[1], r[0], r[2], r[3]])(run(go))
    fin = finish_of(victim)
    assert fin.finish_reason is FinishReason.ERROR and fin.error_kind == "oom"
    for seed, events in enumerate(others):
        assert tokens_of(events) == list(generate(model, prompt(12, seed=seed), 6, temperature=0.0))


def test_short_prompt_does_not_wait_behind_a_long_prefill(model: ReformerLM) -> None:
    """Every other step the prompts with the least prefill work left go first: a short prompt that arrives
    during a long prompt's chunked prefill is answered long before that prefill ends, and both results are
    the ones each gets alone."""
    long_prompt, short_prompt = prompt(200, seed=3), prompt(8, seed=4)

    async def go() -> tuple[list[Event], list[Event], list[str]]:
        engine = Engine(model, EngineConfig(max_batch=4, prefill_chunk_tokens=16))
        engine.start()
        order: list[str] = []

        async def watch(name: str, stream: RequestStream) -> list[Event]:
            events = []
            async for ev in stream:
                if isinstance(ev, (TokenEvent, FinishEvent)) and not any(
                    isinstance(e, (TokenEvent, FinishEvent)) for e in events
                ):
                    order.append(name)  # each request's first token (or finish)
                events.append(ev)
            return events

        long = engine.add_request(long_prompt, greedy(2))
        while engine.stats().prefill_tokens_total == 0:  # the long prefill is under way
            await asyncio.sleep(0.001)
        short = engine.add_request(short_prompt, greedy(3))
        long_events, short_events = await asyncio.gather(watch("long", long), watch("short", short))
        await engine.shutdown()
        return long_events, short_events, order

    long_events, short_events, order = run(go)
    assert order == ["short", "long"]
    assert any(isinstance(ev, PrefillProgress) for ev in long_events)
    assert tokens_of(short_events) == list(generate(model, short_prompt, 3, temperature=0.0))
    assert tokens_of(long_events) == list(generate(model, long_prompt, 2, temperature=0.0))


def test_events_of_one_step_wake_the_consumer_loop_once():
    """Within a held block (a decode step's token updates), events for many streams wake their loop once,
    when the block ends; outside one, the first event wakes it at once."""
    from reformer_infer.streams import _wakeups_held

    class CountingLoop:
        def __init__(self) -> None:
            self.calls: list[Callable[[], None]] = []

        def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
            self.calls.append(fn)

    async def main() -> None:
        loop = CountingLoop()
        streams = [RequestStream(f"r{i}", loop, 16) for i in range(16)]  # type: ignore[arg-type]
        event = TokenEvent("r", (5,), "x", ())
        with _wakeups_held():
            for s in streams:
                s.put(event)
            assert loop.calls == []
        assert len(loop.calls) == 1
        loop.calls.pop()()  # the loop runs the wake-up: every stream is ready
        for s in streams:
            assert await asyncio.wait_for(s.__anext__(), 1) == event
        streams[0].put(event)
        assert len(loop.calls) == 1  # not held: at once

    asyncio.run(main())


def test_a_step_does_not_start_a_prefill_unit_it_has_no_room_for(
    model: ReformerLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's prefill stops after a unit that leaves less than half of the next one in its budget: a
    pass ending on a 7-unit slice (budget 8) must not be followed by another 8-unit slice in the same
    step (which made such steps twice the others and doubled the running streams' inter-token gap)."""
    chunk = 8
    units: list[tuple[int, int]] = []  # (engine step, units) of the long prompt's prefill
    prefill_iter = model.prefill_iter
    holder: dict[str, Engine] = {}

    def recording(ids: torch.Tensor, **kw: Any) -> Any:
        gen = prefill_iter(ids, **kw)
        if ids.shape[1] != 15:
            return gen

        def wrapped() -> Any:
            prev = 0
            while True:
                try:
                    done, total = next(gen)
                except StopIteration as stop:
                    return stop.value
                units.append((holder["engine"]._steps, done - prev))
                prev = done
                yield done, total

        return wrapped()

    async def go() -> list[int]:
        engine = holder["engine"] = Engine(model, EngineConfig(max_batch=4, prefill_chunk_tokens=chunk))
        engine.start()
        running = engine.add_request(prompt(4), greedy(200))
        await running.__anext__()
        long = engine.add_request(prompt(15, seed=3), greedy(3))
        out = tokens_of(await collect(long))
        engine.abort(running.request_id)
        await collect(running)
        await engine.shutdown()
        return out

    want = list(generate(model, prompt(15, seed=3), 3, temperature=0.0))  # before the recording starts
    monkeypatch.setattr(model, "prefill_iter", recording)
    tokens = run(go)
    assert tokens == want
    per_step: dict[int, list[int]] = {}
    for step, n in units:
        per_step.setdefault(step, []).append(n)
    assert any(chunk - 1 in ns for ns in per_step.values())  # the prompt's passes do end on 7-unit slices
    for ns in per_step.values():
        assert sum(ns) <= chunk + chunk // 2, per_step


@pytest.mark.parametrize("window", [0.0, 2.0])
def test_an_idle_engine_waits_for_the_rest_of_a_burst(
    model: ReformerLM, window: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests handed over one by one, a few ms apart, while the engine is idle: with an arrival window
    they share one batched prefill; with none the first is prefilled alone (it is not held back)."""
    batches: list[int] = []  # rows of every prefill (batched or not, each goes through prefill_iter)
    prefill_iter = model.prefill_iter

    def counting(ids: torch.Tensor, **kw: Any) -> Any:
        batches.append(ids.shape[0])
        return prefill_iter(ids, **kw)

    async def go() -> list[list[Event]]:
        engine = Engine(model, EngineConfig(max_batch=8, prefill_chunk_tokens=64, arrival_window_s=window))
        engine.start()
        streams = []
        for i in range(4):
            streams.append(engine.add_request(prompt(9, seed=i), greedy(3)))
            await asyncio.sleep(0.05)  # well within a quarter of the 2 s window; long enough to start a step
        out = await asyncio.gather(*(collect(s) for s in streams))
        await engine.shutdown()
        return out

    monkeypatch.setattr(model, "prefill_iter", counting)
    results = run(go)
    if window:
        assert batches == [4]
    else:
        assert batches[0] == 1 and sum(batches) == 4
    for i, events in enumerate(results):
        assert tokens_of(events) == list(generate(model, prompt(9, seed=i), 3, temperature=0.0))


def test_overlapped_decode_steps_produce_what_sequential_steps_produce(model: ReformerLM) -> None:
    """`overlap_steps` (the decode step on a device thread while the engine applies the previous step's tokens;
    the default on CUDA) changes nothing a caller sees: the same tokens, text, logprobs and finish reasons as
    sequential steps for greedy and seeded streams that join while others decode, stop on a string, a stop id
    or their token limit (1 to 20 tokens), and a request aborted mid-stream; every byte and sampler row is
    given back. The steps did run on the device thread."""
    base = prompt(12, seed=3)
    full = list(generate(model, base, 24, temperature=0.0))
    full_text = bytes(t - 2 for t in full if t > 2).decode("utf-8", errors="replace")
    cases = [
        (prompt(9, seed=1), greedy(20)),
        (prompt(30, seed=2), SamplingParams(max_new_tokens=17, temperature=0.8, top_p=0.9, seed=7, logprobs=2,
                                            ignore_eos=True)),
        (base, greedy(24, stop_token_ids=(full[5],))),
        (base, greedy(24, stop=(full_text[6:8],))),
        (prompt(5, seed=4), greedy(1)),
        (prompt(6, seed=5), greedy(2)),
        (prompt(21, seed=6), SamplingParams(max_new_tokens=9, temperature=1.0, top_k=5, seed=3, ignore_eos=True)),
    ]

    async def go(overlap: bool) -> tuple[list[list[Event]], list[Event], Engine, set[str]]:
        engine = Engine(model, EngineConfig(max_batch=8, prefill_chunk_tokens=32, overlap_steps=overlap,
                                            context_memory_bytes=2**24))
        free_rows.append(len(engine._sampler._free))
        threads: set[str] = set()
        device_step = engine._device_step

        def on_thread(*args: Any) -> Any:
            threads.add(threading.current_thread().name)
            return device_step(*args)

        engine._device_step = on_thread  # type: ignore[method-assign]
        engine.start()
        # contexts: a long one (its prompt runs in one pass) and one shorter than an LSH chunk (its prompt is
        # fed as decode steps, which sets each row's next input when a token is applied)
        made = [[ev for ev in await collect(engine.create_context(prompt(n, seed=n))) if hasattr(ev, "context_id")][0]
                for n in (40, 3)]
        on_contexts = [engine.add_request(prompt(6, seed=9), greedy(10), context_id=c.context_id) for c in made]
        first = on_contexts + [engine.add_request(p, sp) for p, sp in cases[:3]]
        victim = engine.add_request(prompt(11, seed=8), greedy(60), request_id="victim")
        head = []
        async for ev in first[2]:  # the rest join while these decode
            head.append(ev)
            if isinstance(ev, TokenEvent):
                break
        later = [engine.add_request(p, sp) for p, sp in cases[3:]]
        got = 0
        async for ev in victim:
            if isinstance(ev, TokenEvent):
                got += len(ev.token_ids)
                if got >= 3:
                    engine.abort("victim")
                    break
        results = await asyncio.gather(*(collect(s) for s in first + later))
        results[2] = head + results[2]
        victim_rest = await collect(victim)
        await engine.shutdown()
        return results, victim_rest, engine, threads

    free_rows: list[int] = []
    seq, seq_victim, _, seq_threads = run(lambda: go(False))
    ovl, ovl_victim, engine, ovl_threads = run(lambda: go(True))
    assert seq_threads == {"reformer-engine"} and ovl_threads == {"reformer-device_0"}
    for a, b in zip(seq, ovl, strict=True):
        assert tokens_of(a) == tokens_of(b) and text_of(a) == text_of(b)
        assert [lp for ev in a if isinstance(ev, TokenEvent) for lp in ev.logprobs] == \
            [lp for ev in b if isinstance(ev, TokenEvent) for lp in ev.logprobs]
        fa, fb = finish_of(a), finish_of(b)
        assert (fa.finish_reason, fa.generated_tokens) == (fb.finish_reason, fb.generated_tokens)
    reasons = [finish_of(r).finish_reason for r in ovl]
    assert reasons.count(FinishReason.STOP) == 2 and reasons.count(FinishReason.LENGTH) == len(cases)
    assert [finish_of(r).cached_tokens for r in ovl[:2]] == [40, 3]
    assert finish_of(ovl_victim).finish_reason is FinishReason.ABORTED
    assert finish_of(seq_victim).finish_reason is FinishReason.ABORTED
    stats = engine.stats()
    assert stats.cache_bytes_in_use == 0 and stats.extra["cache_bytes_allocated"] == 0
    assert len(engine._sampler._free) == free_rows[-1]  # every row back


def test_warm_up_records_every_greedy_bucket_before_traffic(model: ReformerLM) -> None:
    """`Engine.warm_up` (the server runs it before SERVING) records the greedy step of every batch bucket up to
    `max_batch`, with and without the dense attention of sequences shorter than one LSH chunk, so that greedy
    traffic afterwards records nothing inside a serving step (on CUDA a graph capture, with `compile_step` a
    compile of tens of seconds). The recorder here is `step_graphs.EagerReplay` (the CPU stand-in); without
    recorded steps warm_up only runs its short generation."""
    from reformer_infer.step_graphs import EagerReplay

    async def go() -> tuple[int, set[tuple[int, bool]], int, int]:
        engine = Engine(model, EngineConfig(max_batch=8, compile_step=True))
        engine._graphs = graphs = model.use_step_graphs(engine._pool, capture=EagerReplay)  # no compiler here
        engine.start()
        recorded = await engine.warm_up()
        keys = {(key[1], key[2] > 0) for key in graphs._graphs if key[0] == "sampled"}
        before = graphs.captures
        streams = [engine.add_request(prompt(3 + 5 * i, seed=i), greedy(6 + i)) for i in range(8)]
        results = await asyncio.gather(*(collect(s) for s in streams))
        assert all(finish_of(r).finish_reason is FinishReason.LENGTH for r in results)
        after = graphs.captures
        await engine.shutdown()
        plain = Engine(model, EngineConfig(max_batch=8))
        plain.start()
        none = await plain.warm_up()
        await plain.shutdown()
        return recorded, keys, after - before, none

    recorded, keys, during_traffic, none = run(go)
    assert keys >= {(b, dense) for b in (1, 2, 4, 8) for dense in (True, False)}
    assert recorded == len(keys) and during_traffic == 0 and none == 0
