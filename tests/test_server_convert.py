"""The converter (protobuf <-> engine types) and the one error mapping, without a server."""

from __future__ import annotations

import grpc
import pytest
import server_fixtures  # noqa: F401  (puts server/ on sys.path in a plain checkout)
from google.rpc import error_details_pb2, status_pb2
from reformer_server import convert
from reformer_server._proto import generation_pb2 as pb
from reformer_server.errors import NotReadyError, finish_error, status_for

from reformer_infer.requests import (
    EngineStoppedError,
    FinishEvent,
    FinishReason,
    InvalidRequestError,
    OutOfMemoryError,
    OverloadedError,
    PrefillProgress,
    TokenEvent,
    TokenLogprob,
)
from reformer_infer.tokenizer import ByteTokenizer

LIMITS = convert.RequestLimits(max_context=100, default_max_new_tokens=16)
TOK = ByteTokenizer()


def test_text_prompt_is_encoded_and_unset_fields_take_defaults() -> None:
    prompt, params = convert.to_engine_request(pb.GenerateRequest(text="hi"), TOK, LIMITS)
    assert prompt == TOK.encode("hi")
    assert (params.max_new_tokens, params.temperature, params.top_k, params.top_p, params.seed) == (
        16, 1.0, 0, 1.0, None)


def test_explicit_zero_temperature_is_kept_greedy() -> None:
    _, params = convert.to_engine_request(pb.GenerateRequest(token_ids=[5, 6], temperature=0.0, seed=0), TOK, LIMITS)
    assert params.temperature == 0.0 and params.seed == 0


def test_all_sampling_fields_are_carried_over() -> None:
    req = pb.GenerateRequest(
        text="x", max_new_tokens=3, temperature=0.5, top_k=4, top_p=0.5, repetition_penalty=1.5, seed=9,
        stop=["\n"], stop_token_ids=[2], logprobs=3, ignore_eos=True, priority=2, max_time_seconds=1.5,
    )
    _, p = convert.to_engine_request(req, TOK, LIMITS)
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed) == (3, 0.5, 4, 0.5,
                                                                                                  1.5, 9)
    assert (p.stop, p.stop_token_ids, p.logprobs, p.ignore_eos, p.priority, p.max_time_s) == (
        ("\n",), (2,), 3, True, 2, 1.5)


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (pb.GenerateRequest(), "text"),
        (pb.GenerateRequest(text="a", token_ids=[5]), "token_ids"),
        (pb.GenerateRequest(text="a", truncation=99), "truncation"),
    ],
)
def test_wire_level_mistakes_name_the_field(req: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        convert.to_engine_request(req, TOK, LIMITS)
    assert e.value.field == field


def test_left_truncation_keeps_the_most_recent_tokens() -> None:
    req = pb.GenerateRequest(token_ids=list(range(3, 203)), max_new_tokens=10, truncation=pb.TRUNCATION_LEFT)
    prompt, _ = convert.to_engine_request(req, TOK, LIMITS)
    assert prompt == list(range(113, 203))  # 100 context - 10 new = 90 most recent


def test_without_truncation_a_long_prompt_is_left_for_the_engine_to_reject() -> None:
    prompt, _ = convert.to_engine_request(pb.GenerateRequest(token_ids=[5] * 200), TOK, LIMITS)
    assert len(prompt) == 200


def test_events_become_stream_messages() -> None:
    lp = TokenLogprob(7, -0.5, ((7, -0.5), (8, -1.0)))
    msg = convert.event_to_stream_response(TokenEvent("r", (7,), "a", (lp,)), "r")
    assert list(msg.token_ids) == [7] and msg.text == "a" and msg.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert msg.logprobs[0].top[1].token_id == 8 and msg.logprobs[0].top[1].logprob == pytest.approx(-1.0)
    prog = convert.event_to_stream_response(PrefillProgress("r", 64, 900), "r")
    assert prog.HasField("prefill_progress") and prog.prefill_progress.total_tokens == 900
    fin = FinishEvent("r", FinishReason.EOS, 3, 2, text="!", queue_time_s=0.25, peak_cache_bytes=77)
    last = convert.event_to_stream_response(fin, "r")
    assert last.finish_reason == pb.FINISH_REASON_EOS and last.text == "!"
    assert last.usage.prompt_tokens == 3 and last.timings.queue_seconds == 0.25 and last.peak_cache_bytes == 77


@pytest.mark.parametrize(
    ("reason", "kind", "expected", "label"),
    [
        (FinishReason.LENGTH, None, pb.FINISH_REASON_LENGTH, "length"),
        (FinishReason.STOP, None, pb.FINISH_REASON_STOP, "stop"),
        (FinishReason.ABORTED, None, pb.FINISH_REASON_CANCELLED, "cancelled"),
        (FinishReason.ERROR, "timeout", pb.FINISH_REASON_TIME_LIMIT, "time_limit"),
    ],
)
def test_finish_reasons_map(reason: FinishReason, kind: str | None, expected: int, label: str) -> None:
    ev = FinishEvent("r", reason, 1, 1, error_kind=kind)
    assert convert.finish_reason_to_proto(ev) == expected
    assert convert.finish_reason_label(ev) == label
    assert finish_error(ev) is None


def test_accumulator_builds_the_unary_response() -> None:
    acc = convert.ResponseAccumulator("r")
    acc.add(TokenEvent("r", (10, 11), "ab"))
    acc.add(TokenEvent("r", (12,), "c"))
    resp = acc.finish(FinishEvent("r", FinishReason.LENGTH, 4, 3, text="d"))
    assert resp.text == "abcd" and list(resp.token_ids) == [10, 11, 12]
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH


def test_invalid_request_maps_to_invalid_argument_with_field_details() -> None:
    code, message, trailing = status_for(InvalidRequestError("top_p", "must be in (0, 1], got 2.0"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("top_p: ")
    md = dict(trailing)
    assert md["reformer-error-field"] == "top_p"
    status = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad) and bad.field_violations[0].field == "top_p"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (OverloadedError("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (OutOfMemoryError("CUDA out of memory"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineStoppedError("shutting down"), grpc.StatusCode.UNAVAILABLE),
        (NotReadyError("loading"), grpc.StatusCode.UNAVAILABLE),
        (KeyError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_map_to_status_codes(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_for(exc)[0] == code


def test_failed_finish_events_become_errors() -> None:
    assert isinstance(finish_error(FinishEvent("r", FinishReason.ERROR, 1, 0, error="oom", error_kind="oom")),
                      OutOfMemoryError)
    internal = finish_error(FinishEvent("r", FinishReason.ERROR, 1, 0, error="boom", error_kind="internal"))
    assert internal is not None and status_for(internal)[0] == grpc.StatusCode.INTERNAL
