"""Serving-overhead benchmark (not a test): generated tokens/s through gRPC and through the OpenAI-compatible
HTTP API vs through the engine directly.

    python bench/bench_serving.py                        # random "small" model, 1 and 16 streams
    python bench/bench_serving.py --model DIR --streams 1 4 16 --new-tokens 256

For each stream count N, N requests (prompt --prompt-len random bytes, --new-tokens each, sampled with
per-request seeds, eos ignored) start at once; aggregate tokens/s = all generated tokens / wall time from
the first submission to the last final event (prefills included).

  engine-direct: `Engine.add_request` in this process, events consumed by asyncio tasks;
  gRPC:          the real `reformer-server` in a subprocess (same engine settings), consumed by the SDK's
                 `AsyncClient.generate_stream` over loopback.
  HTTP:          the same server's `--http-port`: POST /v1/completions with `stream: true`, one HTTP/1.1
                 connection per stream (httpx), every server-sent event parsed as JSON.

All are up at once (an idle engine sleeps on a condition variable) and their rounds alternate, so a
change in background load hits them alike; after a warm-up, the best of --repeat rounds is kept for each.
Since tokens/s on a shared machine moves with other processes' load, the server's own CPU time per generated
token (its `reformer_process_cpu_seconds_total` before and after each round, averaged over the rounds) is
reported for the two served paths as well: the engine's work is the same in both, so the difference is what
the front-end costs.
Client and server share the machine's cores, as an application on the same host would.
Prints a markdown table; every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "server", ROOT / "clients" / "python", ROOT / "tests"):
    if str(_p) not in sys.path:  # a plain checkout works without `pip install -e`
        sys.path.append(str(_p))

import httpx  # noqa: E402
import torch  # noqa: E402
from reformer_client import AsyncClient, Finished, TextChunk  # noqa: E402
from server_fixtures import ServerProcess, start_server  # noqa: E402  (the tests' subprocess launcher)

from reformer_infer import ReformerConfig, ReformerLM, load_model, save_model  # noqa: E402
from reformer_infer.engine import Engine, EngineConfig, RequestStream  # noqa: E402
from reformer_infer.requests import SamplingParams, TokenEvent  # noqa: E402

logger = logging.getLogger("bench_serving")

# A 6-layer model at a quarter of enwik8's width: big enough that a step costs what a step costs (matmuls,
# not Python), small enough to run in minutes on a 2-core CPU.
SMALL = ReformerConfig(
    attn_layers=["local", "lsh", "local", "lsh", "local", "lsh"],
    hidden_size=256,
    feed_forward_size=1024,
    num_attention_heads=4,
    attention_head_size=64,
    num_hashes=2,
    num_buckets=64,
    lsh_attn_chunk_length=64,
    local_attn_chunk_length=64,
    axial_pos_shape=[64, 64],
    axial_pos_embds_dim=[64, 192],
    max_position_embeddings=4096,
    vocab_size=258,
)
CACHE_BUDGET = 2**31


def random_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 258) for _ in range(n)]


TEMPERATURE = 1.0  # of every stream (--temperature)


def _requests(n: int, prompt_len: int) -> list[list[int]]:
    return [random_prompt(prompt_len, i) for i in range(n)]


async def direct_round(engine: Engine, n: int, prompt_len: int, new_tokens: int) -> float:
    """N requests submitted at once to the in-process engine; aggregate generated tokens/s."""
    t0 = time.perf_counter()
    handles = [engine.add_request(p, SamplingParams(max_new_tokens=new_tokens, seed=i, ignore_eos=True,
                                                         temperature=TEMPERATURE))
               for i, p in enumerate(_requests(n, prompt_len))]

    async def consume(stream: RequestStream) -> int:
        return sum([len(ev.token_ids) async for ev in stream if isinstance(ev, TokenEvent)])

    tokens = sum(await asyncio.gather(*(consume(h) for h in handles)))
    return tokens / (time.perf_counter() - t0)


async def grpc_round(client: AsyncClient, n: int, prompt_len: int, new_tokens: int) -> float:
    """N concurrent GenerateStream calls through the SDK; aggregate generated tokens/s."""

    async def one(i: int, prompt: list[int]) -> int:
        count = 0
        async for ev in client.generate_stream(prompt, max_new_tokens=new_tokens, seed=i, ignore_eos=True,
                                                  temperature=TEMPERATURE):
            if isinstance(ev, TextChunk):
                count += len(ev.token_ids)
            elif isinstance(ev, Finished):
                assert ev.usage.generated_tokens == count == new_tokens
        return count

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(_requests(n, prompt_len)))))
    return tokens / (time.perf_counter() - t0)


async def http_round(client: httpx.AsyncClient, model: str, n: int, prompt_len: int, new_tokens: int) -> float:
    """N concurrent streamed /v1/completions; aggregate generated tokens/s (from each stream's usage chunk)."""

    async def one(i: int, prompt: list[int]) -> int:
        body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "seed": i, "ignore_eos": True,
                "temperature": TEMPERATURE, "stream": True, "stream_options": {"include_usage": True}}
        tokens = 0
        async with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk["usage"] is not None:
                        tokens = chunk["usage"]["completion_tokens"]
        assert tokens == new_tokens
        return tokens

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(_requests(n, prompt_len)))))
    return tokens / (time.perf_counter() - t0)


def _cpu(srv: ServerProcess) -> float:
    return srv.metric("reformer_process_cpu_seconds_total")


async def measure(model_dir: Path, srv: ServerProcess, args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """Alternate direct, gRPC and HTTP rounds so all see the same background load; keep each one's best round."""
    model = load_model(model_dir, device=args.device)
    engine = Engine(model, EngineConfig(max_batch=max(args.streams), max_queue=max(args.streams),
                                        cache_memory_bytes=CACHE_BUDGET, prefill_chunk_tokens=512,
                                        compile_step=args.compile_step))
    engine.start()
    direct: dict[int, float] = {n: 0.0 for n in args.streams}
    served: dict[int, float] = {n: 0.0 for n in args.streams}
    http: dict[int, float] = {n: 0.0 for n in args.streams}
    # CPU seconds summed over rounds: the server's (its process metric) and this client process's own
    # (time.process_time; the in-process engine idles during served rounds)
    cpu = {path: {n: 0.0 for n in args.streams} for path in ("grpc", "http", "grpc_client", "http_client")}
    limits = httpx.Limits(max_connections=max(args.streams), max_keepalive_connections=max(args.streams))
    try:
        async with AsyncClient(srv.target) as client, httpx.AsyncClient(base_url=srv.http_url, timeout=600,
                                                                        limits=limits) as web:
            model = (await web.get("/v1/models")).json()["data"][0]["id"]
            await direct_round(engine, 2, args.prompt_len, 8)  # warm-up every path
            await grpc_round(client, 2, args.prompt_len, 8)
            await http_round(web, model, 2, args.prompt_len, 8)
            for r in range(args.repeat):
                for n in args.streams:
                    direct[n] = max(direct[n], await direct_round(engine, n, args.prompt_len, args.new_tokens))
                    before, client_before = _cpu(srv), time.process_time()
                    served[n] = max(served[n], await grpc_round(client, n, args.prompt_len, args.new_tokens))
                    middle, client_middle = _cpu(srv), time.process_time()
                    http[n] = max(http[n], await http_round(web, model, n, args.prompt_len, args.new_tokens))
                    cpu["grpc"][n] += middle - before
                    cpu["http"][n] += _cpu(srv) - middle
                    cpu["grpc_client"][n] += client_middle - client_before
                    cpu["http_client"][n] += time.process_time() - client_middle
                    logger.info("round %d, %d streams: direct %.1f, gRPC %.1f, HTTP %.1f tok/s", r, n, direct[n],
                                served[n], http[n])
    finally:
        await engine.shutdown(drain=False)
    per_token = {path: {n: 1000 * c / (args.repeat * n * args.new_tokens) for n, c in by_n.items()}
                 for path, by_n in cpu.items()}
    return {"direct": direct, "grpc": served, "http": http, **{f"{k}_cpu_ms": v for k, v in per_token.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint directory (default: a random SMALL model)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy streams")
    p.add_argument("--repeat", type=int, default=3, help="rounds per stream count; the best is reported "
                   "(the least disturbed by other processes)")
    p.add_argument("--compile-step", action="store_true",
                   help="the server and the in-process engine replay compiled steps (EngineConfig.compile_step)")
    p.add_argument("--server-args", default="", help="more reformer-server flags, e.g. '--switch-interval 0.0002'")
    args = p.parse_args()
    global TEMPERATURE
    TEMPERATURE = args.temperature
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The server sets a 0.5 ms GIL switch interval (engine thread + event loop, see reformer_server.__main__);
    # the in-process engine gets the same, or engine-direct would be measured with a handicap.
    sys.setswitchinterval(0.0005)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            torch.manual_seed(0)
            model_dir = Path(tmp) / "small"
            save_model(ReformerLM(SMALL).eval(), model_dir)
        srv = start_server(model_dir, Path(tmp) / "server", "--device", args.device, "--max-batch",
                           str(max(args.streams)), "--max-queue", str(max(args.streams)), "--cache-memory",
                           str(CACHE_BUDGET), "--prefill-chunk-tokens", "512", "--log-level", "WARNING",
                           "--http-port", "0", *(["--compile-step", "true"] if args.compile_step else []),
                           *args.server_args.split(),
                           env={"OMP_NUM_THREADS": str(torch.get_num_threads())})  # same threads as direct
        try:
            result = asyncio.run(measure(model_dir, srv, args))
        finally:
            srv.stop()

    direct, grpc_, http = result["direct"], result["grpc"], result["http"]
    single_direct, single_grpc = direct[min(args.streams)], grpc_[min(args.streams)]
    print(f"\nServing overhead: {args.prompt_len}-token prompts, {args.new_tokens} new tokens each, "
          f"{'random SMALL model' if args.model is None else args.model}, {args.device}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})\n")
    print("| streams | engine-direct tok/s | gRPC tok/s | HTTP tok/s | gRPC / direct | HTTP / gRPC | "
          "gRPC vs 1-stream gRPC | server CPU ms/token gRPC | HTTP | client CPU ms/token gRPC | HTTP |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.streams:
        print(f"| {n} | {direct[n]:.1f} | {grpc_[n]:.1f} | {http[n]:.1f} | {grpc_[n] / direct[n]:.2f} | "
              f"{http[n] / grpc_[n]:.2f} | {grpc_[n] / single_grpc:.1f}x | {result['grpc_cpu_ms'][n]:.3f} | "
              f"{result['http_cpu_ms'][n]:.3f} | {result['grpc_client_cpu_ms'][n]:.3f} | "
              f"{result['http_client_cpu_ms'][n]:.3f} |")
    print(f"\n(engine-direct {max(args.streams)}-stream scaling: {direct[max(args.streams)] / single_direct:.1f}x)")


if __name__ == "__main__":
    main()
