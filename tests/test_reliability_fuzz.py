"""Property-based fuzzing of the real server (subprocess on loopback) with hypothesis.

Every call carries a deadline, so a hang shows up as DEADLINE_EXCEEDED instead of a stuck test. Properties:
- a GenerateRequest with random, extreme or invalid field values ends with OK (a final message whose usage
  matches what streamed) or INVALID_ARGUMENT naming the offending field; never INTERNAL, never a hang;
- a request drawn from the valid ranges always streams to a final message;
- raw random bytes (and mutated valid messages) sent as the request message of any method end with a
  status: OK or INVALID_ARGUMENT ("the request message could not be parsed: ..." or a named field), never
  UNKNOWN / INTERNAL, and they leave no traceback in the server log;
- after every example the server process is alive, and at the end it is SERVING with no cache bytes,
  running requests or open streams left over.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from server_fixtures import ServerProcess, server, tiny_model_dir  # noqa: F401

CALL_TIMEOUT_S = 30.0  # far above any legitimate call here: reaching it means a hang
CONTEXT = 1024  # tiny_config().max_position_embeddings
SERVICE = "/reformer.v1.TextGeneration/"
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
SMALL_NEW = st.integers(1, 12)


def _extreme_ints(edges: list[int]) -> st.SearchStrategy[int]:
    """Mostly around the interesting edges, sometimes anywhere in int32."""
    return st.one_of(st.sampled_from(edges), INT32)


def _usually(valid: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """A value from the valid range 4 times in 5, else an extreme or invalid one: with 15 fields, most
    requests then still carry one or two odd values rather than being rejected for the first of many."""
    return st.integers(0, 4).flatmap(lambda k: wild if k == 0 else valid)


@st.composite
def any_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    prompt = draw(st.sampled_from(["text"] * 9 + ["token_ids"] * 9 + ["both", "none"]))
    if prompt in ("text", "both"):
        req.text = draw(st.one_of(st.text(max_size=40), st.text(min_size=1000, max_size=1100, alphabet="ab")))
    if prompt in ("token_ids", "both"):
        req.token_ids.extend(draw(st.lists(_usually(st.integers(3, 257), st.one_of(st.integers(0, 300), INT32)),
                                           max_size=40)))
    if draw(st.booleans()):
        req.max_new_tokens = draw(_usually(SMALL_NEW, _extreme_ints([0, -1, CONTEXT, 4096, 4097, 2**31 - 1])))
    for name, valid in (("temperature", st.floats(0, 4)), ("top_p", st.floats(0.01, 1)),
                        ("repetition_penalty", st.floats(0.1, 4))):
        if draw(st.booleans()):
            setattr(req, name, draw(_usually(valid, FLOATS)))
    if draw(st.booleans()):
        req.top_k = draw(_usually(st.integers(0, 300), _extreme_ints([-1, 2**31 - 1])))
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1))
    req.stop.extend(draw(st.lists(st.text(max_size=8), max_size=3)))
    req.stop_token_ids.extend(draw(st.lists(_usually(st.integers(0, 257), _extreme_ints([258, -1])),
                                            max_size=3)))
    req.logprobs = draw(_usually(st.integers(0, 20), _extreme_ints([21, -1])))
    req.request_id = draw(st.one_of(st.just(""), st.text(max_size=64)))
    req.ignore_eos = draw(st.booleans())
    req.priority = draw(_usually(st.integers(-10, 10), INT32))
    if draw(st.booleans()):
        req.max_time_seconds = draw(_usually(st.floats(0.01, 60), st.one_of(
            st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-9, 1e300]))))
    req.truncation = draw(_usually(st.sampled_from(list(pb.Truncation.values())), INT32))
    return req


@st.composite
def valid_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest(max_new_tokens=draw(SMALL_NEW), ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        req.text = draw(st.text(min_size=1, max_size=60))
    else:
        req.token_ids.extend(draw(st.lists(st.integers(3, 257), min_size=1, max_size=200)))
    req.temperature = draw(st.floats(0.0, 2.0, width=32))
    req.top_k = draw(st.integers(0, 258))
    req.top_p = draw(st.floats(0.0625, 1.0, width=32))
    req.repetition_penalty = draw(st.floats(0.5, 2.0, width=32))
    req.seed = draw(st.integers(0, 2**63 - 1))
    req.logprobs = draw(st.integers(0, 20))
    req.stop.extend(draw(st.lists(st.text(min_size=1, max_size=4), max_size=2)))
    req.priority = draw(st.integers(-100, 100))
    req.truncation = draw(st.sampled_from(list(pb.Truncation.values())))
    return req


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:  # noqa: F811
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def _run(stub: pb_grpc.TextGenerationStub, req: pb.GenerateRequest, streaming: bool) -> pb.GenerateStreamResponse:
    """One call; returns the final message (a unary response is turned into the same shape)."""
    if not streaming:
        resp = stub.Generate(req, timeout=CALL_TIMEOUT_S)
        return pb.GenerateStreamResponse(finish_reason=resp.finish_reason, usage=resp.usage,
                                         token_ids=resp.token_ids)
    messages = list(stub.GenerateStream(req, timeout=CALL_TIMEOUT_S))
    assert messages, "a stream with status OK must carry at least its final message"
    final = messages[-1]
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    token_ids = [t for m in messages for t in m.token_ids]
    return pb.GenerateStreamResponse(finish_reason=final.finish_reason, usage=final.usage, token_ids=token_ids)


def _check_final(final: pb.GenerateStreamResponse) -> None:
    assert final.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert final.usage.generated_tokens == len(final.token_ids)
    assert all(0 <= t < 258 for t in final.token_ids)


@FUZZ
@given(req=any_requests(), streaming=st.booleans())
def test_any_generate_request_ends_with_ok_or_a_named_invalid_argument(
    channel: grpc.Channel, server: ServerProcess, req: pb.GenerateRequest, streaming: bool  # noqa: F811
) -> None:
    stub = pb_grpc.TextGenerationStub(channel)
    try:
        final = _run(stub, req, streaming)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details(), req)
        field = dict(e.trailing_metadata() or ()).get("reformer-error-field")
        assert field and e.details().startswith(f"{field}: "), (e.details(), req)
        event(f"INVALID_ARGUMENT {field}")  # --hypothesis-show-statistics counts outcomes (docs/reliability.md)
    else:
        event("OK")
        _check_final(final)
        assert final.usage.generated_tokens <= (req.max_new_tokens if req.HasField("max_new_tokens") else 64)
        assert not (req.HasField("temperature") and math.isnan(req.temperature)), "NaN temperature accepted"
    assert server.proc.poll() is None, server.log()


@FUZZ
@given(req=valid_requests(), streaming=st.booleans())
def test_valid_requests_always_stream_to_a_final_message(
    channel: grpc.Channel, req: pb.GenerateRequest, streaming: bool
) -> None:
    final = _run(pb_grpc.TextGenerationStub(channel), req, streaming)
    _check_final(final)
    assert final.usage.generated_tokens <= req.max_new_tokens
    if req.ignore_eos and not req.stop:
        assert final.usage.generated_tokens == req.max_new_tokens


_VALID_BYTES = pb.GenerateRequest(text="fuzz", max_new_tokens=3, temperature=0.5, stop=["x"]).SerializeToString()


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid GenerateRequest with a few bytes flipped, cut or appended."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=256))
    data = bytearray(_VALID_BYTES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=8))


@FUZZ
@given(payload=raw_messages(), method=st.sampled_from(
    ["Generate", "GenerateStream", "GetModelInfo", "Tokenize", "Detokenize", "Cancel", "NoSuchMethod"]))
def test_raw_bytes_as_the_request_message_end_with_a_status(
    channel: grpc.Channel, server: ServerProcess, payload: bytes, method: str  # noqa: F811
) -> None:
    # No serializers: the bytes go on the wire as the message exactly as drawn.
    try:
        if method == "GenerateStream":
            list(channel.unary_stream(SERVICE + method)(payload, timeout=CALL_TIMEOUT_S))
        else:
            channel.unary_unary(SERVICE + method)(payload, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        code = e.code()
        event(code.name)
        if method == "NoSuchMethod":
            assert code == grpc.StatusCode.UNIMPLEMENTED
        elif method == "Cancel" and code == grpc.StatusCode.NOT_FOUND:  # parsed: an id this caller does not run
            assert e.details().startswith("no running request "), e.details()
        else:
            # Bytes that do not parse are the client's fault too (reformer_server/malformed.py); before that
            # guard grpc.aio answered UNKNOWN and logged a traceback per message.
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, e.details(), payload)
            field = dict(e.trailing_metadata() or ()).get("reformer-error-field")
            assert e.details().startswith("the request message could not be parsed: ") or (
                field and e.details().startswith(f"{field}: ")), e.details()
    else:
        event("OK")
        assert method != "NoSuchMethod"
    assert server.proc.poll() is None, server.log()


def test_server_is_healthy_and_settled_after_fuzzing(server: ServerProcess) -> None:  # noqa: F811
    """Runs last in this module: nothing the fuzzers sent left state behind."""
    assert server.proc.poll() is None
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    for gauge in ("reformer_cache_bytes_in_use", "reformer_num_requests_running", "reformer_num_requests_waiting",
                  "reformer_grpc_streams_open"):
        assert server.wait_metric(gauge, 0.0) == 0.0, gauge
    assert server.metric("reformer_grpc_requests_total", code="INTERNAL", method="Generate") == 0
    assert server.metric("reformer_grpc_requests_total", code="INTERNAL", method="GenerateStream") == 0
    assert "Traceback" not in server.log(), server.log()[-3000:]
