"""Scheduler without a model: admission by slots and bytes, queue bound, priorities, abort, rejection."""

from __future__ import annotations

import pytest

from reformer_infer.requests import InvalidRequestError, OverloadedError
from reformer_infer.scheduler import RequestStatus, ScheduledRequest, Scheduler, SchedulerConfig

BYTES_PER_TOKEN = 10


def make(max_running: int = 4, max_waiting: int = 8, budget: int = 1000, max_context: int = 100) -> Scheduler:
    cfg = SchedulerConfig(
        max_running=max_running, max_waiting=max_waiting, cache_budget_bytes=budget, max_context=max_context
    )
    return Scheduler(cfg, lambda n: n * BYTES_PER_TOKEN)


def req(rid: str, prompt: int = 5, new: int = 5, priority: int = 0) -> ScheduledRequest:
    return ScheduledRequest(request_id=rid, prompt_len=prompt, max_new_tokens=new, priority=priority)


def ids(reqs: list[ScheduledRequest]) -> list[str]:
    return [r.request_id for r in reqs]


def test_admission_limited_by_free_slots() -> None:
    s = make(max_running=2)
    for i in range(3):
        s.add(req(f"r{i}"))
    assert ids(s.schedule()) == ["r0", "r1"]
    assert s.num_running == 2 and s.num_waiting == 1
    assert s.schedule() == []
    s.finish("r0", RequestStatus.FINISHED_LENGTH)
    assert ids(s.schedule()) == ["r2"]


def test_admission_limited_by_projected_cache_bytes() -> None:
    s = make(budget=250)
    s.add(req("a", prompt=5, new=5))  # 100 bytes
    s.add(req("b", prompt=10, new=5))  # 150 bytes
    s.add(req("c", prompt=1, new=1))  # 20 bytes: the budget is full
    admitted = s.schedule()
    assert ids(admitted) == ["a", "b"]
    assert s.bytes_in_use == 250
    assert s.get("c").status is RequestStatus.WAITING  # type: ignore[union-attr]
    s.finish("a", RequestStatus.FINISHED_EOS)
    assert s.bytes_in_use == 150
    assert ids(s.schedule()) == ["c"]
    assert s.bytes_in_use == 170


def test_blocked_head_is_not_overtaken_by_smaller_requests() -> None:
    s = make(budget=300)
    s.add(req("big0", prompt=10, new=10))  # 200
    s.schedule()
    s.add(req("big1", prompt=10, new=10))  # 200: does not fit next to big0
    s.add(req("small", prompt=1, new=1))  # 20: would fit, but waits behind big1 (no starvation)
    assert s.schedule() == []
    s.finish("big0", RequestStatus.FINISHED_LENGTH)
    assert ids(s.schedule()) == ["big1", "small"]


def test_higher_priority_first_then_fifo() -> None:
    s = make(max_running=1, budget=10_000)
    s.add(req("low0", priority=0))
    s.add(req("high0", priority=5))
    s.add(req("low1", priority=0))
    s.add(req("high1", priority=5))
    order = []
    for _ in range(4):
        admitted = s.schedule()
        assert len(admitted) == 1
        order.append(admitted[0].request_id)
        s.finish(admitted[0].request_id, RequestStatus.FINISHED_LENGTH)
    assert order == ["high0", "high1", "low0", "low1"]


def test_queue_bound_raises_overloaded_and_queues_nothing() -> None:
    s = make(max_running=1, max_waiting=2)
    s.add(req("a"))
    s.add(req("b"))
    with pytest.raises(OverloadedError, match="waiting queue is full"):
        s.add(req("c"))
    assert s.num_waiting == 2 and s.get("c") is None
    s.schedule()  # a runs, one waiting slot frees up
    s.add(req("c"))
    assert s.num_waiting == 2


def test_request_longer_than_context_is_rejected_at_once() -> None:
    s = make(max_context=100)
    with pytest.raises(InvalidRequestError) as e:
        s.add(req("long", prompt=101, new=1))
    assert e.value.field == "prompt" and "context is 100" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        s.add(req("long2", prompt=90, new=20))
    assert e.value.field == "max_new_tokens" and "110" in str(e.value)
    assert s.num_waiting == 0 and not s.has_unfinished()


def test_request_larger_than_whole_budget_is_rejected_at_once() -> None:
    s = make(budget=500, max_context=1000)
    with pytest.raises(InvalidRequestError) as e:
        s.add(req("huge", prompt=10, new=60))  # 700 bytes > 500
    assert e.value.field == "max_new_tokens" and "whole cache budget is 500" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        s.add(req("huge2", prompt=60, new=1))
    assert e.value.field == "prompt"
    assert s.num_waiting == 0


def test_duplicate_request_id_is_rejected() -> None:
    s = make()
    s.add(req("x"))
    with pytest.raises(InvalidRequestError, match="already in use"):
        s.add(req("x"))


def test_abort_while_waiting_frees_queue_place() -> None:
    s = make(max_running=1, max_waiting=2)
    s.add(req("a"))
    s.schedule()
    s.add(req("b"))
    s.add(req("c"))
    aborted = s.abort("b")
    assert aborted is not None and aborted.status is RequestStatus.FINISHED_ABORTED
    assert s.num_waiting == 1
    s.finish("a", RequestStatus.FINISHED_LENGTH)
    assert ids(s.schedule()) == ["c"]  # the aborted one is never admitted


def test_abort_while_running_frees_slot_and_bytes_at_once() -> None:
    s = make(max_running=1)
    s.add(req("a"))
    s.add(req("b"))
    s.schedule()
    assert s.bytes_in_use == 100
    s.abort("a")
    assert s.bytes_in_use == 0 and s.num_running == 0
    assert ids(s.schedule()) == ["b"]


def test_abort_is_idempotent_and_ignores_finished_or_unknown() -> None:
    s = make()
    s.add(req("a"))
    s.schedule()
    assert s.finish("a", RequestStatus.FINISHED_STOPPED) is not None
    assert s.abort("a") is None
    assert s.abort("a") is None
    assert s.abort("nope") is None
    assert s.bytes_in_use == 0 and not s.has_unfinished()


def test_many_aborts_behind_blocked_head_keep_heap_bounded() -> None:
    s = make(max_running=1, max_waiting=10, budget=10**9, max_context=10**6)
    s.add(req("head"))
    s.schedule()
    for i in range(1000):
        s.add(req(f"w{i}"))
        s.abort(f"w{i}")
    assert s.num_waiting == 0
    assert len(s._queue) <= 2 * s.num_waiting + 65
    s.abort("head")
    assert s.bytes_in_use == 0 and not s.has_unfinished()


def test_random_mix_of_transitions_returns_to_zero() -> None:
    import random

    rng = random.Random(0)
    s = make(max_running=3, max_waiting=50, budget=600, max_context=40)
    live: list[str] = []
    for i in range(500):
        op = rng.random()
        if op < 0.4:
            try:
                s.add(
                    req(
                        f"r{i}", prompt=rng.randint(1, 20), new=rng.randint(1, 20), priority=rng.randint(0, 2)
                    )
                )
                live.append(f"r{i}")
            except OverloadedError:
                pass
        elif op < 0.6:
            s.schedule()
        elif live:
            rid = live.pop(rng.randrange(len(live)))
            if rng.random() < 0.5:
                s.abort(rid)
            else:
                s.finish(rid, RequestStatus.FINISHED_LENGTH)
        assert 0 <= s.bytes_in_use <= 600
        assert s.bytes_in_use == sum(r.reserved_bytes for r in s.running)
        assert s.num_running <= 3
    for rid in live:
        s.abort(rid)
    assert s.bytes_in_use == 0 and s.num_running == 0 and s.num_waiting == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_hol(clock: FakeClock, max_running: int = 4, budget: int = 10_000, short_slots: int = 1,
             aging_rate: float | None = 10.0) -> Scheduler:
    cfg = SchedulerConfig(max_running=max_running, max_waiting=64, cache_budget_bytes=budget, max_context=1000,
                          long_prompt_tokens=20, short_slots=short_slots, aging_rate=aging_rate)
    return Scheduler(cfg, lambda n: n * BYTES_PER_TOKEN, clock=clock)


def test_long_prompts_leave_the_short_slots_to_a_short_request_behind_them() -> None:
    s = make_hol(FakeClock(), aging_rate=None)  # FIFO order: only the slot rule lets the short one in
    for i in range(6):
        s.add(req(f"long{i}", prompt=100, new=1))
    assert ids(s.schedule()) == ["long0", "long1", "long2"]  # 4 slots, 1 kept for short prompts
    s.add(req("short", prompt=5, new=1))
    assert ids(s.schedule()) == ["short"]
    s.finish("short", RequestStatus.FINISHED_LENGTH)
    assert s.schedule() == []  # the freed slot is a short one: the longs keep waiting
    s.finish("long0", RequestStatus.FINISHED_LENGTH)
    assert ids(s.schedule()) == ["long3"]  # FIFO among the long ones


def test_a_shorter_prompt_overtakes_a_longer_one_only_within_the_aging_window() -> None:
    clock = FakeClock()
    s = make_hol(clock, max_running=1, short_slots=0)
    s.add(req("busy", prompt=5, new=1))
    assert ids(s.schedule()) == ["busy"]
    s.add(req("long", prompt=100, new=1))  # rank 0 + 100 / 10 = 10 s
    clock.now = 4.0
    s.add(req("mid", prompt=30, new=1))  # rank 4 + 3 = 7: overtakes
    clock.now = 9.0
    s.add(req("short-early", prompt=5, new=1))  # rank 9.5: overtakes
    clock.now = 11.0
    s.add(req("short-late", prompt=1, new=1))  # rank 11.1: the long one has aged past it
    order = []
    for _ in range(4):
        s.finish(s.running[0].request_id, RequestStatus.FINISHED_LENGTH)
        order += ids(s.schedule())
    assert order == ["mid", "short-early", "long", "short-late"]


def test_a_request_waiting_for_bytes_is_passed_by_short_ones_only_until_its_rank_time() -> None:
    clock = FakeClock()
    s = make_hol(clock, max_running=8, budget=3000, short_slots=2)
    s.add(req("big0", prompt=100, new=50))  # 1500 bytes
    assert ids(s.schedule()) == ["big0"]
    s.add(req("head", prompt=10, new=190))  # 2000 bytes: waits for big0; rank 1.0 s
    s.add(req("long", prompt=30, new=1))  # 310 bytes would fit, but a long prompt never passes a blocked one
    clock.now = 0.5
    s.add(req("short", prompt=5, new=5))  # 100 bytes, rank 1.0 (after the head): passes it before 1.0 s
    assert ids(s.schedule()) == ["short"]
    clock.now = 1.0  # the head's rank time: nothing passes it any more
    s.add(req("short2", prompt=5, new=5))
    assert s.schedule() == []
    s.finish("big0", RequestStatus.FINISHED_LENGTH)
    assert ids(s.schedule()) == ["head", "short2", "long"]
    assert s.bytes_in_use == 2000 + 100 + 100 + 310


def test_invalid_head_of_line_settings_are_refused() -> None:
    for kw in ({"short_slots": 4}, {"short_slots": 1, "long_prompt_tokens": None}, {"aging_rate": 0.0}):
        base = {"max_running": 4, "max_waiting": 1, "cache_budget_bytes": 10, "max_context": 10,
                "long_prompt_tokens": 5, "short_slots": 0, "aging_rate": None}
        base.update(kw)
        with pytest.raises(ValueError):
            Scheduler(SchedulerConfig(**base), lambda n: n)
