"""Cancellation storm against a real `reformer-server` (benchmark-style; a short variant runs in CI through
tests/test_reliability_storm.py).

    python bench/storm.py                                   # tiny random model, 64 streams x 5 rounds
    python bench/storm.py --streams 128 --rounds 10 --max-prompt 900 --json storm.json
    python bench/storm.py --model DIR                       # a real checkpoint

Each round opens `--streams` GenerateStream calls at once over a few channels. Every stream draws a random
prompt length, generation length and sampling setting, and one fate:

  complete  a generous deadline; must end with a final message (finish_reason set), nothing else is allowed
  cancel    the client cancels after reading 0-5 messages (0: right after sending)
  deadline  a short deadline (20-500 ms); ends with DEADLINE_EXCEEDED or, when quick enough, a final message

After a round the script waits for the server to settle and then reads, from the server itself:
cache bytes in use, running / waiting requests and open streams (Prometheus endpoint; all must be 0),
resident memory and thread count (/proc/<pid>/status). Round 1 is the warm-up baseline for memory and
threads. The run fails (exit 1) on any crash, unexpected status, stream without a final message, leaked
cache bytes, growth of resident memory beyond --max-rss-growth or of the thread count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "server", ROOT / "clients" / "python", ROOT / "tests"):
    if str(_p) not in sys.path:  # a plain checkout works without `pip install -e`
        sys.path.append(str(_p))

import grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from reformer_server._proto import generation_pb2 as pb  # noqa: E402
from reformer_server._proto import generation_pb2_grpc as pb_grpc  # noqa: E402

logger = logging.getLogger("storm")

FATES = ("complete", "cancel", "deadline")
SETTLE_TIMEOUT_S = 20.0
# Server-side gauges that must all read 0 once every stream of a round has ended.
SETTLED_GAUGES = ("reformer_cache_bytes_in_use", "reformer_num_requests_running",
                  "reformer_num_requests_waiting", "reformer_grpc_streams_open")


@dataclass
class RoundReport:
    round: int
    streams: int
    completed: int = 0  # ended with a final message
    cancelled: int = 0  # cancelled by the client
    deadline_exceeded: int = 0
    unexpected: list[str] = field(default_factory=list)  # "<fate>: <status or problem>"
    generated_tokens: int = 0
    leaked: dict[str, float] = field(default_factory=dict)  # gauge -> value still non-zero after settling
    rss_bytes: int = 0
    threads: int = 0
    seconds: float = 0.0


@dataclass
class StormReport:
    rounds: list[RoundReport]
    server_alive: bool
    max_rss_growth: float

    @property
    def requests_sent(self) -> int:
        return sum(r.streams for r in self.rounds)

    @property
    def rss_growth(self) -> float:
        """Resident memory after the last round relative to the first (warm-up) round."""
        first, last = self.rounds[0].rss_bytes, self.rounds[-1].rss_bytes
        return (last - first) / first if first else 0.0

    def failures(self) -> list[str]:
        out = [] if self.server_alive else ["server process died"]
        for r in self.rounds:
            out += [f"round {r.round}: {u}" for u in r.unexpected]
            out += [f"round {r.round}: {name} = {v:g} after settling" for name, v in r.leaked.items()]
        if len(self.rounds) > 1:
            if self.rss_growth > self.max_rss_growth:
                out.append(f"resident memory grew {self.rss_growth:.1%} after warm-up "
                           f"({self.rounds[0].rss_bytes} -> {self.rounds[-1].rss_bytes} bytes)")
            if self.rounds[-1].threads > self.rounds[0].threads:
                out.append(f"thread count grew {self.rounds[0].threads} -> {self.rounds[-1].threads}")
        return out

    def summary(self) -> dict[str, object]:
        return {
            "requests_sent": self.requests_sent,
            "completed": sum(r.completed for r in self.rounds),
            "cancelled": sum(r.cancelled for r in self.rounds),
            "deadline_exceeded": sum(r.deadline_exceeded for r in self.rounds),
            "generated_tokens": sum(r.generated_tokens for r in self.rounds),
            "unexpected": sum(len(r.unexpected) for r in self.rounds),
            "crashes": 0 if self.server_alive else 1,
            "leaked_cache_bytes": max((r.leaked.get("reformer_cache_bytes_in_use", 0.0) for r in self.rounds),
                                      default=0.0),
            "rss_bytes_per_round": [r.rss_bytes for r in self.rounds],
            "rss_growth_after_warmup": round(self.rss_growth, 4),
            "threads_per_round": [r.threads for r in self.rounds],
            "seconds_per_round": [round(r.seconds, 2) for r in self.rounds],
        }


# ---- the server as seen from outside ---------------------------------------------------------------------
def proc_status(pid: int) -> tuple[int, int]:
    """(resident bytes, thread count) of a process, from /proc/<pid>/status."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


def read_gauges(metrics_port: int, names: tuple[str, ...] = SETTLED_GAUGES) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = dict.fromkeys(names, 0.0)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in values:
                values[s.name] += s.value
    return values


async def settle(metrics_port: int, timeout: float = SETTLE_TIMEOUT_S) -> dict[str, float]:
    """Wait until every SETTLED_GAUGE reads 0; return those that still do not after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        values = await asyncio.to_thread(read_gauges, metrics_port)
        leaked = {k: v for k, v in values.items() if v != 0}
        if not leaked or time.monotonic() > deadline:
            return leaked
        await asyncio.sleep(0.05)


# ---- one stream, one round -------------------------------------------------------------------------------
def random_request(rng: random.Random, max_prompt: int, max_new_tokens: int) -> pb.GenerateRequest:
    n = rng.randint(1, max_prompt)
    req = pb.GenerateRequest(
        token_ids=[rng.randrange(3, 258) for _ in range(n)],
        max_new_tokens=rng.randint(1, max_new_tokens),
        ignore_eos=rng.random() < 0.8,
    )
    if rng.random() < 0.3:
        req.temperature = 0.0
    else:
        req.seed = rng.randrange(2**31)
        req.top_p = rng.choice([1.0, 0.9])
    if rng.random() < 0.2:
        req.logprobs = rng.randint(1, 5)
    return req


async def one_stream(stub: pb_grpc.TextGenerationStub, req: pb.GenerateRequest, fate: str,
                     rng: random.Random) -> tuple[str, int]:
    """Run one stream with its fate; returns (outcome, generated tokens), outcome one of completed /
    cancelled / deadline / 'unexpected: ...'."""
    timeout = rng.uniform(0.02, 0.5) if fate == "deadline" else 120.0
    cancel_after = rng.randint(0, 5) if fate == "cancel" else -1
    call = stub.GenerateStream(req, timeout=timeout)
    tokens = 0
    final: pb.GenerateStreamResponse | None = None
    try:
        if cancel_after == 0:
            call.cancel()
        seen = 0
        async for msg in call:
            seen += 1
            tokens += len(msg.token_ids)
            if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                final = msg
            if seen == cancel_after:
                call.cancel()
                break
    except asyncio.CancelledError:
        return "cancelled", tokens  # grpc.aio raises CancelledError when the caller cancelled the call
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED and fate == "cancel":
            return "cancelled", tokens
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and fate == "deadline":
            return "deadline", tokens
        return f"unexpected: {e.code().name}: {e.details()}", tokens
    if fate == "cancel" and final is None:
        return "cancelled", tokens
    if final is None:
        return "unexpected: stream ended without a final message", tokens
    if final.usage.generated_tokens != tokens:
        return f"unexpected: final usage says {final.usage.generated_tokens} tokens, {tokens} arrived", tokens
    return "completed", tokens


async def storm_round(targets: list[str], index: int, streams: int, rng: random.Random, *, max_prompt: int,
                      max_new_tokens: int, pid: int, metrics_port: int) -> RoundReport:
    report = RoundReport(round=index, streams=streams)
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    t0 = time.perf_counter()
    try:
        stubs = [pb_grpc.TextGenerationStub(ch) for ch in channels]
        jobs = []
        for i in range(streams):
            fate = rng.choices(FATES, weights=(0.5, 0.25, 0.25))[0]
            req = random_request(rng, max_prompt, max_new_tokens)
            jobs.append((fate, one_stream(stubs[i % len(stubs)], req, fate, random.Random(rng.random()))))
        results = await asyncio.gather(*(j for _f, j in jobs))
    finally:
        for ch in channels:
            await ch.close()
    report.seconds = time.perf_counter() - t0
    for (fate, _j), (outcome, tokens) in zip(jobs, results, strict=True):
        report.generated_tokens += tokens
        if outcome == "completed":
            report.completed += 1
        elif outcome == "cancelled":
            report.cancelled += 1
        elif outcome == "deadline":
            report.deadline_exceeded += 1
        else:
            report.unexpected.append(f"{fate}: {outcome}")
    report.leaked = await settle(metrics_port)
    report.rss_bytes, report.threads = proc_status(pid)
    return report


async def run_storm(target: str, pid: int, metrics_port: int, *, rounds: int = 5, streams: int = 64,
                    max_prompt: int = 600, max_new_tokens: int = 48, channels: int = 8, seed: int = 0,
                    max_rss_growth: float = 0.10) -> StormReport:
    """`rounds` storm rounds against the server at `target` (process `pid`, metrics on `metrics_port`)."""
    rng = random.Random(seed)
    reports: list[RoundReport] = []
    alive = True
    for i in range(1, rounds + 1):
        try:
            reports.append(await storm_round([target] * channels, i, streams, rng, max_prompt=max_prompt,
                                             max_new_tokens=max_new_tokens, pid=pid, metrics_port=metrics_port))
        except OSError:  # /proc/<pid> or the metrics endpoint gone: the server died
            alive = False
            break
        r = reports[-1]
        logger.info("round %d: %d streams in %.1fs: %d completed, %d cancelled, %d deadline, %d unexpected, "
                    "rss %.1f MiB, %d threads%s", i, r.streams, r.seconds, r.completed, r.cancelled,
                    r.deadline_exceeded, len(r.unexpected), r.rss_bytes / 2**20, r.threads,
                    f", leaked {r.leaked}" if r.leaked else "")
    alive = alive and Path(f"/proc/{pid}").exists()
    return StormReport(reports, alive, max_rss_growth)


# ---- command line ----------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a tiny random model)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-prompt", type=int, default=600, help="prompt lengths are uniform in [1, this]")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--channels", type=int, default=8, help="client connections the streams spread over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from server_fixtures import make_tiny_model, start_server

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_tiny_model(Path(tmp) / "tiny")
        srv = start_server(model_dir, Path(tmp) / "server", "--prefill-chunk-tokens", "64")
        try:
            report = asyncio.run(run_storm(
                srv.target, srv.proc.pid, srv.metrics_port, rounds=args.rounds, streams=args.streams,
                max_prompt=args.max_prompt, max_new_tokens=args.max_new_tokens, channels=args.channels,
                seed=args.seed, max_rss_growth=args.max_rss_growth))
        finally:
            code = srv.stop()
        summary = {"command": " ".join(sys.argv), **report.summary(), "server_exit_code": code,
                   "failures": report.failures()}
        if code != 0:
            summary["failures"].append(f"server exited with {code}")
            logger.error("server log:\n%s", srv.log()[-4000:])
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

