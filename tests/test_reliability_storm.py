"""Cancellation storm, CI-sized: the short variant of bench/storm.py against a real server subprocess.

64 concurrent streams per round with random prompt lengths, random client cancellations and short
deadlines, three rounds. Nothing may crash, every stream that was not cancelled ends with a final message
(or DEADLINE_EXCEEDED when its deadline was the short one), cache bytes / running / waiting / open streams
return to 0 after each round, and resident memory and thread count stay flat after the warm-up round.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from server_fixtures import ROOT, ServerProcess, server, tiny_model_dir  # noqa: F401

sys.path.append(str(ROOT / "bench"))
import storm  # noqa: E402


def test_storm_of_cancelled_and_expiring_streams_leaks_nothing(server: ServerProcess) -> None:  # noqa: F811
    report = asyncio.run(storm.run_storm(server.target, server.proc.pid, server.metrics_port, rounds=3,
                                         streams=64, max_prompt=300, max_new_tokens=32, seed=1234))
    summary = report.summary()
    assert report.failures() == [], summary
    assert len(report.rounds) == 3 and report.requests_sent == 192
    # The storm really mixed its fates (a storm of only completions proves little).
    assert summary["completed"] >= 40 and summary["cancelled"] >= 20 and summary["deadline_exceeded"] >= 5, summary
    for r in report.rounds:
        assert r.leaked == {}, r  # cache bytes, running, waiting and open streams all back to 0
    assert report.rounds[-1].threads <= report.rounds[0].threads
    assert report.rss_growth < 0.10, summary
    # ... and the server still answers correctly afterwards.
    with grpc.insecure_channel(server.target) as ch:
        resp = pb_grpc.TextGenerationStub(ch).Generate(
            pb.GenerateRequest(text="after the storm", max_new_tokens=5, ignore_eos=True), timeout=30)
    assert resp.usage.generated_tokens == 5 and resp.finish_reason == pb.FINISH_REASON_LENGTH


def test_storm_report_flags_leaks_and_growth() -> None:
    """The storm's verdict can fail: leaked bytes, memory growth and new threads are each reported."""
    ok = storm.RoundReport(round=1, streams=4, rss_bytes=100 * 2**20, threads=10)
    leaky = storm.RoundReport(round=2, streams=4, rss_bytes=120 * 2**20, threads=12,
                              leaked={"reformer_cache_bytes_in_use": 4096.0}, unexpected=["complete: INTERNAL: x"])
    failures = storm.StormReport([ok, leaky], server_alive=False, max_rss_growth=0.10).failures()
    text = "\n".join(failures)
    for needle in ("server process died", "INTERNAL", "reformer_cache_bytes_in_use = 4096",
                   "resident memory grew 20.0%", "thread count grew 10 -> 12"):
        assert needle in text, failures
    assert storm.StormReport([ok, ok], server_alive=True, max_rss_growth=0.10).failures() == []


def test_proc_status_reads_this_process() -> None:
    import os
    import threading

    rss, threads = storm.proc_status(os.getpid())
    assert rss > 10 * 2**20 and threads >= threading.active_count()
    assert Path(f"/proc/{os.getpid()}").exists()
