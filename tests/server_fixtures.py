"""Helpers and fixtures for the server and client tests: a tiny random model saved to disk and real
`reformer-server` subprocesses on loopback with ephemeral ports.

Test modules import the fixtures they use (`from server_fixtures import server, tiny_model_dir`), so this
file stays out of the shared conftest.py. Servers write their log to a file (a pipe could fill up and
block them); `ServerProcess.log()` shows it when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
# The packages live in server/ and clients/python/; scripts/setup.sh installs both, and these paths make a
# plain checkout work too (subprocesses get them through PYTHONPATH).
_PATHS = [str(ROOT), str(ROOT / "server"), str(ROOT / "clients" / "python")]
for _p in _PATHS:
    if _p not in sys.path:
        sys.path.append(_p)

from reformer_infer import ReformerConfig, ReformerLM, save_model  # noqa: E402

STARTUP_TIMEOUT_S = 60.0


async def start_in_process(model_dir: Path, *flags: str):  # -> reformer_server.server.ReformerServer
    """A ReformerServer on this event loop, loaded (no warm-up, free ports, no metrics endpoint); `flags` add
    to or override those. The caller closes it (`await srv.close()`)."""
    from reformer_server.config import parse_config
    from reformer_server.server import ReformerServer

    cfg = parse_config(["--model", str(model_dir), "--port", "0", "--metrics-port", "-1", "--warmup", "false",
                        *flags], env={})
    srv = ReformerServer(cfg)
    await srv.start()
    await srv.load()
    return srv


def tiny_config() -> ReformerConfig:
    """A 4-layer model small enough to decode in milliseconds on CPU, with a 1024-token context."""
    return ReformerConfig(
        attn_layers=["local", "lsh", "local", "lsh"],
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=64,
        lsh_attn_chunk_length=8,
        local_attn_chunk_length=8,
        num_buckets=4,
        num_hashes=2,
        vocab_size=258,
        axial_pos_shape=[32, 32],
        axial_pos_embds_dim=[16, 16],
        max_position_embeddings=1024,
    )


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_model(ReformerLM(tiny_config()).eval(), path)
    return path


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFORMER_")}
    env["PYTHONPATH"] = os.pathsep.join(_PATHS + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")  # the test machine is small and shared
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path
    http_port: int = -1  # the OpenAI-compatible HTTP API (started with --http-port)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, service: str = "", timeout: float = 5.0) -> int:
        with grpc.insecure_channel(self.target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout)
            return resp.status

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, list[tuple[str, dict[str, str], float]]]:
        """{family name: [(sample name, labels, value)]}, parsed with prometheus_client's own parser."""
        out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(self.metrics_text()):
            out[fam.name] = [(s.name, dict(s.labels), s.value) for s in fam.samples]
        return out

    def metric(self, sample: str, **labels: str) -> float:
        """Sum of the samples called `sample` whose labels include `labels` (0 when there is none)."""
        total = 0.0
        for samples in self.metrics().values():
            for name, lb, value in samples:
                if name == sample and all(lb.get(k) == v for k, v in labels.items()):
                    total += value
        return total

    def wait_metric(self, sample: str, expected: float, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        value = self.metric(sample)
        while value != expected and time.monotonic() < deadline:
            time.sleep(0.05)
            value = self.metric(sample)
        return value

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    model_dir: Path | None,
    workdir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait_serving: bool = True,
) -> ServerProcess:
    """Start `python -m reformer_server` on 127.0.0.1 with ephemeral ports; wait until SERVING.

    `model_dir` None starts it without --model, i.e. on the bundled default model."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "ports.json"
    port_file.unlink(missing_ok=True)
    log_path = workdir / "server.log"
    cmd = [
        sys.executable, "-m", "reformer_server", *(["--model", str(model_dir)] if model_dir else []),
        "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "0", "--port-file", str(port_file), "--cache-memory", "256MiB", *args,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(env), cwd=workdir)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    ports = json.loads(port_file.read_text())
    server = ServerProcess(proc, ports["port"], ports["metrics_port"], log_path, ports.get("http_port", -1))
    if wait_serving:
        while True:
            try:
                if server.health() == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"server never became SERVING:\n{server.log()}")
            time.sleep(0.1)
    return server


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A default server on the tiny model (its HTTP API on too), shared by a test module."""
    proc = start_server(tiny_model_dir, tmp_path_factory.mktemp("server"), "--prefill-chunk-tokens", "64",
                        "--http-port", "0")
    yield proc
    code = proc.stop()
    assert code == 0, f"server exited with {code}:\n{proc.log()}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prompt_text(n: int) -> str:
    """An ASCII prompt of exactly n bytes (= n tokens)."""
    base = "It is a truth universally acknowledged, that a single man in possession of a good fortune. "
    return (base * (n // len(base) + 1))[:n]

