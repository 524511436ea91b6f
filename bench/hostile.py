"""Hostile load against a real `reformer-server` on the bundled model (issue 18): head-of-line blocking and
a stop-string bomb. Prints one JSON summary.

    OMP_NUM_THREADS=1 python bench/hostile.py                      # both parts, default server flags
    python bench/hostile.py --part flood --long 24 --long-bytes 60000
    python bench/hostile.py --part bomb --stop-strings 200000
    python bench/hostile.py --code-root /tmp/base                  # the server from another checkout

flood  `--long` requests with `--long-bytes`-byte prompts are sent at once; when the server has them all
       (running + waiting), one `--short-bytes`-byte request follows, then `--shorts` - 1 more, one every
       `--short-interval` seconds while the flood lasts. Reported: the short requests' times to first token
       (from sending each), the long requests' first-token and end times (they must all finish: the aging
       rule), the engine's queue when the first short one was sent.
bomb   a neighbour stream decodes (`--neighbour-tokens` tokens); after its first 50 tokens, `--bombs`
       requests with `--stop-strings` stop strings each are sent (pre-serialised, from another thread, so
       the client's own Python does not show up in the neighbour's gaps). Each must be refused with
       INVALID_ARGUMENT. Reported: the neighbour's largest inter-token gap (client receive times) before,
       during (first bomb sent .. last bomb answered + 0.5 s) and after the bombs.
After both: the server's cache bytes in use, running, waiting and open streams must read 0.

Server flags are the defaults, except `--cache-memory`, which the test helper sets; it is set here to the
default's own rule (25 % of available RAM, at most 16 GiB) and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "server", ROOT / "clients" / "python", ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.append(str(_p))

import grpc  # noqa: E402
from reformer_server._proto import generation_pb2 as pb  # noqa: E402
from reformer_server._proto import generation_pb2_grpc as pb_grpc  # noqa: E402

SETTLED = ("reformer_cache_bytes_in_use", "reformer_num_requests_running", "reformer_num_requests_waiting",
           "reformer_grpc_streams_open")
CALL_TIMEOUT_S = 1800.0


def _text(n: int, salt: int = 0) -> str:
    base = f"[{salt}] It is a truth universally acknowledged, that a single man in possession of a good fortune. "
    return (base * (n // len(base) + 1))[:n]


async def flood(target: str, srv: Any, args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 2**20)]) as ch:
        stub = pb_grpc.TextGenerationStub(ch)
        t0 = time.monotonic()

        async def one(text: str) -> tuple[float, float]:
            sent = time.monotonic()
            first = None
            async for msg in stub.GenerateStream(pb.GenerateRequest(text=text, max_new_tokens=args.new_tokens,
                                                                    ignore_eos=True), timeout=CALL_TIMEOUT_S):
                if msg.token_ids and first is None:
                    first = time.monotonic() - sent
            assert first is not None
            return first, time.monotonic() - t0

        longs = [asyncio.ensure_future(one(_text(args.long_bytes, i))) for i in range(args.long)]
        while srv.metric("reformer_num_requests_running") + srv.metric("reformer_num_requests_waiting") < args.long:
            await asyncio.sleep(0.01)
        queued = {"running": srv.metric("reformer_num_requests_running"),
                  "waiting": srv.metric("reformer_num_requests_waiting")}
        short_sent = time.monotonic() - t0
        shorts = [await one(_text(args.short_bytes, 999))]
        for k in range(1, args.shorts):  # more short requests, `--short-interval` apart, while the flood runs
            await asyncio.sleep(max(0.0, short_sent + k * args.short_interval - (time.monotonic() - t0)))
            if all(f.done() for f in longs):
                break
            shorts.append(await one(_text(args.short_bytes, 999 - k)))
        results = await asyncio.gather(*longs)
        firsts = [f for f, _ in shorts]
    return {
        "long_requests": args.long, "long_prompt_bytes": args.long_bytes, "short_prompt_bytes": args.short_bytes,
        "new_tokens": args.new_tokens, "queued_when_short_sent": queued, "short_sent_at_s": round(short_sent, 3),
        "short_first_token_s": round(shorts[0][0], 3), "short_end_at_s": round(shorts[0][1], 3),
        "short_requests": len(shorts), "short_interval_s": args.short_interval,
        "all_short_first_token_s": {"median": round(statistics.median(firsts), 3), "max": round(max(firsts), 3),
                                    "each": [round(f, 3) for f in firsts]},
        "long_first_token_s": {"min": round(min(r[0] for r in results), 2),
                               "median": round(statistics.median(r[0] for r in results), 2),
                               "max": round(max(r[0] for r in results), 2)},
        "long_all_finished_at_s": round(max(r[1] for r in results), 2),
    }


async def bomb(target: str, args: argparse.Namespace) -> dict[str, Any]:
    payload = pb.GenerateRequest(text="bomb", max_new_tokens=4, stop=[f"stop-{i:07d}" for i in range(args.stop_strings)])
    raw = payload.SerializeToString()
    outcomes: list[tuple[str, float, str]] = []  # (status, seconds to the answer, details)
    window: list[float] = []

    def send_bombs() -> None:
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 2**20)]) as ch:
            call = ch.unary_unary("/reformer.v1.TextGeneration/Generate")  # raw bytes: no client-side serialising
            window.append(time.monotonic())
            for _ in range(args.bombs):
                t = time.monotonic()
                try:
                    call(raw, timeout=120)
                    outcomes.append(("OK (accepted)", time.monotonic() - t, ""))
                except grpc.RpcError as e:
                    outcomes.append((e.code().name, time.monotonic() - t, e.details()[:90]))
            window.append(time.monotonic())

    stamps: list[float] = []
    bomber = threading.Thread(target=send_bombs)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.TextGenerationStub(ch)
        req = pb.GenerateRequest(text="Elizabeth", max_new_tokens=args.neighbour_tokens, ignore_eos=True, temperature=0)
        async for msg in stub.GenerateStream(req, timeout=CALL_TIMEOUT_S):
            if msg.token_ids:
                stamps.append(time.monotonic())
                if len(stamps) == 50:
                    bomber.start()
    bomber.join()
    gaps = [(b - a, b) for a, b in zip(stamps, stamps[1:], strict=False)]
    start, end = window[0], window[1] + 0.5
    before = [g for g, t in gaps if t < start]
    during = [g for g, t in gaps if start <= t <= end]
    after = [g for g, t in gaps if t > end]

    def summary(xs: list[float]) -> dict[str, float]:
        return {"tokens": len(xs), "median_gap_s": round(statistics.median(xs), 4) if xs else 0.0,
                "max_gap_s": round(max(xs), 4) if xs else 0.0}

    return {"stop_strings": args.stop_strings, "request_bytes": len(raw), "bombs": args.bombs,
            "outcomes": sorted({f"{code}: {details}" for code, _, details in outcomes}),
            "answer_s": [round(t, 3) for _, t, _ in outcomes],
            "neighbour_before": summary(before), "neighbour_during": summary(during),
            "neighbour_after": summary(after), "bomb_window_s": round(end - start, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("flood", "bomb", "both"), default="both")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--code-root", type=Path, help="run the server from this checkout (e.g. main, to compare)")
    parser.add_argument("--long", type=int, default=24)
    parser.add_argument("--long-bytes", type=int, default=60_000)
    parser.add_argument("--short-bytes", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens of the flood's requests")
    parser.add_argument("--shorts", type=int, default=6, help="short requests: the first once the flood is queued")
    parser.add_argument("--short-interval", type=float, default=15.0, help="seconds between the short requests")
    parser.add_argument("--stop-strings", type=int, default=200_000)
    parser.add_argument("--bombs", type=int, default=5)
    parser.add_argument("--neighbour-tokens", type=int, default=1000)
    parser.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()

    import server_fixtures
    from reformer_server.server import default_cache_memory
    from server_fixtures import start_server

    if args.code_root is not None:  # the subprocess server imports from there
        root = args.code_root.resolve()
        server_fixtures._PATHS[:] = [str(root), str(root / "server"), str(root / "clients" / "python")]
    cache = default_cache_memory("cpu")
    out: dict[str, Any] = {"command": " ".join(["python", "bench/hostile.py", *sys.argv[1:]]),
                           "server_code": str(args.code_root or ROOT), "cache_memory_bytes": cache,
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as tmp:
        srv = start_server(args.model, Path(tmp) / "server", "--cache-memory", str(cache), *args.server_arg)
        try:
            if args.part in ("bomb", "both"):
                out["bomb"] = asyncio.run(bomb(srv.target, args))
            if args.part in ("flood", "both"):
                out["flood"] = asyncio.run(flood(srv.target, srv, args))
            out["settled"] = {g: srv.wait_metric(g, 0.0, timeout=30) for g in SETTLED}
        finally:
            out["server_exit_code"] = srv.stop()
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if out["server_exit_code"] == 0 and not any(out["settled"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
