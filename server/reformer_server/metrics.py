"""Prometheus metrics: an adapter over the serving path and `Engine.stats()` (the engine itself knows nothing of
Prometheus). Names follow vLLM's with a `reformer_` prefix; token-count buckets reach 65536 (64K contexts)
and latency buckets reach the tens of minutes a 64K prefill on a slow device can take.

Labels are bounded: model name, backend, finish reason, RPC method and status code; never a request id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily

from reformer_infer.requests import EngineStats, FinishEvent

logger = logging.getLogger(__name__)

# Latency: from sub-millisecond decode steps to a 64K-token prefill on CPU.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
    160.0, 320.0, 640.0, 1280.0, 2560.0,
)
PER_TOKEN_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
    5.0, 10.0, 20.0,
)
TOKEN_BUCKETS = tuple(float(2**i) for i in range(0, 17))  # 1 .. 65536


class ServerMetrics:
    """All metrics of one server, in their own registry (so tests can run several servers in one process)."""

    def __init__(self, model_name: str = "", backend: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        lb = ("model", "backend")
        self._labels = {"model": model_name, "backend": backend}
        ProcessCollector(namespace="reformer", registry=r)  # reformer_process_resident_memory_bytes, cpu, fds
        self.time_to_first_token = Histogram(
            "reformer_time_to_first_token_seconds", "Request arrival to its first generated token (as served)",
            lb, buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "reformer_inter_token_latency_seconds", "Time between consecutive generated tokens, one observation "
            "per token", lb, buckets=PER_TOKEN_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "reformer_request_time_per_output_token_seconds", "Per request: decode time / (generated tokens - 1)",
            lb, buckets=PER_TOKEN_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "reformer_e2e_request_latency_seconds", "Request arrival to its last message", lb,
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "reformer_request_queue_time_seconds", "Time waiting for admission (engine-measured)", lb,
            buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram(
            "reformer_request_prefill_time_seconds", "Admission to first token (engine-measured)", lb,
            buckets=LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram(
            "reformer_request_decode_time_seconds", "First token to last token", lb,
            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram(
            "reformer_request_prompt_tokens", "Prompt length of admitted requests", ("model",),
            buckets=TOKEN_BUCKETS, registry=r)
        self.generation_len = Histogram(
            "reformer_request_generation_tokens", "Generated tokens per finished request", ("model",),
            buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "reformer_prompt_tokens", "Prompt tokens of finished requests", ("model",), registry=r)
        self.generation_tokens = Counter(
            "reformer_generation_tokens", "Generated tokens", ("model",), registry=r)
        self.request_finished = Counter(
            "reformer_request_success", "Finished generations by finish reason", ("model", "finish_reason"),
            registry=r)
        self.rpc_status = Counter(
            "reformer_grpc_requests", "Completed RPCs by method and status code", ("method", "code"), registry=r)
        self.running = Gauge("reformer_num_requests_running", "Requests being prefilled or decoded", registry=r)
        self.waiting = Gauge("reformer_num_requests_waiting", "Requests waiting for admission", registry=r)
        self.cache_in_use = Gauge("reformer_cache_bytes_in_use", "Cache bytes held by admitted requests", registry=r)
        self.cache_budget = Gauge("reformer_cache_bytes_budget", "Cache byte budget for admission", registry=r)
        # The gateway's KV-cache utilisation signal (vLLM's kv_cache_usage_perc, 0-1), for the endpoint picker.
        self.cache_usage = Gauge("reformer_cache_usage_ratio", "Cache bytes in use / cache byte budget (0-1)",
                                 registry=r)
        self.engine_alive = Gauge("reformer_engine_alive", "1 while the engine loop runs", registry=r)
        self.contexts = Gauge("reformer_contexts", "Live contexts (CreateContext, not deleted or expired)",
                              registry=r)
        self.context_cache = Gauge("reformer_context_cache_bytes", "Cache bytes pinned by contexts (counted in "
                                   "reformer_cache_bytes_in_use too; a deleted context's until its last request "
                                   "ends)", registry=r)
        self.streams_open = Gauge("reformer_grpc_streams_open", "Generations in progress (gRPC and HTTP)", registry=r)
        self.http_status = Counter(
            "reformer_http_requests", "Completed HTTP API requests by route and status", ("route", "status"),
            registry=r)
        self.model_info = Info("reformer_model", "The served model", registry=r)
        self.cuda_allocated: Gauge | None = None
        self._http: Any = None

    # ---- wiring ---------------------------------------------------------------------------
    def bind_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Gauges read the engine's plain stats snapshot at scrape time (always current, no polling thread)."""
        self.running.set_function(lambda: stats().running)
        self.waiting.set_function(lambda: stats().waiting)
        self.cache_in_use.set_function(lambda: stats().cache_bytes_in_use)
        self.cache_budget.set_function(lambda: stats().cache_bytes_budget)
        self.cache_usage.set_function(lambda: _ratio(stats()))
        # a counter read from the engine's own running total at scrape time (Counter has no set_function)
        self.registry.register(_EngineStepsCollector(stats))
        self.engine_alive.set_function(lambda: 1.0 if stats().alive else 0.0)
        self.contexts.set_function(lambda: stats().extra.get("contexts", 0.0))
        self.context_cache.set_function(lambda: stats().extra.get("context_cache_bytes", 0.0))

    def set_model(self, name: str, backend: str, info: dict[str, str]) -> None:
        self._labels = {"model": name, "backend": backend}
        self.model_info.info({"model": name, "backend": backend, **info})

    def bind_cuda(self, device: str) -> None:
        """torch CUDA allocator gauges for the serving device (only called when serving on a GPU)."""
        import torch

        dev = torch.device(device)
        r = self.registry
        self.cuda_allocated = Gauge("reformer_cuda_memory_allocated_bytes", "torch.cuda.memory_allocated",
                                    ("device",), registry=r)
        reserved = Gauge("reformer_cuda_memory_reserved_bytes", "torch.cuda.memory_reserved", ("device",), registry=r)
        peak = Gauge("reformer_cuda_memory_peak_allocated_bytes", "torch.cuda.max_memory_allocated since start",
                     ("device",), registry=r)
        name = str(dev)
        self.cuda_allocated.labels(name).set_function(lambda: torch.cuda.memory_allocated(dev))
        reserved.labels(name).set_function(lambda: torch.cuda.memory_reserved(dev))
        peak.labels(name).set_function(lambda: torch.cuda.max_memory_allocated(dev))

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics in a daemon thread; returns the bound port (useful with port 0)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        if self._http is not None:
            threading.Thread(target=self._http.shutdown, daemon=True).start()

    # ---- serving path -----------------------------------------------------------------------
    def rpc_done(self, method: str, code_name: str) -> None:
        self.rpc_status.labels(method, code_name).inc()

    def http_done(self, route: str, status: int) -> None:
        self.http_status.labels(route, str(status)).inc()

    def request_tracker(self, prompt_tokens: int) -> RequestTracker:
        self.prompt_len.labels(self._labels["model"]).observe(prompt_tokens)
        return RequestTracker(self, self._labels)


class RequestTracker:
    """Latency bookkeeping of one generation request, as seen by the server."""

    def __init__(self, metrics: ServerMetrics, labels: dict[str, str]) -> None:
        self._m = metrics
        self._labels = labels
        # Children resolved once: labels() costs a dict lookup and a lock per call, and ITL is per token.
        self._itl = metrics.inter_token_latency.labels(**labels)
        self.arrived = time.perf_counter()
        self._first: float | None = None
        self._last: float | None = None

    def tokens(self, n: int) -> None:
        """`n` new tokens arrived now (one event may carry several when the reader fell behind: the gap since
        the previous event is then split evenly, keeping one observation per token)."""
        if n <= 0:
            return
        now = time.perf_counter()
        if self._last is None:
            self._first = now
            self._m.time_to_first_token.labels(**self._labels).observe(now - self.arrived)
        else:
            gap = (now - self._last) / n
            for _ in range(n):
                self._itl.observe(gap)
        self._last = now

    def finished(self, ev: FinishEvent, finish_reason: str) -> None:
        m, lb, model = self._m, self._labels, self._labels["model"]
        now = time.perf_counter()
        m.e2e_latency.labels(**lb).observe(now - self.arrived)
        m.queue_time.labels(**lb).observe(ev.queue_time_s)
        m.prefill_time.labels(**lb).observe(ev.prefill_time_s)
        if self._first is not None and self._last is not None:
            decode = self._last - self._first
            m.decode_time.labels(**lb).observe(decode)
            if ev.generated_tokens > 1:
                m.time_per_output_token.labels(**lb).observe(decode / (ev.generated_tokens - 1))
        m.generation_len.labels(model).observe(ev.generated_tokens)
        m.prompt_tokens.labels(model).inc(ev.prompt_tokens)
        m.generation_tokens.labels(model).inc(ev.generated_tokens)
        m.request_finished.labels(model, finish_reason).inc()

    def abandoned(self) -> None:
        """The RPC ended before the engine finished (client cancel, deadline, stall, shutdown)."""
        self._m.e2e_latency.labels(**self._labels).observe(time.perf_counter() - self.arrived)
        self._m.request_finished.labels(self._labels["model"], "cancelled").inc()


def _ratio(s: EngineStats) -> float:
    return min(s.cache_bytes_in_use / s.cache_bytes_budget, 1.0) if s.cache_bytes_budget > 0 else 0.0


class _EngineStepsCollector:
    """`reformer_engine_steps_total`, `reformer_engine_step_failures_total` and the prefix-cache counters, read
    from the engine's own running totals as counters (rate() works on them)."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._stats()
        yield CounterMetricFamily("reformer_engine_steps", "Engine steps run so far", value=stats.steps_total)
        yield CounterMetricFamily("reformer_engine_step_failures", "Engine steps that raised (their requests "
                                  "failed; too many in a row stop the engine)",
                                  value=stats.extra.get("step_failures_total", 0.0))
        # vLLM's prefix-cache counters, in prompt tokens: hit rate = hits / queries
        yield CounterMetricFamily("reformer_prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                  "(--prefix-caching)", value=stats.extra.get("prefix_cache_queries", 0.0))
        yield CounterMetricFamily("reformer_prefix_cache_hits", "Prompt tokens found in a live context or an "
                                  "identical prompt's prefill", value=stats.extra.get("prefix_cache_hits", 0.0))
