"""Fault containment: out-of-memory in one request, a crash of the engine loop, SIGTERM during streams.

tests/test_server_inprocess.py already shows an injected prefill OOM failing one unary request while a
unary neighbour completes; here the neighbours are *streams* in the middle of decoding, the OOM hits the
second chunk of a long prefill, and the survivors' greedy tokens must equal what they produce alone (no
state leaks from the failed request into the batch). Faults are injected through the engine's
`fault_hook` (reformer_infer/engine.py), on a real ReformerServer on this event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from reformer_server.config import parse_config
from reformer_server.server import ReformerServer
from server_fixtures import ServerProcess, prompt_text, start_server, tiny_model_dir  # noqa: F401

CALL_TIMEOUT_S = 60.0


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The in-process engine shares this process; two torch threads on a busy 2-core box only slow it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@asynccontextmanager
async def running_server(model_dir: Path, *args: str) -> AsyncIterator[ReformerServer]:
    """ReformerServer.run() as a task (so the engine watchdog runs too), SERVING when this yields."""
    cfg = parse_config(["--model", str(model_dir), "--port", "0", "--metrics-port", "-1", "--warmup", "false",
                        "--cache-memory", "64MiB", *args], env={})
    srv = ReformerServer(cfg)
    task = asyncio.ensure_future(srv.run())
    deadline = time.monotonic() + 60
    while srv.engine is None or srv.servicer.engine is None:
        assert not task.done() and time.monotonic() < deadline, "server did not come up"
        await asyncio.sleep(0.02)
    try:
        yield srv
    finally:
        srv.request_stop()
        srv.request_stop()  # the second request skips the grace period
        await asyncio.wait_for(task, 60)


async def collect(call: grpc.aio.UnaryStreamCall) -> tuple[list[int], pb.GenerateStreamResponse]:
    """The rest of a stream (read() style: grpc.aio forbids mixing it with `async for` on one call)."""
    tokens: list[int] = []
    last = pb.GenerateStreamResponse()
    while (msg := await call.read()) is not grpc.aio.EOF:
        tokens.extend(msg.token_ids)
        last = msg
    return tokens, last


async def health(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return resp.status


def test_oom_in_a_long_prefill_fails_that_stream_only_and_spares_the_decoding_ones(
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    survivors = [pb.GenerateRequest(text=f"stream {i}: It is a truth", max_new_tokens=60, ignore_eos=True,
                                    temperature=0.0) for i in range(3)]

    async def scenario() -> None:
        async with running_server(tiny_model_dir, "--prefill-chunk-tokens", "32") as srv:
            chunks: dict[str, int] = {}

            def hook(phase: str, request_id: str | None) -> None:
                if phase == "prefill" and request_id == "oom-me":
                    chunks[request_id] = chunks.get(request_id, 0) + 1
                    if chunks[request_id] == 2:  # mid-prefill: a partial cache exists and must be dropped
                        raise torch.OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 2.00 GiB")

            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                alone = [await collect(stub.GenerateStream(r, timeout=CALL_TIMEOUT_S)) for r in survivors]
                srv.engine.fault_hook = hook
                streams = [stub.GenerateStream(r, timeout=CALL_TIMEOUT_S) for r in survivors]
                for s in streams:
                    assert (await s.read()).token_ids  # all three are decoding
                victim = stub.GenerateStream(pb.GenerateRequest(text=prompt_text(700), max_new_tokens=20,
                                                                request_id="oom-me"), timeout=CALL_TIMEOUT_S)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await collect(victim)
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "out of memory during prefill" in e.value.details()
                assert chunks["oom-me"] == 2
                for s, (alone_tokens, _), req in zip(streams, alone, survivors, strict=True):
                    rest, last = await collect(s)
                    assert last.finish_reason == pb.FINISH_REASON_LENGTH
                    assert len(rest) + 1 == req.max_new_tokens  # first token read above
                    assert rest == alone_tokens[1:]  # the same greedy tokens as when running alone
            stats = srv.engine.stats()
            assert stats.alive and stats.cache_bytes_in_use == 0 and stats.extra["cache_bytes_allocated"] == 0
            assert await health(srv.port) == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(scenario())


def test_a_bug_in_one_requests_prefill_or_decode_fails_only_it_and_the_engine_keeps_serving(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture,  # noqa: F811
) -> None:
    """Non-OOM exceptions (what a bug triggered by one input looks like): in a prefill unit, in the decode
    step of a request decoding alone, and once at the start of a step. Each fails only the requests it hit,
    with INTERNAL, logged with their ids; the decoding neighbours' greedy tokens are unchanged; health stays
    SERVING and cache bytes return to 0. (Before issue 18 any of these failed every request and stopped the
    engine.)"""
    survivors = [pb.GenerateRequest(text=f"stream {i}: It is a truth", max_new_tokens=40, ignore_eos=True,
                                    temperature=0.0) for i in range(3)]

    async def scenario() -> None:
        async with running_server(tiny_model_dir, "--prefill-chunk-tokens", "32") as srv:
            faults = {"prefill": "bad-prefill", "decode": "bad-decode"}
            step_fault = threading.Event()  # set here, read and cleared in the engine thread

            def hook(phase: str, request_id: str | None) -> None:
                if phase == "step" and step_fault.is_set():
                    step_fault.clear()
                    raise RuntimeError("injected: one-off step failure")
                if request_id is not None and faults.get(phase) == request_id:
                    raise ValueError(f"injected: bug in {phase} of {request_id}")

            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                alone = [await collect(stub.GenerateStream(r, timeout=CALL_TIMEOUT_S)) for r in survivors]
                srv.engine.fault_hook = hook
                streams = [stub.GenerateStream(r, timeout=CALL_TIMEOUT_S) for r in survivors]
                for st in streams:
                    assert (await st.read()).token_ids  # all three are decoding
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Generate(pb.GenerateRequest(text=prompt_text(300), max_new_tokens=5,
                                                           request_id="bad-prefill"), timeout=CALL_TIMEOUT_S)
                assert e.value.code() == grpc.StatusCode.INTERNAL
                assert "prefill failed: injected: bug in prefill of bad-prefill" in e.value.details()
                step_fault.set()
                for st, (alone_tokens, _) in zip(streams, alone, strict=True):
                    rest, last = await collect(st)
                    assert last.finish_reason == pb.FINISH_REASON_LENGTH
                    assert rest == alone_tokens[1:]  # the same greedy tokens as when running alone
                # decoding alone, so its failed decode step hits nobody else
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Generate(pb.GenerateRequest(text="x", max_new_tokens=5, request_id="bad-decode"),
                                        timeout=CALL_TIMEOUT_S)
                assert e.value.code() == grpc.StatusCode.INTERNAL
                assert "decode step failed: ValueError: injected: bug in decode of bad-decode" in e.value.details()
                ok = await stub.Generate(survivors[0], timeout=CALL_TIMEOUT_S)
                assert list(ok.token_ids) == alone[0][0]
            stats = srv.engine.stats()
            assert stats.alive and stats.cache_bytes_in_use == 0 and stats.extra["cache_bytes_allocated"] == 0
            assert stats.extra["step_failures_total"] == 2  # the decode step and the one-off step
            assert await health(srv.port) == health_pb2.HealthCheckResponse.SERVING
            assert await health(srv.port, "reformer.v1.TextGeneration") == health_pb2.HealthCheckResponse.SERVING
        assert srv.metrics.registry.get_sample_value("reformer_engine_step_failures_total") == 2.0
        logged = caplog.text
        assert "prefill of request bad-prefill failed" in logged
        assert "failing requests bad-decode" in logged and "engine step failed (1 in a row, limit 3)" in logged

    asyncio.run(scenario())


def test_engine_loop_crash_fails_every_request_with_internal_and_turns_health_not_serving(
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    async def scenario() -> None:
        async with running_server(tiny_model_dir, "--max-batch", "1") as srv:
            crash = asyncio.Event()

            def hook(phase: str, request_id: str | None) -> None:
                if phase == "step" and crash.is_set():
                    raise RuntimeError("injected: illegal memory access")

            srv.engine.fault_hook = hook
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                req = pb.GenerateRequest(text="x", max_new_tokens=900, ignore_eos=True)
                running = stub.GenerateStream(req, timeout=CALL_TIMEOUT_S)
                assert (await running.read()).token_ids
                waiting = stub.Generate(req, timeout=CALL_TIMEOUT_S)  # queued behind the only slot
                t0 = time.monotonic()
                while srv.engine.stats().waiting < 1 and time.monotonic() - t0 < 10:
                    await asyncio.sleep(0.01)
                crash.set()
                for call in (collect(running), waiting):  # both end, neither hangs
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await asyncio.wait_for(call, 10)
                    assert e.value.code() == grpc.StatusCode.INTERNAL
                    assert "engine failure: RuntimeError: injected: illegal memory access" in e.value.details()
                # The watchdog turns health NOT_SERVING within about a second; new work is UNAVAILABLE.
                deadline = time.monotonic() + 10
                while await health(srv.port) != health_pb2.HealthCheckResponse.NOT_SERVING:
                    assert time.monotonic() < deadline, "health never left SERVING after the engine died"
                    await asyncio.sleep(0.1)
                assert await health(srv.port, "reformer.v1.TextGeneration") == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Generate(pb.GenerateRequest(text="late", max_new_tokens=2), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "engine has stopped" in e.value.details()
            assert srv.metrics.registry.get_sample_value("reformer_engine_alive") == 0.0
            assert srv.engine.stats().cache_bytes_in_use == 0

    asyncio.run(scenario())


# ---- SIGTERM ---------------------------------------------------------------------------------------------
async def _until_draining(port: int, timeout: float = 15.0) -> None:
    """Wait until the server has acted on SIGTERM: health NOT_SERVING, or the port already closed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await health(port) == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                return
        await asyncio.sleep(0.02)
    raise AssertionError("the server never started draining")


def test_sigterm_lets_every_running_stream_finish_and_refuses_new_ones(
    tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    srv = start_server(tiny_model_dir, tmp_path, "--grace-period", "60")

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = pb_grpc.TextGenerationStub(ch)
            new_tokens = [150, 200, 250, 300]
            calls = [stub.GenerateStream(pb.GenerateRequest(text=f"s{i}", max_new_tokens=n, ignore_eos=True),
                                         timeout=CALL_TIMEOUT_S) for i, n in enumerate(new_tokens)]
            firsts = [await c.read() for c in calls]
            os.kill(srv.proc.pid, signal.SIGTERM)
            await _until_draining(srv.port)
            # New work is refused with UNAVAILABLE: by the draining servicer, then by the closed port.
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Generate(pb.GenerateRequest(text="late", max_new_tokens=2), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.6)
            for c, first, n in zip(calls, firsts, new_tokens, strict=True):
                tokens, last = await collect(c)
                assert last.finish_reason == pb.FINISH_REASON_LENGTH
                assert len(first.token_ids) + len(tokens) == n == last.usage.generated_tokens

    asyncio.run(scenario())
    assert srv.proc.wait(30) == 0, srv.log()


def test_drain_sends_round_robin_clients_to_the_other_replica_at_once(
    tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    """The deploy engineer's point: after --drain-announce the draining replica stops accepting (GOAWAY),
    so a round-robin channel over two replicas sends all new calls to the other one instead of getting
    UNAVAILABLE from the draining one for the whole grace period; the running stream still finishes."""
    a = start_server(tiny_model_dir, tmp_path / "a", "--grace-period", "60", "--drain-announce", "0.5")
    b = start_server(tiny_model_dir, tmp_path / "b")
    target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")]) as ch:
            stub = pb_grpc.TextGenerationStub(ch)
            on_a: list[grpc.aio.UnaryStreamCall] = []
            firsts: list[pb.GenerateStreamResponse] = []
            for i in range(4):  # round robin: two of these land on each replica
                on_a.append(stub.GenerateStream(pb.GenerateRequest(text=f"r{i}", max_new_tokens=400,
                                                                   ignore_eos=True), timeout=CALL_TIMEOUT_S))
                firsts.append(await on_a[-1].read())  # one token, or more if the writer fell behind
            os.kill(a.proc.pid, signal.SIGTERM)
            await _until_draining(a.port)
            await asyncio.sleep(1.5)  # well past the 0.5 s announce window: A has sent GOAWAY
            outcomes = []
            for _ in range(12):
                try:
                    await stub.Generate(pb.GenerateRequest(text="y", max_new_tokens=2, ignore_eos=True), timeout=10)
                    outcomes.append("OK")
                except grpc.aio.AioRpcError as e:
                    outcomes.append(e.code().name)
            assert outcomes == ["OK"] * 12, outcomes
            for c, first in zip(on_a, firsts, strict=True):  # the streams on the draining replica (and B) complete
                tokens, last = await collect(c)
                assert last.finish_reason == pb.FINISH_REASON_LENGTH and len(first.token_ids) + len(tokens) == 400

    try:
        asyncio.run(scenario())
        assert a.proc.wait(30) == 0, a.log()
        assert "draining" in a.log()
    finally:
        a.stop()
        assert b.stop() == 0, b.log()


def test_second_signal_cuts_the_drain_short(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    srv: ServerProcess = start_server(tiny_model_dir, tmp_path, "--grace-period", "120")
    with grpc.insecure_channel(srv.target) as ch:
        call = pb_grpc.TextGenerationStub(ch).GenerateStream(
            pb.GenerateRequest(text="x", max_new_tokens=1000, ignore_eos=True, max_time_seconds=300),
            timeout=CALL_TIMEOUT_S)
        next(call)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert srv.proc.wait(30) == 0, srv.log()
    assert time.monotonic() - t0 < 20
