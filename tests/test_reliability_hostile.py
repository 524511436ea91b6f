"""Hostile or careless clients (issue 18), through real server subprocesses on the tiny model:

- bounded requests: stop strings, stop token ids and Tokenize input over their limits are refused with
  INVALID_ARGUMENT naming the field and the limit;
- no head-of-line blocking: a short request behind a flood of long prompts gets its first token before any
  of them; a request waiting past --max-queue-time gets RESOURCE_EXHAUSTED;
- requests belong to a caller: priority is ignored unless the caller holds a priority token, Cancel of
  another caller's request is NOT_FOUND, --max-streams-per-client counts per caller;
- a token is not sent or accepted in cleartext off loopback unless explicitly allowed.

The figures for the bundled model (first token behind 24 prompts of 60,000 bytes, a neighbour's
inter-token gap while a 200,000-stop-string request is refused) are measured by bench/hostile.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from reformer_client import Client
from reformer_client.cli import main as cli_main
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from reformer_server.config import parse_config
from server_fixtures import (  # noqa: F401
    ServerProcess,
    prompt_text,
    start_server,
    subprocess_env,
    tiny_model_dir,
)

TIMEOUT_S = 60.0
ALICE, BOB = "alice-token-0123456789", "bob-priority-token-9876543210"  # BOB is a --priority-tokens token


@pytest.fixture(scope="module")
def guarded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:  # noqa: F811
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("guarded"), "--max-batch", "1",
                       "--max-streams-per-client", "2", "--max-prompt-bytes", "5000",
                       env={"REFORMER_AUTH_TOKEN": ALICE, "REFORMER_PRIORITY_TOKENS": BOB,
                            "REFORMER_MAX_STOP_STRINGS": "8", "REFORMER_MAX_QUEUE_TIME": "30"})
    yield srv
    assert srv.stop() == 0, srv.log()


def _md(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def stub(guarded: ServerProcess) -> Iterator[pb_grpc.TextGenerationStub]:
    with grpc.insecure_channel(guarded.target) as ch:
        yield pb_grpc.TextGenerationStub(ch)


def test_limit_flags_have_environment_variables_and_documented_defaults() -> None:
    cfg = parse_config([], env={})
    assert (cfg.max_stop_strings, cfg.max_stop_string_bytes, cfg.max_stop_token_ids) == (16, 256, 64)
    assert cfg.max_queue_time is None and cfg.max_streams_per_client == 0 and not cfg.allow_client_priority
    assert cfg.short_prompt_slots == 4 and cfg.long_prompt_tokens == 2048
    cfg = parse_config([], env={"REFORMER_MAX_STOP_STRINGS": "4", "REFORMER_MAX_QUEUE_TIME": "5",
                                "REFORMER_PRIORITY_TOKENS": "a, b", "REFORMER_MAX_STREAMS_PER_CLIENT": "3",
                                "REFORMER_SHORT_PROMPT_SLOTS": "2"})
    assert cfg.max_stop_strings == 4 and cfg.max_queue_time == 5.0 and cfg.priority_tokens == ("a", "b")
    assert cfg.max_streams_per_client == 3 and cfg.short_prompt_slots == 2
    for bad in (["--short-prompt-slots", "16"], ["--max-stop-strings", "-1"], ["--queue-aging-rate", "0"]):
        with pytest.raises(SystemExit):
            parse_config(bad, env={})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stop": [f"s{i}" for i in range(200_000)]},
         "stop: 200000 stop strings given; the limit is 8 (--max-stop-strings)"),
        ({"stop": ["x" * 257]},
         "stop: a stop string of 257 bytes is longer than the limit of 256 bytes (--max-stop-string-bytes)"),
        ({"stop": ["€" * 86]},  # 86 characters, 258 bytes: bytes are what count
         "stop: a stop string of 258 bytes is longer than the limit of 256 bytes (--max-stop-string-bytes)"),
        ({"stop_token_ids": [5] * 65},
         "stop_token_ids: 65 stop token ids given; the limit is 64 (--max-stop-token-ids)"),
    ],
)
def test_stop_conditions_over_their_limits_are_invalid_argument(
    stub: pb_grpc.TextGenerationStub, fields: dict, message: str
) -> None:
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as e:
            call(pb.GenerateRequest(text="hi", max_new_tokens=2, **fields), timeout=TIMEOUT_S, metadata=_md(ALICE))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == message
    ok = stub.Generate(pb.GenerateRequest(text="hi", max_new_tokens=2, ignore_eos=True, stop=["z" * 256] * 8,
                                          stop_token_ids=[1] * 64), timeout=TIMEOUT_S, metadata=_md(ALICE))
    assert ok.usage.generated_tokens == 2


def test_tokenize_and_detokenize_inputs_are_bounded_by_max_prompt_bytes(stub: pb_grpc.TextGenerationStub) -> None:
    assert len(stub.Tokenize(pb.TokenizeRequest(text="a" * 5000), timeout=TIMEOUT_S, metadata=_md(ALICE)).token_ids) == 5000
    for text, size in (("a" * 5001, 5001), ("€" * 2000, 6000)):
        with pytest.raises(grpc.RpcError) as e:
            stub.Tokenize(pb.TokenizeRequest(text=text), timeout=TIMEOUT_S, metadata=_md(ALICE))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == (f"text: text of {size} bytes is larger than this server's limit of 5000 bytes "
                                     "(--max-prompt-bytes)")
    with pytest.raises(grpc.RpcError) as e:
        stub.Detokenize(pb.DetokenizeRequest(token_ids=[70] * 5001), timeout=TIMEOUT_S, metadata=_md(ALICE))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("token_ids: 5001")


def _hold_the_slot(stub: pb_grpc.TextGenerationStub, token: str, n: int = 400) -> grpc.Call:
    """A stream that occupies the only batch slot (--max-batch 1) until cancelled or n tokens are made."""
    holder = stub.GenerateStream(pb.GenerateRequest(text="hold", max_new_tokens=n, ignore_eos=True),
                                 timeout=TIMEOUT_S, metadata=_md(token))
    assert next(holder).token_ids
    return holder


def _wait_waiting(srv: ServerProcess, n: int) -> None:
    deadline = time.monotonic() + 20
    while srv.metric("reformer_num_requests_waiting") < n:
        assert time.monotonic() < deadline, "requests never queued"
        time.sleep(0.02)


def _finish_order(stub: pb_grpc.TextGenerationStub, srv: ServerProcess, callers: list[tuple[str, str, int]]) -> list[str]:
    """Queue one request per (name, token, priority) behind a slot holder, in that order; the order they end in."""
    holder = _hold_the_slot(stub, BOB, n=1000)  # (alice has at most 2 streams open)
    order: list[str] = []
    lock = threading.Lock()

    def run(name: str, token: str, priority: int) -> None:
        stub.Generate(pb.GenerateRequest(text="same length", max_new_tokens=3, ignore_eos=True, priority=priority),
                      timeout=TIMEOUT_S, metadata=_md(token))
        with lock:
            order.append(name)

    threads = []
    for i, (name, token, priority) in enumerate(callers):
        threads.append(threading.Thread(target=run, args=(name, token, priority)))
        threads[-1].start()
        _wait_waiting(srv, i + 1)
    holder.cancel()
    for t in threads:
        t.join(TIMEOUT_S)
    return order


def test_client_priority_is_ignored_unless_the_caller_holds_a_priority_token(
    stub: pb_grpc.TextGenerationStub, guarded: ServerProcess
) -> None:
    # alice (an ordinary token) asks for priority 10 after a priority-0 request: first come, first served
    assert _finish_order(stub, guarded, [("first", ALICE, 0), ("pushy", ALICE, 10)]) == ["first", "pushy"]
    # bob holds a --priority-tokens token: his priority is honoured
    assert _finish_order(stub, guarded, [("first", ALICE, 0), ("vip", BOB, 10)]) == ["vip", "first"]


def test_cancel_finds_only_the_callers_own_requests(stub: pb_grpc.TextGenerationStub) -> None:
    call = stub.GenerateStream(pb.GenerateRequest(text="mine", max_new_tokens=900, ignore_eos=True,
                                                  request_id="alice-1"), timeout=TIMEOUT_S, metadata=_md(ALICE))
    assert next(call).token_ids
    for rid in ("alice-1", "no-such-id"):  # another caller's request looks exactly like an unknown one
        with pytest.raises(grpc.RpcError) as e:
            stub.Cancel(pb.CancelRequest(request_id=rid), timeout=TIMEOUT_S, metadata=_md(BOB))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == f"no running request {rid!r} of this caller"
    assert stub.Cancel(pb.CancelRequest(request_id="alice-1"), timeout=TIMEOUT_S, metadata=_md(ALICE)).cancelled
    assert list(call)[-1].finish_reason == pb.FINISH_REASON_CANCELLED


def test_sdk_cancel_of_another_callers_request_returns_false(guarded: ServerProcess) -> None:
    with Client(guarded.target, token=ALICE) as alice, Client(guarded.target, token=BOB) as bob:
        stream = alice.generate_stream("mine", max_new_tokens=900, ignore_eos=True, request_id="alice-2")
        next(iter(stream))
        assert bob.cancel("alice-2") is False
        assert alice.cancel("alice-2") is True
        stream.close()


def test_streams_per_client_are_counted_per_caller(stub: pb_grpc.TextGenerationStub, guarded: ServerProcess) -> None:
    req = pb.GenerateRequest(text="x", max_new_tokens=900, ignore_eos=True)
    mine = [stub.GenerateStream(req, timeout=TIMEOUT_S, metadata=_md(ALICE)) for _ in range(2)]
    try:
        next(mine[0])  # one decodes (--max-batch 1), the other waits: both are open
        deadline = time.monotonic() + 20
        while guarded.metric("reformer_grpc_streams_open") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req, timeout=TIMEOUT_S, metadata=_md(ALICE))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details() == ("server overloaded: this client has 2 generation streams open, the limit of "
                                     "--max-streams-per-client")
        theirs = stub.GenerateStream(req, timeout=TIMEOUT_S, metadata=_md(BOB))  # another caller is not counted
        try:
            deadline = time.monotonic() + 20
            while guarded.metric("reformer_grpc_streams_open") < 3:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        finally:
            theirs.cancel()
    finally:
        for call in mine:
            call.cancel()
    assert guarded.wait_metric("reformer_grpc_streams_open", 0.0) == 0.0
    assert guarded.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0


def test_short_request_behind_a_flood_of_long_prompts_gets_its_first_token_first(
    tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    """12 prompts of ~1000 tokens fill the queue of a 4-slot server, then a 20-byte request arrives. The long
    prompts may take 3 slots; the short one gets the fourth and, prefilled least-work-first, its first token
    comes before any long prompt's (each of those needs hundreds of steps of 16 units). Before issue 18 it
    waited for whole long requests to finish."""
    srv = start_server(tiny_model_dir, tmp_path, "--max-batch", "4", "--prefill-chunk-tokens", "16",
                       "--long-prompt-tokens", "256", "--short-prompt-slots", "1")
    try:
        async def scenario() -> tuple[float, list[float]]:
            async with grpc.aio.insecure_channel(srv.target) as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                t0 = time.monotonic()

                async def first_token(text: str) -> float:
                    call = stub.GenerateStream(pb.GenerateRequest(text=text, max_new_tokens=4, ignore_eos=True),
                                               timeout=TIMEOUT_S * 2)
                    first = None
                    async for msg in call:
                        if msg.token_ids and first is None:
                            first = time.monotonic() - t0
                    assert first is not None
                    return first

                longs = [asyncio.ensure_future(first_token(prompt_text(1000 - i))) for i in range(12)]
                while (srv.metric("reformer_num_requests_waiting") + srv.metric("reformer_num_requests_running")
                       < 12):
                    await asyncio.sleep(0.01)
                short = await first_token(prompt_text(20))
                return short, list(await asyncio.gather(*longs))

        short, longs = asyncio.run(scenario())
        assert short < min(longs), (short, sorted(longs))
        assert srv.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_request_waiting_past_max_queue_time_is_resource_exhausted(
    tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    srv = start_server(tiny_model_dir, tmp_path, "--max-batch", "1", "--max-queue-time", "0.3")
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.TextGenerationStub(ch)
            holder = _hold_the_slot(stub, "", n=1000)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(pb.GenerateRequest(text="late", max_new_tokens=2), timeout=TIMEOUT_S)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "longer than the queue time limit of 0.3s (--max-queue-time)" in e.value.details()
            assert 0.3 <= time.monotonic() - t0 < 10
            holder.cancel()
        assert srv.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0
    finally:
        assert srv.stop() == 0, srv.log()


def test_server_refuses_a_token_on_a_non_loopback_address_without_tls(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "reformer_server", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "-1"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                             env=subprocess_env({"REFORMER_AUTH_TOKEN": "s3cret"}))
    assert refused.returncode == 2
    assert "refusing to require a bearer token on 0.0.0.0 without TLS" in refused.stderr
    assert "s3cret" not in refused.stderr
    for argv in (["--host", "0.0.0.0", "--allow-insecure-token", "true"], ["--host", "::1"], ["--host", "localhost"]):
        assert parse_config(argv, env={"REFORMER_AUTH_TOKEN": "s3cret"}).auth_token == "s3cret"
    assert parse_config(["--host", "0.0.0.0"], env={}).auth_token is None  # no token: nothing to leak


def test_sdk_and_cli_refuse_to_send_a_token_in_cleartext_off_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    for target in ("10.1.2.3:50051", "reformer.example.com:443", "dns:///reformer.example.com:50051"):
        with pytest.raises(ValueError, match="refusing to send a bearer token"):
            Client(target, token="s3cret")
        Client(target, token="s3cret", allow_insecure_token=True).close()  # explicit: allowed
        Client(target).close()  # no token: nothing to protect
    for target in ("127.0.0.1:1", "localhost:1", "[::1]:1", "unix:/tmp/reformer.sock"):
        Client(target, token="s3cret").close()
    assert cli_main(["--target", "10.1.2.3:50051", "--token", "s3cret", "info"]) == 2
    assert "refusing to send a bearer token" in capsys.readouterr().err
