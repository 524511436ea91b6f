"""Limits, each with a clear status and message: message size, prompt size, concurrent streams, request time.

One real server subprocess with small limits: --max-message-bytes 64KiB, --max-prompt-bytes 2000,
--max-concurrent-streams 4, --max-request-time 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from reformer_server.config import parse_config
from server_fixtures import ServerProcess, start_server, tiny_model_dir  # noqa: F401

TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def limited(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:  # noqa: F811
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("limited"), "--max-message-bytes", "64KiB",
                       "--max-concurrent-streams", "4",
                       env={"REFORMER_MAX_PROMPT_BYTES": "2000", "REFORMER_MAX_REQUEST_TIME": "1"})
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def stub(limited: ServerProcess) -> Iterator[pb_grpc.TextGenerationStub]:
    with grpc.insecure_channel(limited.target) as ch:
        yield pb_grpc.TextGenerationStub(ch)


def test_new_limit_flags_have_environment_variables() -> None:
    cfg = parse_config([], env={"REFORMER_MAX_PROMPT_BYTES": "1MiB", "REFORMER_MAX_REQUEST_TIME": "90",
                                "REFORMER_DRAIN_ANNOUNCE": "2.5"})
    assert cfg.max_prompt_bytes == 2**20 and cfg.max_request_time == 90.0 and cfg.drain_announce == 2.5
    defaults = parse_config([], env={})
    assert defaults.max_request_time is None and defaults.max_prompt_bytes == 4 * 2**20
    assert parse_config(["--max-request-time", "0"], env={}).max_request_time is None
    for bad in (["--max-request-time", "-3"], ["--max-request-time", "nan"], ["--max-prompt-bytes", "0"],
                ["--drain-announce", "-1"]):
        with pytest.raises(SystemExit):
            parse_config(bad, env={})


def test_message_over_the_size_limit_is_resource_exhausted(stub: pb_grpc.TextGenerationStub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(text="a" * 100_000, max_new_tokens=2), timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in e.value.details()  # grpc: "Received message larger than max (N vs. 65536)"


@pytest.mark.parametrize(
    ("fields", "field", "size"),
    [
        ({"text": "a" * 2001}, "text", 2001),
        ({"text": "€" * 700}, "text", 2100),  # 700 characters, 2100 UTF-8 bytes: bytes are what count
        ({"token_ids": [70] * 2001}, "token_ids", 2001),
        ({"text": "a" * 2001, "truncation": pb.TRUNCATION_LEFT}, "text", 2001),  # checked before truncating
    ],
)
def test_prompt_over_max_prompt_bytes_is_invalid_argument_before_any_work(
    stub: pb_grpc.TextGenerationStub, fields: dict, field: str, size: int
) -> None:
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as e:
            call(pb.GenerateRequest(max_new_tokens=2, **fields), timeout=TIMEOUT_S)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == (f"{field}: prompt of {size} bytes is larger than this server's limit of "
                                     "2000 bytes (--max-prompt-bytes)")
    ok = stub.Generate(pb.GenerateRequest(text="a" * 2000, max_new_tokens=2, ignore_eos=True,
                                          truncation=pb.TRUNCATION_LEFT), timeout=TIMEOUT_S)
    assert ok.usage.generated_tokens == 2


def test_streams_beyond_max_concurrent_streams_are_refused_not_queued(
    stub: pb_grpc.TextGenerationStub, limited: ServerProcess
) -> None:
    long_req = pb.GenerateRequest(text="x", max_new_tokens=900, ignore_eos=True)
    running = [stub.GenerateStream(long_req, timeout=TIMEOUT_S) for _ in range(4)]
    try:
        for call in running:
            next(call)  # all four hold a stream
        t0 = time.monotonic()
        # On the same connection: the 5th is refused at once, not parked until its deadline (it was while
        # the HTTP/2 per-connection limit equalled --max-concurrent-streams).
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GenerateStream(long_req, timeout=TIMEOUT_S))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details() == ("server overloaded: 4 generation streams are open, the limit of "
                                     "--max-concurrent-streams")
        assert time.monotonic() - t0 < 5
        # Probes and info calls are not generations: a saturated server is still live and answers them.
        assert limited.health() == 1  # SERVING
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S).limits.max_context == 1024
        with grpc.insecure_channel(limited.target) as other:  # ... and on another connection
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.TextGenerationStub(other).Generate(long_req, timeout=TIMEOUT_S)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for call in running:
            call.cancel()
    assert limited.wait_metric("reformer_grpc_streams_open", 0.0) == 0.0
    assert stub.Generate(pb.GenerateRequest(text="y", max_new_tokens=2, ignore_eos=True),
                         timeout=TIMEOUT_S).usage.generated_tokens == 2


def test_server_cap_on_generation_time_ends_the_stream_with_time_limit(stub: pb_grpc.TextGenerationStub) -> None:
    # max_time_seconds above the server's cap (1 s) is lowered to it; so is an absent one. (1020 tokens with
    # top-20 logprobs, one message each, take several seconds here.)
    for extra in ({"max_time_seconds": 600.0}, {}):
        t0 = time.monotonic()
        messages = list(stub.GenerateStream(
            pb.GenerateRequest(text="x", max_new_tokens=1020, ignore_eos=True, logprobs=20, **extra),
            timeout=TIMEOUT_S))
        elapsed = time.monotonic() - t0
        last = messages[-1]
        assert last.finish_reason == pb.FINISH_REASON_TIME_LIMIT, (last.usage, elapsed)
        assert 0.9 < elapsed < 10 and 0 < last.usage.generated_tokens < 1020
        assert sum(len(m.token_ids) for m in messages) == last.usage.generated_tokens
    # A shorter request limit still wins over the cap.
    resp = stub.Generate(pb.GenerateRequest(text="x", max_new_tokens=1000, ignore_eos=True, max_time_seconds=0.2),
                         timeout=TIMEOUT_S)
    assert resp.finish_reason == pb.FINISH_REASON_TIME_LIMIT and resp.timings.total_seconds < 1.5
