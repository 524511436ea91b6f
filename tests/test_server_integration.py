"""The real server in a subprocess on loopback, driven through the raw generated stubs (the wire contract)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from server_fixtures import ServerProcess, prompt_text, server, start_server, tiny_model_dir  # noqa: F401

from reformer_infer import load_model
from reformer_infer.generation import generate
from reformer_infer.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> pb_grpc.TextGenerationStub:  # noqa: F811
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.TextGenerationStub(channel)
    channel.close()


def test_health_reports_serving_for_server_and_service(server: ServerProcess) -> None:  # noqa: F811
    assert server.health("") == health_pb2.HealthCheckResponse.SERVING
    assert server.health("reformer.v1.TextGeneration") == health_pb2.HealthCheckResponse.SERVING


def test_stream_yields_tokens_incrementally(stub: pb_grpc.TextGenerationStub) -> None:
    t0 = time.perf_counter()
    arrivals = []
    messages = []
    for msg in stub.GenerateStream(pb.GenerateRequest(text="Hello", max_new_tokens=200, ignore_eos=True, seed=1)):
        arrivals.append(time.perf_counter() - t0)
        messages.append(msg)
    assert len(messages) >= 20  # one message per token unless the reader fell behind
    assert arrivals[0] < arrivals[-1] / 2  # the first token arrived well before the last
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(m.token_ids) for m in messages) == 200 == messages[-1].usage.generated_tokens
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert len({m.request_id for m in messages}) == 1


def test_greedy_output_equals_library_generate(stub: pb_grpc.TextGenerationStub, tiny_model_dir: Path) -> None:  # noqa: F811
    model = load_model(tiny_model_dir)
    prompt = TOK.encode("It is a truth universally acknowledged")
    expected = list(generate(model, prompt, 60, temperature=0.0, stop_ids=(model.config.eos_token_id,)))
    streamed = []
    for msg in stub.GenerateStream(pb.GenerateRequest(token_ids=prompt, max_new_tokens=60, temperature=0.0)):
        streamed.extend(msg.token_ids)
    unary = stub.Generate(pb.GenerateRequest(token_ids=prompt, max_new_tokens=60, temperature=0.0))
    assert streamed == expected
    assert list(unary.token_ids) == expected
    assert unary.text == TOK.decode(expected)


def test_stream_text_deltas_reassemble_the_unary_text(stub: pb_grpc.TextGenerationStub) -> None:
    req = pb.GenerateRequest(text="Elizabeth", max_new_tokens=80, seed=5, temperature=1.0, stop=["e"])
    text = "".join(m.text for m in stub.GenerateStream(req))
    unary = stub.Generate(req)
    assert text == unary.text
    assert "e" not in text  # a stop string is never streamed


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({}, "text"),  # empty input
        ({"text": "a", "token_ids": [5]}, "token_ids"),  # both inputs
        ({"token_ids": [5, 258]}, "token_ids"),  # outside the vocabulary
        ({"text": "a", "temperature": -0.5}, "temperature"),
        ({"text": "a", "top_p": 0.0}, "top_p"),
        ({"text": "a", "top_p": 1.5}, "top_p"),
        ({"text": "a", "top_k": -1}, "top_k"),
        ({"text": "a", "max_new_tokens": 0}, "max_new_tokens"),
        ({"text": "a", "max_new_tokens": 5000}, "max_new_tokens"),  # beyond the limit
        ({"text": "a" * 1000, "max_new_tokens": 100}, "max_new_tokens"),  # beyond the context
        ({"text": "a", "truncation": 42}, "truncation"),  # unknown enum value
        ({"text": "a", "logprobs": 21}, "logprobs"),
        ({"text": "a", "stop": [""]}, "stop"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.TextGenerationStub, fields: dict, field_name: str
) -> None:
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(pb.GenerateRequest(**fields))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(f"{field_name}: ")
        assert dict(e.value.trailing_metadata())["reformer-error-field"] == field_name
    # ... and the server keeps serving
    assert stub.Generate(pb.GenerateRequest(text="ok", max_new_tokens=2, ignore_eos=True)).usage.generated_tokens == 2


def test_cancelling_a_stream_frees_its_cache(stub: pb_grpc.TextGenerationStub, server: ServerProcess) -> None:  # noqa: F811
    call = stub.GenerateStream(pb.GenerateRequest(text="Hello", max_new_tokens=900, ignore_eos=True))
    for i, _msg in enumerate(call):
        if i == 5:
            assert server.metric("reformer_cache_bytes_in_use") > 0
            call.cancel()
            break
    assert server.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0
    assert server.wait_metric("reformer_num_requests_running", 0.0) == 0.0


def test_deadline_aborts_the_request_and_frees_its_cache(
    stub: pb_grpc.TextGenerationStub, server: ServerProcess  # noqa: F811
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(text="Hello", max_new_tokens=900, ignore_eos=True), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0


def test_cancel_rpc_ends_a_stream_by_request_id(stub: pb_grpc.TextGenerationStub) -> None:
    call = stub.GenerateStream(
        pb.GenerateRequest(text="Hi", max_new_tokens=900, ignore_eos=True, request_id="cancel-me-1")
    )
    first = next(call)
    assert first.request_id == "cancel-me-1"
    assert stub.Cancel(pb.CancelRequest(request_id="cancel-me-1")).cancelled
    last = list(call)[-1]
    assert last.finish_reason == pb.FINISH_REASON_CANCELLED
    with pytest.raises(grpc.RpcError) as e:  # no longer running
        stub.Cancel(pb.CancelRequest(request_id="cancel-me-1"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_long_prompt_streams_prefill_progress(stub: pb_grpc.TextGenerationStub) -> None:
    messages = list(stub.GenerateStream(pb.GenerateRequest(text=prompt_text(900), max_new_tokens=4)))
    progress = [m.prefill_progress for m in messages if m.HasField("prefill_progress")]
    assert progress, "a 900-token prompt with --prefill-chunk-tokens 64 reports progress"
    assert all(p.total_tokens == 900 for p in progress)
    done = [p.done_tokens for p in progress]
    assert done == sorted(done) and done[-1] < 900
    assert messages[-1].usage.prompt_tokens == 900


def test_left_truncation_fits_an_overlong_prompt(stub: pb_grpc.TextGenerationStub) -> None:
    resp = stub.Generate(pb.GenerateRequest(text=prompt_text(1500), max_new_tokens=24,
                                            truncation=pb.TRUNCATION_LEFT))
    assert resp.usage.prompt_tokens == 1000 and resp.usage.generated_tokens <= 24


def test_model_info_tokenize_detokenize(stub: pb_grpc.TextGenerationStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.config.vocab_size == 258 and info.limits.max_context == 1024
    assert list(info.config.attn_layers) == ["local", "lsh", "local", "lsh"]
    assert info.device == "cpu" and info.dtype == "float32" and info.backend == "eager"
    assert len(info.rotation_fingerprint) >= 16 and info.num_parameters > 0
    ids = stub.Tokenize(pb.TokenizeRequest(text="héllo")).token_ids
    assert list(ids) == TOK.encode("héllo")
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == "héllo"
    with pytest.raises(grpc.RpcError) as e:
        stub.Detokenize(pb.DetokenizeRequest(token_ids=[999]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_logprobs_come_with_each_token(stub: pb_grpc.TextGenerationStub) -> None:
    resp = stub.Generate(pb.GenerateRequest(text="Hi", max_new_tokens=5, logprobs=3, ignore_eos=True))
    assert len(resp.logprobs) == 5
    for tid, lp in zip(resp.token_ids, resp.logprobs, strict=True):
        assert lp.token_id == tid and lp.logprob <= 0 and len(lp.top) == 3


def test_metrics_parse_and_histograms_count_requests(
    stub: pb_grpc.TextGenerationStub, server: ServerProcess  # noqa: F811
) -> None:
    stub.Generate(pb.GenerateRequest(text="metrics", max_new_tokens=8, ignore_eos=True))
    families = server.metrics()
    for hist in ("reformer_time_to_first_token_seconds", "reformer_inter_token_latency_seconds",
                 "reformer_e2e_request_latency_seconds", "reformer_request_queue_time_seconds",
                 "reformer_request_prefill_time_seconds", "reformer_request_prompt_tokens"):
        counts = [v for name, _lb, v in families[hist] if name == f"{hist}_count"]
        assert counts and sum(counts) > 0, hist
    buckets = [lb["le"] for name, lb, _v in families["reformer_request_prompt_tokens"] if name.endswith("_bucket")]
    assert "65536.0" in buckets
    assert server.metric("reformer_request_success_total", finish_reason="length") >= 1
    assert server.metric("reformer_grpc_requests_total", method="Generate", code="OK") >= 1
    assert server.metric("reformer_grpc_requests_total", code="INVALID_ARGUMENT") >= 0
    assert server.metric("reformer_generation_tokens_total") >= 8
    assert server.metric("reformer_prompt_tokens_total") >= 7
    assert server.metric("reformer_process_resident_memory_bytes") > 10 * 2**20
    assert server.metric("reformer_cache_bytes_budget") == 256 * 2**20
    assert server.metric("reformer_model_info", backend="eager", device="cpu", tokenizer="byte") == 1.0


def test_reflection_lists_the_service(server: ServerProcess) -> None:  # noqa: F811
    with grpc.insecure_channel(server.target) as ch:
        responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(responses).list_services_response.service}
    assert {"reformer.v1.TextGeneration", "grpc.health.v1.Health"} <= names


def test_queue_full_is_resource_exhausted(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    srv = start_server(tiny_model_dir, tmp_path, "--max-batch", "1", "--max-queue", "1")
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.TextGenerationStub(ch)
            long_req = pb.GenerateRequest(text="x", max_new_tokens=900, ignore_eos=True)
            running = stub.GenerateStream(long_req)
            next(running)  # admitted: the only slot is taken
            waiting = stub.GenerateStream(long_req)
            deadline = time.monotonic() + 10
            while srv.metric("reformer_num_requests_waiting") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(pb.GenerateRequest(text="y", max_new_tokens=2))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            running.cancel()
            waiting.cancel()
            assert srv.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0
            assert stub.Generate(pb.GenerateRequest(text="z", max_new_tokens=2, ignore_eos=True)).usage.generated_tokens == 2
    finally:
        assert srv.stop() == 0, srv.log()


def test_graceful_shutdown_lets_a_running_stream_finish(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    srv = start_server(tiny_model_dir, tmp_path, "--grace-period", "60")
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.TextGenerationStub(ch)
        call = stub.GenerateStream(pb.GenerateRequest(text="x", max_new_tokens=300, ignore_eos=True))
        first = next(call)
        assert first.token_ids
        srv.proc.send_signal(15)  # SIGTERM
        deadline = time.monotonic() + 10
        while srv.health() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(text="late", max_new_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(call)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 300
    assert srv.proc.wait(30) == 0, srv.log()


def test_grace_period_expiry_cancels_remaining_streams(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    srv = start_server(tiny_model_dir, tmp_path, "--grace-period", "0.5")
    with grpc.insecure_channel(srv.target) as ch:
        call = pb_grpc.TextGenerationStub(ch).GenerateStream(
            pb.GenerateRequest(text="x", max_new_tokens=1000, ignore_eos=True, max_time_seconds=120)
        )
        next(call)
        t0 = time.monotonic()
        srv.proc.send_signal(15)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert srv.proc.wait(30) == 0, srv.log()
    assert time.monotonic() - t0 < 15


def test_client_that_stops_reading_is_aborted_without_slowing_others(
    tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    srv = start_server(tiny_model_dir, tmp_path, "--stall-timeout", "1")
    try:
        # No BDP probing: the HTTP/2 window stays 64 KiB, so an unread stream blocks the server's writes.
        opts = [("grpc.http2.bdp_probe", 0)]
        with grpc.insecure_channel(srv.target, options=opts) as slow_ch, grpc.insecure_channel(srv.target) as ch:
            stalled = pb_grpc.TextGenerationStub(slow_ch).GenerateStream(
                pb.GenerateRequest(text="x", max_new_tokens=1000, ignore_eos=True, logprobs=20)
            )
            next(stalled)  # ... and never read again
            result: dict[str, pb.GenerateResponse] = {}

            def other() -> None:
                result["r"] = pb_grpc.TextGenerationStub(ch).Generate(
                    pb.GenerateRequest(text="y", max_new_tokens=50, ignore_eos=True))

            t = threading.Thread(target=other)
            t.start()
            t.join(30)
            assert result["r"].usage.generated_tokens == 50  # the healthy stream was served meanwhile
            assert srv.wait_metric("reformer_cache_bytes_in_use", 0.0, timeout=30) == 0.0
            with pytest.raises(grpc.RpcError) as e:
                list(stalled)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "stopped reading" in e.value.details()
    finally:
        assert srv.stop() == 0, srv.log()


def test_bad_model_path_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from server_fixtures import subprocess_env

    r = subprocess.run(
        [sys.executable, "-m", "reformer_server", "--model", str(tmp_path / "missing"), "--port", "0",
         "--metrics-port", "-1"],
        capture_output=True, text=True, env=subprocess_env(), timeout=60,
    )
    assert r.returncode == 1
    assert "fatal:" in r.stderr and "missing" in r.stderr


def test_serves_the_bundled_default_model_without_flags(tmp_path: Path) -> None:
    from reformer_infer import default_model_path

    if not (Path(default_model_path()) / "model.safetensors").exists():
        pytest.skip("the bundled default model is not in this checkout")
    srv = start_server(None, tmp_path)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.TextGenerationStub(ch)
            assert stub.GetModelInfo(pb.GetModelInfoRequest()).model_name == Path(default_model_path()).name
            resp = stub.Generate(pb.GenerateRequest(text="It is a truth", max_new_tokens=8, ignore_eos=True))
            assert resp.usage.generated_tokens == 8
    finally:
        assert srv.stop() == 0, srv.log()
