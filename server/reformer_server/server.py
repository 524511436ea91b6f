"""Server assembly and lifecycle: bind, load, warm up, serve, drain.

    start: metrics endpoint and gRPC port come up first, health NOT_SERVING (probes see "loading")
    load:  the model (in a worker thread, the event loop keeps answering health), then the engine
    warm:  one short generation through the engine, then health SERVING
    drain: on SIGTERM/SIGINT health goes NOT_SERVING and new generations get UNAVAILABLE; after
           --drain-announce seconds the gRPC server stops accepting (GOAWAY on every connection, listener
           closed), so round-robin clients move to other replicas at once while running streams go on;
           they finish within --grace-period, then what is left is cancelled (their handlers abort the
           engine requests) and the engine shuts down. A second signal cuts the grace period short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from reformer_infer.requests import RequestBounds
from reformer_server import backend as backends
from reformer_server import model_info
from reformer_server.auth import BearerTokenInterceptor, server_credentials
from reformer_server.config import ServerConfig
from reformer_server.convert import RequestLimits
from reformer_server.malformed import MalformedRequestInterceptor
from reformer_server.metrics import ServerMetrics
from reformer_server.openai_api import OpenAIFrontend
from reformer_server.servicer import TextGenerationServicer

from ._proto import generation_pb2 as pb
from ._proto import generation_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name  # "reformer.v1.TextGeneration"
_HEALTH_NAMES = ("", SERVICE_NAME)
RPC_HEADROOM = 64  # RPCs beyond --max-concurrent-streams kept for health, model info, tokenize, cancel


def grpc_options(cfg: ServerConfig) -> list[tuple[str, Any]]:
    """Channel arguments: explicit message limits and keepalive rules that let a client ping through a
    long, silent 64K-token prefill without being sent GOAWAY "too_many_pings" (notes/serving.md).

    --max-concurrent-streams is enforced by the servicer (RESOURCE_EXHAUSTED), not by the HTTP/2
    per-connection setting `grpc.max_concurrent_streams`: with that, the streams of one connection beyond
    the limit waited silently in the client until their deadline (tests/test_reliability_limits.py)."""
    min_ping_ms = int(cfg.keepalive_min_ping_interval * 1000)
    return [
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),  # the server pings idle connections to find dead peers
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.http2.max_pings_without_data", 0),  # a prefill sends no data for minutes; keep pinging
        ("grpc.http2.max_ping_strikes", 2),
    ]


def default_cache_memory(device: str) -> int:
    """80% of free GPU memory after loading the model; on CPU 25% of available RAM, at most 16 GiB."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.8)
    available = 4 * 2**30
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return int(min(available * 0.25, 16 * 2**30))


class ReformerServer:
    """One server process: the gRPC server, health, metrics, the engine, and their lifecycle."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        # The *_created series double every counter's output and no dashboard here uses them.
        prometheus_client.disable_created_metrics()
        self.metrics = ServerMetrics(backend=cfg.backend)
        self.health = health.aio.HealthServicer()
        self.servicer = TextGenerationServicer(
            self.metrics, stall_timeout=cfg.stall_timeout, max_streams=cfg.max_concurrent_streams,
            max_streams_per_client=cfg.max_streams_per_client, allow_client_priority=cfg.allow_client_priority,
            priority_tokens=cfg.priority_tokens, tokens_checked=bool(cfg.auth_token))
        self.engine: Any = None
        self.port = 0
        self.metrics_port = -1
        self.http_port = -1
        self.serving = False  # what the health service says, for the HTTP front-end's /health and /ready
        self.http: OpenAIFrontend | None = None
        if cfg.http_port >= 0:
            self.http = OpenAIFrontend(
                self.servicer, ready=lambda: self.serving, auth_token=cfg.auth_token, auth_health=cfg.auth_health,
                stall_timeout=cfg.stall_timeout, max_body_bytes=cfg.max_message_bytes, count=self.metrics.http_done)
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None  # drain()'s server.stop(grace)
        interceptors = []
        if cfg.auth_token:
            interceptors.append(BearerTokenInterceptor(
                cfg.auth_token,
                also=cfg.priority_tokens,
                exempt_health=not cfg.auth_health,
                on_reject=lambda method: self.metrics.rpc_done(method.rsplit("/", 1)[-1], "UNAUTHENTICATED"),
            ))
        interceptors.append(MalformedRequestInterceptor())  # after auth: a denied call's bytes parse safely too
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=grpc_options(cfg),
            # The generation limit is the servicer's (RESOURCE_EXHAUSTED "server overloaded"); grpc's own
            # limiter counts every RPC, so at the same number it refused health probes of a busy server
            # (a liveness restart under load). It stays as a backstop with room for probes and info calls.
            maximum_concurrent_rpcs=cfg.max_concurrent_streams + RPC_HEADROOM,
        )
        pb_grpc.add_TextGenerationServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if cfg.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server,
            )

    # ---- lifecycle ------------------------------------------------------------------------------
    async def _set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in _HEALTH_NAMES:
            await self.health.set(name, status)

    async def start(self) -> None:
        cfg = self.cfg
        await self._set_serving(False)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls:
            assert cfg.tls_cert is not None and cfg.tls_key is not None
            creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        await self.server.start()
        if cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.start_http(cfg.metrics_host or cfg.host, cfg.metrics_port)
        logger.info("gRPC listening on %s:%d (%s); loading the model", cfg.host, self.port, "TLS" if cfg.tls else
                    "plaintext")
        if self.http is not None:
            sock = self.http.bind(cfg.host, cfg.http_port)
            self.http_port = sock.getsockname()[1]
            await self.http.start(sock, tls_cert=_str(cfg.tls_cert), tls_key=_str(cfg.tls_key),
                                  tls_client_ca=_str(cfg.tls_client_ca))
            logger.info("OpenAI-compatible HTTP API on %s:%d (%s)", cfg.host, self.http_port,
                        "TLS" if cfg.tls else "plaintext")
        if cfg.port_file is not None:
            tmp = cfg.port_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"port": self.port, "metrics_port": self.metrics_port,
                                       "http_port": self.http_port}))
            tmp.replace(cfg.port_file)  # atomic: a reader never sees half a file

    async def load(self) -> None:
        """Load the model and start the engine (the event loop keeps serving health meanwhile)."""
        from reformer_infer.engine import Engine, EngineConfig
        from reformer_infer.memory import freeze_startup_objects

        cfg = self.cfg
        if cfg.model is None:
            from reformer_infer import default_model_path

            model_dir = Path(default_model_path())
        else:
            model_dir = cfg.model
        device = backends.resolve_device(cfg.device)
        dtype = backends.resolve_dtype(cfg.dtype, device, cfg.backend)
        model = await asyncio.to_thread(backends.load_backend, cfg.backend, model_dir, device, dtype)
        budget = cfg.cache_memory if cfg.cache_memory is not None else default_cache_memory(device)
        engine = Engine(model, EngineConfig(
            max_batch=cfg.max_batch,
            max_queue=cfg.max_queue,
            cache_memory_bytes=budget,
            prefill_chunk_tokens=cfg.prefill_chunk_tokens,  # None: the engine sizes it for the device
            max_context=cfg.max_context,
            max_new_tokens_limit=cfg.max_new_tokens_limit,
            stream_buffer_events=cfg.stream_buffer_events,
            stream_interval=cfg.stream_interval,
            arrival_window_s=cfg.arrival_window,
            cuda_graphs=cfg.cuda_graphs,
            compile_step=cfg.compile_step,
            overlap_steps=cfg.overlap_steps,
            bounds=RequestBounds(max_stop_strings=cfg.max_stop_strings, max_stop_string_bytes=cfg.max_stop_string_bytes,
                                 max_stop_token_ids=cfg.max_stop_token_ids),
            long_prompt_tokens=cfg.long_prompt_tokens,
            short_prompt_slots=cfg.short_prompt_slots or 0,
            queue_aging_rate=cfg.queue_aging_rate,
            max_queue_time_s=cfg.max_queue_time,
            context_memory_bytes=min(cfg.context_memory, budget) if cfg.context_memory is not None else budget // 2,
            max_context_ttl_s=cfg.max_context_ttl,
            default_context_ttl_s=cfg.default_context_ttl,
            prefix_caching=cfg.prefix_caching,
        ))
        engine.start()
        self.engine = engine
        config, config_json = model_info.config_dict(model, model_dir)
        desc = model_info.ModelDescription(
            name=model_dir.name,
            config=config,
            config_json=config_json,
            rotation_fingerprint=model_info.rotation_fingerprint(model),
            device=_model_device(model, device),
            dtype=dtype,
            backend=cfg.backend,
            max_context=engine.max_context,
            max_new_tokens_limit=cfg.max_new_tokens_limit,
            default_max_new_tokens=cfg.default_max_new_tokens,
            max_batch=cfg.max_batch,
            max_queue=cfg.max_queue,
            cache_memory_bytes=budget,
            max_message_bytes=cfg.max_message_bytes,
            num_parameters=model_info.num_parameters(model),
            server_version=model_info.server_version(),
            tokenizer=model_info.tokenizer_info(engine.tokenizer),
            context_memory_bytes=engine.context_memory_bytes,
            max_context_ttl_s=cfg.max_context_ttl,
            default_context_ttl_s=cfg.default_context_ttl,
            prefix_caching=engine.prefix_caching,
        )
        self.metrics.bind_engine(engine.stats)
        self.metrics.set_model(desc.name, cfg.backend, {"device": desc.device, "dtype": dtype,
                                                         "fingerprint": desc.rotation_fingerprint[:16],
                                                         "tokenizer": desc.tokenizer.kind})
        if device.startswith("cuda"):
            self.metrics.bind_cuda(desc.device)
        if cfg.warmup:
            await self._warm_up(engine)
        self.servicer.attach(engine, desc, RequestLimits(
            max_context=engine.max_context, default_max_new_tokens=cfg.default_max_new_tokens,
            max_prompt_bytes=cfg.max_prompt_bytes, max_time_s=cfg.max_request_time, bounds=engine.config.bounds))
        freeze_startup_objects()  # no ~50 ms full-GC pauses inside engine steps from here on
        await self._set_serving(True)
        logger.info("serving %s (%s, %s, backend %s, tokenizer %s, cache budget %d bytes) on %s:%d", desc.name,
                    desc.device, dtype, cfg.backend, desc.tokenizer.kind, budget, cfg.host, self.port)

    async def _warm_up(self, engine: Any) -> None:
        """First-call costs before SERVING (`Engine.warm_up`: a short generation, then every greedy batch bucket's
        recorded step when steps are recorded: CUDA graphs, or --compile-step)."""
        t0 = time.monotonic()
        recorded = await engine.warm_up()
        logger.info("warm-up done in %.1f s (%d decode steps recorded)", time.monotonic() - t0, recorded)

    async def _watch_engine(self) -> None:
        """A dead engine loop turns health NOT_SERVING so orchestrators restart or route around us."""
        while not self._stop.is_set():
            await asyncio.sleep(1.0)
            if self.engine is not None and not self.engine.stats().alive:
                logger.error("engine loop has died; reporting NOT_SERVING")
                await self._set_serving(False)
                return

    def request_stop(self) -> None:
        if self._stop.is_set():
            logger.warning("second signal: cancelling running streams now")
            self._force.set()
        self._stop.set()

    async def run(self) -> None:
        """Start, load, serve until a signal, then drain and stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread / platform
                loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        load = asyncio.ensure_future(self.load())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
        if load.done() and load.exception() is not None:
            stop.cancel()
            await self.close()
            raise load.exception()  # type: ignore[misc]
        watch = asyncio.ensure_future(self._watch_engine())
        await stop
        if not load.done():
            logger.info("stop requested while loading; waiting for the load to finish")
            with contextlib.suppress(Exception):
                await load
        watch.cancel()
        await self.drain()
        await self.close()

    async def drain(self) -> None:
        grace = self.cfg.grace_period
        logger.info("draining: NOT_SERVING, refusing new requests, %d running get up to %.0fs",
                    len(self.servicer.active), grace)
        self.servicer.draining = True
        self.serving = False
        await self.health.enter_graceful_shutdown()
        force = asyncio.ensure_future(self._force.wait())
        # A moment in which probes on a still-open port read NOT_SERVING rather than a refused connection.
        announce = min(self.cfg.drain_announce, grace)
        await asyncio.wait({force}, timeout=announce)
        remaining = max(grace - announce, 0.0)
        # stop(grace) sends GOAWAY and closes the listener now: clients stop sending new RPCs here (a
        # round-robin channel moves to the other replicas) instead of getting UNAVAILABLE for the whole
        # grace period, while the streams already running continue.
        self._stopping = asyncio.ensure_future(self.server.stop(remaining))
        if self.http is not None:
            self.http.begin_shutdown()  # the HTTP listener closes too; running responses go on
        idle = asyncio.ensure_future(self.servicer.wait_idle(remaining))
        await asyncio.wait({idle, force}, return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        if not (idle.done() and idle.result()):
            idle.cancel()
            logger.warning("grace period over: cancelling %d running streams", len(self.servicer.active))

    async def close(self) -> None:
        # stop(grace): refuse new RPCs, give handlers a moment, then cancel them (their finally aborts). A
        # stop already under way from drain() (with the longer grace) is cut short by this one; RPCs that
        # are not generations (a health Watch) therefore never hold the shutdown for the whole grace period.
        await self.server.stop(grace=1.0)
        if self._stopping is not None:
            await self._stopping
        if self.http is not None:
            await self.http.stop(timeout=1.0)
        if self.engine is not None:
            await self.engine.shutdown(drain=False, timeout=5.0)
        self.metrics.stop_http()
        logger.info("stopped")


async def serve(cfg: ServerConfig) -> None:
    await ReformerServer(cfg).run()


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _model_device(model: Any, fallback: str) -> str:
    """The device the weights ended up on ("cuda:0" rather than "cuda")."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if params is not None else None
    return str(first.device) if first is not None else fallback
