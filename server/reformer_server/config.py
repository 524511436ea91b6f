"""Server configuration: every flag, its environment-variable equivalent and its default, in one place.

Precedence: command-line flag > environment variable (`REFORMER_*`) > default. The environment is read
only when `parse_config` is called (never at import time), so tests can pass `env=`.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'1073741824', '1GiB', '512MiB', '2G' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1073741824, 512MiB, 2GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_auto_bool(text: str) -> bool | str:
    """A boolean, or "auto" (`parse_config` turns it into None: the engine decides by device)."""
    return "auto" if text.strip().lower() == "auto" else parse_bool(text)


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


@dataclass
class ServerConfig:
    """Runtime settings of one server process (the model's own config travels with its weights)."""

    model: Path | None = None  # None: reformer_infer.default_model_path()
    backend: str = "eager"
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = -1  # OpenAI-compatible HTTP API on --host; 0: ephemeral; negative: off
    metrics_host: str | None = None  # None: same as host
    metrics_port: int = 9090  # 0: ephemeral; negative: no metrics endpoint
    port_file: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 16
    max_queue: int = 256
    cache_memory: int | None = None  # None: derived from free memory after loading the model
    context_memory: int | None = None  # None: half of the cache budget; 0: contexts are off
    max_context_ttl: float = 3600.0
    default_context_ttl: float = 600.0
    prefix_caching: bool = True
    max_context: int | None = None  # None: the model's max context
    max_new_tokens_limit: int = 4096
    default_max_new_tokens: int = 64
    prefill_chunk_tokens: int | None = None  # None: sized for the device (512 on a CPU, 16384 on a GPU)
    stream_buffer_events: int = 256
    stream_interval: int = 1  # tokens per stream message after the first (vLLM's and SGLang's --stream-interval)
    arrival_window: float = 0.002  # seconds an idle engine waits for the rest of a burst of requests
    cuda_graphs: bool = True  # on CUDA, replay captured decode steps (one graph per batch bucket)
    compile_step: bool = False  # off CUDA, replay the step compiled ahead of time (AOTInductor) per batch bucket
    overlap_steps: bool | None = None  # None (auto): decode steps overlap the engine's host work on CUDA only
    stall_timeout: float = 30.0
    grace_period: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token: str | None = None
    auth_health: bool = False  # also require the token for grpc.health.v1 (probes usually carry none)
    reflection: bool = True
    max_message_bytes: int = 16 * 2**20
    max_prompt_bytes: int = 4 * 2**20
    max_request_time: float | None = None  # None: no server-side cap on a request's generation time
    max_concurrent_streams: int = 256
    max_streams_per_client: int = 0  # 0: no per-client limit (only --max-concurrent-streams)
    max_queue_time: float | None = None  # None: a request may wait in the queue until its deadline
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_stop_token_ids: int = 64
    long_prompt_tokens: int = 2048  # prompts longer than this may not take the short-prompt slots
    short_prompt_slots: int | None = None  # None: max_batch // 4 (0 when max_batch is 1)
    queue_aging_rate: float = 1000.0  # prompt tokens per second of head start a shorter request gets
    allow_client_priority: bool = False
    priority_tokens: tuple[str, ...] = ()  # bearer tokens whose callers may set priority
    allow_insecure_token: bool = False
    drain_announce: float = 1.0
    keepalive_min_ping_interval: float = 10.0
    warmup: bool = True
    # sys.setswitchinterval: GIL hand-off between engine thread and event loop; None: 0.5 ms on a CPU (where
    # the engine thread holds the GIL through every op), Python's default on a GPU
    switch_interval: float | None = None
    log_level: str = "INFO"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class _Option:
    flag: str
    dest: str
    type: Callable[[str], Any]
    help: str
    choices: Sequence[str] | None = None
    switch: bool = False  # a boolean that may be given bare (`--flag` means `--flag true`)

    @property
    def env(self) -> str:
        return "REFORMER_" + self.dest.upper()


def _opt_tokens(text: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'); '' -> ()."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _opt_path(text: str) -> Path | None:
    return Path(text) if text else None


def _opt_seconds(text: str) -> float | None:
    """'30' -> 30.0; '', '0' or 'none' -> None (no limit)."""
    if text.strip().lower() in ("", "0", "none", "off"):
        return None
    value = float(text)
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


_OPTIONS: tuple[_Option, ...] = (
    _Option("--model", "model", _opt_path, "checkpoint directory (config.json + model.safetensors); "
            "default: the bundled model, reformer_infer.default_model_path()"),
    _Option("--backend", "backend", str, "execution backend: eager, or torchscript / onnx / pt2 over a "
            "reformer-export directory given as --model (fp32)"),
    _Option("--host", "host", str, "address to bind the gRPC server to (0.0.0.0 to listen on all interfaces)"),
    _Option("--port", "port", int, "gRPC port (0 picks a free one; see --port-file)"),
    _Option("--http-port", "http_port", int,
            "port of the OpenAI-compatible HTTP API (/v1/completions, /v1/models, /health, /ready) on --host, "
            "served beside gRPC on the same engine with the same TLS, token and limits (0 picks a free one, "
            "-1 turns it off)"),
    _Option("--metrics-host", "metrics_host", str, "address of the Prometheus endpoint (default: --host)"),
    _Option("--metrics-port", "metrics_port", int, "Prometheus /metrics port (0 picks a free one, -1 disables)"),
    _Option("--port-file", "port_file", _opt_path,
            "write {\"port\": ..., \"metrics_port\": ..., \"http_port\": ...} as JSON here once the ports are "
            "bound"),
    _Option("--device", "device", str, "where the model runs", ("auto", "cpu", "cuda")),
    _Option("--dtype", "dtype", str, "parameter dtype (auto: float32 on CPU, bfloat16 on CUDA)",
            ("auto", "float32", "bfloat16", "float16")),
    _Option("--max-batch", "max_batch", int, "running sequences decoded together in one step"),
    _Option("--max-queue", "max_queue", int, "waiting requests beyond which new ones get RESOURCE_EXHAUSTED"),
    _Option("--cache-memory", "cache_memory", parse_bytes,
            "cache budget for admission in bytes (512MiB, 8GiB, ...); default: 80%% of free GPU memory, "
            "or 25%% of available RAM (at most 16GiB) on CPU"),
    _Option("--context-memory", "context_memory", parse_bytes,
            "cache bytes that contexts (CreateContext) may pin in all, counted inside --cache-memory (512MiB, "
            "8GiB, ...; 0 turns contexts off; default: half of --cache-memory)"),
    _Option("--max-context-ttl", "max_context_ttl", float, "longest time to live a context may ask for, in seconds"),
    _Option("--default-context-ttl", "default_context_ttl", float,
            "time to live of a context that asks for none, in seconds"),
    _Option("--prefix-caching", "prefix_caching", parse_bool,
            "a prompt that starts with all the tokens of one of the caller's live contexts continues it, and "
            "identical prompts admitted together share one prefill (see docs/semantics.md)", switch=True),
    _Option("--max-context", "max_context", int, "longest prompt + generation accepted (default: the model's)"),
    _Option("--max-new-tokens-limit", "max_new_tokens_limit", int, "largest max_new_tokens accepted"),
    _Option("--default-max-new-tokens", "default_max_new_tokens", int, "max_new_tokens when a request omits it"),
    _Option("--prefill-chunk-tokens", "prefill_chunk_tokens", int,
            "prefill work per engine step, so long prompts interleave with running streams"),
    _Option("--stream-buffer-events", "stream_buffer_events", int, "per-request event buffer in the engine"),
    _Option("--stream-interval", "stream_interval", int,
            "tokens per streamed message after the first, which goes at once (the rest with the finish): "
            "fewer messages for the front-end to write at many streams, burstier streams"),
    _Option("--arrival-window", "arrival_window", float,
            "seconds an idle engine waits for more requests once one arrives (while they keep coming, each "
            "within a quarter of it), so a burst is prefilled and decoded together (0: no wait)"),
    _Option("--stall-timeout", "stall_timeout", float,
            "seconds a stream may wait for a client that stopped reading before it is aborted"),
    _Option("--grace-period", "grace_period", float,
            "on SIGTERM/SIGINT, seconds running streams get to finish before they are cancelled"),
    _Option("--drain-announce", "drain_announce", float,
            "on SIGTERM, seconds health reports NOT_SERVING on a still-open port before the server sends "
            "GOAWAY and closes it (clients then move to other replicas; running streams go on)"),
    _Option("--tls-cert", "tls_cert", _opt_path, "PEM server certificate chain (enables TLS; needs --tls-key)"),
    _Option("--tls-key", "tls_key", _opt_path, "PEM private key of --tls-cert"),
    _Option("--tls-client-ca", "tls_client_ca", _opt_path, "PEM CA bundle; when given, clients must present "
            "a certificate it signed (mutual TLS)"),
    _Option("--auth-token", "auth_token", str, "require 'authorization: Bearer <token>' metadata on every call "
            "(prefer the environment variable, flags are visible in ps)"),
    _Option("--auth-health", "auth_health", parse_bool, "also require the token for the health service"),
    _Option("--reflection", "reflection", parse_bool, "serve gRPC server reflection (grpcurl, grpcui)"),
    _Option("--max-message-bytes", "max_message_bytes", parse_bytes, "largest gRPC message sent or received"),
    _Option("--max-prompt-bytes", "max_prompt_bytes", parse_bytes,
            "largest prompt accepted (UTF-8 bytes of text, or number of token ids), checked before it is "
            "encoded or truncated; larger ones get INVALID_ARGUMENT"),
    _Option("--max-request-time", "max_request_time", _opt_seconds,
            "cap on a request's generation time in seconds (its max_time_seconds is lowered to this); the "
            "stream then ends normally with finish_reason TIME_LIMIT (0 or empty: no cap)"),
    _Option("--max-concurrent-streams", "max_concurrent_streams", int,
            "generation streams (Generate, GenerateStream) open at once; more are refused with "
            "RESOURCE_EXHAUSTED (health and info calls are not counted)"),
    _Option("--max-streams-per-client", "max_streams_per_client", int,
            "generation streams one client may have open at once (a client is its bearer token, else its IP "
            "address); more get RESOURCE_EXHAUSTED. 0: no per-client limit (behind a proxy every peer may be "
            "the same address)"),
    _Option("--max-queue-time", "max_queue_time", _opt_seconds,
            "seconds a request may wait for admission before it fails with RESOURCE_EXHAUSTED (0 or empty: no "
            "limit besides the client's deadline)"),
    _Option("--max-stop-strings", "max_stop_strings", int, "most stop strings in one request"),
    _Option("--max-stop-string-bytes", "max_stop_string_bytes", int, "longest stop string (UTF-8 bytes)"),
    _Option("--max-stop-token-ids", "max_stop_token_ids", int, "most stop token ids in one request"),
    _Option("--long-prompt-tokens", "long_prompt_tokens", int,
            "prompts longer than this count as long: they may not take the last --short-prompt-slots slots, "
            "and shorter requests may be admitted ahead of them"),
    _Option("--short-prompt-slots", "short_prompt_slots", int,
            "batch slots kept for prompts of at most --long-prompt-tokens, so a short request is never stuck "
            "behind a flood of long prompts (default: a quarter of --max-batch)"),
    _Option("--queue-aging-rate", "queue_aging_rate", float,
            "queue order: a request ranks by arrival time + prompt tokens / this rate (tokens per second), so "
            "shorter prompts overtake longer ones that arrived less than their length difference / rate earlier "
            "and a long prompt is overtaken only for a bounded time"),
    _Option("--allow-client-priority", "allow_client_priority", parse_bool,
            "honour the priority field of every request (default: only callers with a --priority-tokens token)"),
    _Option("--priority-tokens", "priority_tokens", _opt_tokens,
            "comma-separated bearer tokens whose callers' priority field is honoured (they are accepted by "
            "--auth-token's check too; prefer the environment variable)"),
    _Option("--allow-insecure-token", "allow_insecure_token", parse_bool,
            "start with a bearer token on a non-loopback address without TLS (the token then crosses the "
            "network in cleartext; only behind a TLS-terminating proxy)"),
    _Option("--keepalive-min-ping-interval", "keepalive_min_ping_interval", float,
            "smallest interval (s) between client keepalive pings the server accepts"),
    _Option("--warmup", "warmup", parse_bool,
            "before reporting SERVING, run a short generation and, when decode steps are recorded (CUDA graphs, "
            "--compile-step), record every greedy batch bucket"),
    _Option("--cuda-graphs", "cuda_graphs", parse_bool,
            "on CUDA, decode steps replay one captured CUDA graph per batch bucket (no effect on CPU)"),
    _Option("--compile-step", "compile_step", parse_bool,
            "on a CPU, decode steps replay the step compiled ahead of time (torch.export + AOTInductor) per batch "
            "bucket and sampling mode: ~3x one stream's tokens/s on the bundled model, but each new one "
            "compiles for 20-80 s while every stream waits (kept in $REFORMER_COMPILE_CACHE_DIR, default "
            "~/.cache/reformer-serve/compiled-steps); needs a C++ compiler (no effect on CUDA)"),
    _Option("--overlap-steps", "overlap_steps", parse_auto_bool,
            "auto, true or false: run each decode step on a device thread while the engine applies the previous "
            "step's tokens (auto: on CUDA only; on a CPU the two threads compete for the same cores)"),
    _Option("--switch-interval", "switch_interval", float,
            "Python GIL switch interval in seconds (the engine thread and the gRPC event loop share the GIL)"),
    _Option("--log-level", "log_level", str, "logging level", ("DEBUG", "INFO", "WARNING", "ERROR")),
)


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="reformer-server",
        description="Serve a Reformer language model over gRPC (reformer.v1.TextGeneration), with health, "
        "reflection and Prometheus metrics. Every flag has an environment variable (shown in brackets); "
        "a flag wins over its variable.",
    )
    for opt in _OPTIONS:
        default = getattr(defaults, opt.dest)
        parser.add_argument(
            opt.flag, dest=opt.dest, type=opt.type, choices=opt.choices, default=None,
            help=f"{opt.help} [env {opt.env}; default {default if default is not None else 'auto'}]",
            **({"nargs": "?", "const": True} if opt.switch else {}),
        )
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_const", const=False,
                        help="same as --prefix-caching false")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False,
                        help="same as --cuda-graphs false: decode steps launch every op (debugging, profiling)")
    return parser


def is_loopback(host: str) -> bool:
    """True for a loopback address or 'localhost' (a name other than that counts as non-loopback)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Flags > REFORMER_* environment variables > ServerConfig defaults."""
    env = os.environ if env is None else env
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = ServerConfig()
    for opt in _OPTIONS:
        value = getattr(args, opt.dest)
        if value is None and opt.env in env:
            raw = env[opt.env]
            try:
                value = opt.type(raw)
            except (ValueError, argparse.ArgumentTypeError) as e:
                parser.error(f"{opt.env}={raw!r}: {e}")
            if opt.choices is not None and value not in opt.choices:
                parser.error(f"{opt.env}={raw!r}: choose from {', '.join(opt.choices)}")
        if value is not None:
            setattr(cfg, opt.dest, value)
    if cfg.overlap_steps == "auto":
        cfg.overlap_steps = None
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if cfg.tls_client_ca is not None and cfg.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert/--tls-key")
    if cfg.auth_token == "":
        cfg.auth_token = None
    if cfg.prefill_chunk_tokens is not None and cfg.prefill_chunk_tokens < 1:
        parser.error("--prefill-chunk-tokens must be >= 1")
    for name in ("max_batch", "max_queue", "max_new_tokens_limit", "default_max_new_tokens",
                 "stream_buffer_events", "stream_interval", "max_message_bytes", "max_concurrent_streams",
                 "max_prompt_bytes", "max_stop_string_bytes", "long_prompt_tokens"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_streams_per_client", "max_stop_strings", "max_stop_token_ids"):
        if getattr(cfg, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if cfg.short_prompt_slots is None:
        cfg.short_prompt_slots = cfg.max_batch // 4
    if not 0 <= cfg.short_prompt_slots < cfg.max_batch:
        parser.error("--short-prompt-slots must be in [0, --max-batch)")
    if not (cfg.queue_aging_rate > 0 and math.isfinite(cfg.queue_aging_rate)):
        parser.error("--queue-aging-rate must be a positive number of tokens per second")
    if (cfg.auth_token or cfg.priority_tokens) and not cfg.tls and not cfg.allow_insecure_token and not is_loopback(cfg.host):
        parser.error(f"refusing to require a bearer token on {cfg.host} without TLS: the token would cross the "
                     "network in cleartext. Give --tls-cert/--tls-key, bind a loopback address, or pass "
                     "--allow-insecure-token true (e.g. behind a TLS-terminating proxy)")
    if not 0 <= cfg.arrival_window <= 1:
        parser.error("--arrival-window must be in [0, 1] seconds")
    if not cfg.drain_announce >= 0:
        parser.error("--drain-announce must be >= 0")
    if cfg.switch_interval is not None and not (0 < cfg.switch_interval <= 0.1):
        parser.error("--switch-interval must be in (0, 0.1] seconds")
    if not (0 < cfg.max_context_ttl and math.isfinite(cfg.max_context_ttl)):
        parser.error("--max-context-ttl must be a positive number of seconds")
    if not 0 < cfg.default_context_ttl <= cfg.max_context_ttl:
        parser.error("--default-context-ttl must be in (0, --max-context-ttl]")
    if cfg.cache_memory is not None and cfg.context_memory is not None and cfg.context_memory > cfg.cache_memory:
        parser.error("--context-memory must be <= --cache-memory (contexts are counted inside the cache budget)")
    if cfg.default_max_new_tokens > cfg.max_new_tokens_limit:
        parser.error("--default-max-new-tokens must be <= --max-new-tokens-limit")
    return cfg
