"""Run the Dockerfile's steps without Docker, then probe the result as the image's users would.

    python scripts/check_image_steps.py [--keep] [--timeout 600]

There is no Docker engine on the project's machines. This replays what `docker build` and `docker run`
would do, from the Dockerfile itself (parsed by dockerfile-parse, its build context filtered by docker-py's
.dockerignore matcher; not restated here):

1. context   each COPY source, filtered through .dockerignore, is copied into a scratch "filesystem" per
             stage (the builder's WORKDIR, the runtime's /opt/reformer, ...).
2. build     every RUN of each stage runs as written, in a virtual environment that sees this machine's
             packages (standing in for the PyTorch base image), with the stage's ENV and WORKDIR, and
             absolute container paths mapped into the scratch filesystem. User creation (groupadd /
             useradd) is the one step not replayed: it would add users to this machine.
3. serve     the image's CMD with its ENV, on free ports and --device cpu (flags appended to the CMD win).
4. probe     the HEALTHCHECK command until it passes (REFORMER_PORT set as the image sets it); one
             generation through the client SDK installed from the built wheel and one through the
             OpenAI-compatible HTTP API; /metrics scraped and compared with a ServerMetrics registry and
             with every metric the deployment files name (scripts/deploy_metrics.py; the CUDA gauges
             aside: no GPU here).
5. stop      SIGTERM; the server must drain and exit 0 within its grace period.

It checks that the image's own files work together (context, codegen, wheels with the bundled model and
stubs, entry points, health, metrics); not the base image, the non-root user or the GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import venv
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
# Run in scratch stages instead of on this machine: they would create system users.
SKIPPED_COMMANDS = ("groupadd", "useradd")

log = logging.getLogger("check_image_steps")


def _load_deploy_metrics() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_deploy_metrics", ROOT / "scripts" / "deploy_metrics.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


dm = _load_deploy_metrics()


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


@dataclass
class Stage:
    """One FROM of the Dockerfile replayed in `root` (a folder standing for the container's /)."""

    name: str
    root: Path
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    venv: Path | None = None

    def path(self, container_path: str) -> Path:
        absolute = container_path if container_path.startswith("/") else f"{self.workdir}/{container_path}"
        return self.root / absolute.lstrip("/")

    def map_paths(self, command: str) -> str:
        """Every absolute path a RUN names (/wheels, /tmp/wheels/*.whl) as the same path under `root`."""
        return re.sub(r"(?<![\w./:$-])/[\w./*-]+", lambda m: str(self.root) + m.group(0), command)

    def run_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REFORMER_", "PYTHON", "PIP_"))}
        env.update(self.env)
        assert self.venv is not None
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        return env


def _copy(source: Path, dest: Path, context: set[str] | None) -> None:
    """Copy `source` to `dest`; from the build context, only the files `context` holds."""
    for file in _files_under(source):
        relative = str(file.relative_to(ROOT)) if file.is_relative_to(ROOT) else None
        if context is not None and relative is not None and relative not in context:
            continue
        target = dest / file.relative_to(source) if source.is_dir() else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)


def build(scratch: Path) -> tuple[Stage, list[str]]:
    """Replay every stage; return the last (runtime) stage and the CMD."""
    instructions = DockerfileParser(str(ROOT / "Dockerfile")).structure
    # docker-py's exclude_paths: the files `docker build` sends as the context, after .dockerignore
    context = exclude_paths(str(ROOT), (ROOT / ".dockerignore").read_text().splitlines())
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    cmd: list[str] = []
    for ins in instructions:
        keyword, args = ins["instruction"], " ".join(ins["value"].split())
        if keyword == "FROM":
            name = re.split(r"\s+AS\s+", args, flags=re.IGNORECASE)[-1] if re.search(r"\sAS\s", args, re.I) \
                else str(len(stages))
            stage = Stage(name=name, root=scratch / name)
            stage.root.mkdir(parents=True)
            stage.venv = scratch / f"venv-{name}"
            # The base image's Python with its packages (torch, ...): here, this machine's interpreter.
            venv.EnvBuilder(system_site_packages=True, with_pip=True).create(stage.venv)
            stages[name] = stage
            continue
        if stage is None:
            continue  # ARG before the first FROM
        if keyword == "WORKDIR":
            stage.workdir = args if args.startswith("/") else f"{stage.workdir}/{args}"
            stage.path(stage.workdir).mkdir(parents=True, exist_ok=True)
        elif keyword == "ENV":
            stage.env.update(pair.split("=", 1) for pair in shlex.split(args))  # the KEY=VALUE form
        elif keyword == "COPY":
            tokens = shlex.split(args)
            origin = next((t.split("=", 1)[1] for t in tokens if t.startswith("--from=")), None)
            paths = [t for t in tokens if not t.startswith("--")]
            *sources, dest = paths
            for source in sources:
                src = stages[origin].path(source) if origin else ROOT / source
                target = stage.path(dest)
                if src.is_file() and not dest.endswith("/"):
                    target.parent.mkdir(parents=True, exist_ok=True)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                _copy(src, target, context if origin is None else None)
        elif keyword == "RUN":
            _run_step(stage, args)
        elif keyword == "CMD":
            cmd = json.loads(args)  # the exec form
        elif keyword == "HEALTHCHECK":
            stage.env["_HEALTHCHECK"] = args.split("CMD", 1)[1].strip()
    assert stage is not None
    return stage, cmd


def _run_step(stage: Stage, command: str) -> None:
    parts = [p.strip() for p in command.split("&&")]
    if all(p.split()[0] in SKIPPED_COMMANDS for p in parts):
        log.info("[%s] skipped (would change this machine): %s", stage.name, command[:60])
        return
    if any(p.split()[0] in SKIPPED_COMMANDS for p in parts):
        raise RuntimeError(f"a RUN mixes user creation with other steps and cannot be replayed: {command}")
    mapped = stage.map_paths(command)
    log.info("[%s] RUN %s", stage.name, command)
    cwd = stage.path(stage.workdir)
    proc = subprocess.run(
        ["bash", "-euc", mapped], cwd=cwd, env=stage.run_env(), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"RUN {command} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )


def _installed_from(stage: Stage, modules: list[str]) -> dict[str, str]:
    code = f"import json, importlib; print(json.dumps({{m: importlib.import_module(m).__file__ for m in {modules!r}}}))"
    assert stage.venv is not None
    out = subprocess.run(
        [str(stage.venv / "bin" / "python"), "-c", code],
        cwd=stage.path(stage.workdir),
        env=stage.run_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def serve_and_probe(stage: Stage, cmd: list[str], timeout_s: float, model: Path | None = None) -> list[str]:
    """Start the CMD, wait for the HEALTHCHECK, generate, scrape, stop. Returns problems."""
    problems: list[str] = []
    assert stage.venv is not None
    installed = _installed_from(stage, ["reformer_server", "reformer_infer", "reformer_client"])
    for module, path in installed.items():
        if not path.startswith(str(stage.venv)):
            problems.append(f"{module} imports from {path}, not from the wheel installed by the image's RUN")
    # The default CMD serves the bundled model: every file of it must be in the wheel.
    source_models = ROOT / "reformer_infer" / "models"
    wheel_models = Path(installed["reformer_infer"]).parent / "models"
    for file in _files_under(source_models):
        if not (wheel_models / file.relative_to(source_models)).is_file():
            problems.append(f"the wheel lacks the bundled model file {file.relative_to(ROOT)}")
    port_file = stage.root / "ports.json"
    env = stage.run_env()
    argv = [*cmd, "--port", "0", "--http-port", "0", "--metrics-port", "0", "--port-file", str(port_file),
            "--device", "cpu"]
    if model is not None:
        argv += ["--model", str(model)]
    log.info("serve: %s", " ".join(argv))
    workdir = stage.path(stage.workdir)
    with open(stage.root / "server.log", "w") as server_log:
        server = subprocess.Popen(argv, cwd=workdir, env=env, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if server.poll() is not None or time.monotonic() > deadline:
                return [*problems, f"the server never bound its ports:\n{_tail(stage)}"]
            time.sleep(0.2)
        ports = json.loads(port_file.read_text())
        health = [c for c in json.loads(stage.env["_HEALTHCHECK"])]
        health = [str(stage.path(c)) if c.startswith("/") else c for c in health]
        health_env = {**env, "REFORMER_PORT": str(ports["port"])}
        started = time.monotonic()
        while subprocess.run(health, cwd=workdir, env=health_env, capture_output=True).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                return [*problems, f"the HEALTHCHECK never passed:\n{_tail(stage)}"]
            time.sleep(1.0)
        log.info("HEALTHCHECK passed after %.1f s", time.monotonic() - started)
        problems += _generate(stage, ports["port"], workdir)
        problems += _http_complete(ports["http_port"])
        problems += _compare_metrics(ports["metrics_port"])
        server.send_signal(signal.SIGTERM)
        cfg_grace = float(stage.env.get("REFORMER_GRACE_PERIOD", 30))
        try:
            code = server.wait(timeout=cfg_grace + 15)
        except subprocess.TimeoutExpired:
            return [*problems, "the server did not exit within its grace period after SIGTERM"]
        if code != 0:
            problems.append(f"the server exited {code} after SIGTERM:\n{_tail(stage)}")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return problems


def _tail(stage: Stage) -> str:
    return "\n".join((stage.root / "server.log").read_text().splitlines()[-25:])


def _generate(stage: Stage, port: int, workdir: Path) -> list[str]:
    code = (
        "import json, sys\n"
        "from reformer_client import Client\n"
        f"with Client('127.0.0.1:{port}') as client:\n"
        "    result = client.generate('It is a truth universally acknowledged', max_new_tokens=8)\n"
        "print(json.dumps({'tokens': len(result.token_ids), 'text': result.text}))\n"
    )
    assert stage.venv is not None
    proc = subprocess.run(
        [str(stage.venv / "bin" / "python"), "-c", code],
        cwd=workdir,
        env=stage.run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        return [f"generation through the installed client failed:\n{proc.stderr[-2000:]}"]
    result = json.loads(proc.stdout)
    log.info("generated %d tokens: %r", result["tokens"], result["text"])
    return [] if result["tokens"] > 0 else ["the generation returned no tokens"]


def _http_complete(http_port: int) -> list[str]:
    """One completion through the OpenAI-compatible HTTP API the image turns on (REFORMER_HTTP_PORT)."""
    base = f"http://127.0.0.1:{http_port}"
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as r:
            model = json.loads(r.read())["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": "Emma Woodhouse", "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{base}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            completion = json.loads(r.read())
    except (OSError, ValueError, KeyError) as e:
        return [f"the HTTP API failed: {e}"]
    log.info("HTTP /v1/completions: %r", completion["choices"][0]["text"])
    return [] if completion["usage"]["completion_tokens"] > 0 else ["the HTTP completion returned no tokens"]


def _compare_metrics(metrics_port: int) -> list[str]:
    """The live endpoint against a ServerMetrics registry and against what the deployment files name."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    live = {s.name for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("reformer_")}
    declared = {n for n in dm.server_series() if not n.startswith("reformer_cuda_")}  # CUDA gauges: GPU only
    problems = [f"{n} is exported by ServerMetrics but not on the live /metrics endpoint"
                for n in sorted(declared - live)]
    problems += [f"{n} is on the live /metrics endpoint but not in a ServerMetrics registry"
                 for n in sorted(live - declared)]
    named = {name for _, name in dm.named_metrics()}
    problems += [f"the deployment names {n}, which the live endpoint lacks"
                 for n in sorted(named - live) if not n.startswith("reformer_cuda_")]
    log.info("/metrics: %d reformer_ series; the %d the deployment names are there", len(live), len(named))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is logged)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds for the server to become healthy"
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="serve this checkpoint directory instead of the image's default (bundled) model",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    scratch = Path(tempfile.mkdtemp(prefix="reformer-image-"))
    log.info("scratch filesystem: %s", scratch)
    try:
        runtime, cmd = build(scratch)
        problems = serve_and_probe(runtime, cmd, args.timeout, args.model)
    except (RuntimeError, subprocess.CalledProcessError, OSError, ValueError) as e:
        problems = [f"{type(e).__name__}: {e}"]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    for problem in problems:
        log.error("%s", problem)
    log.info("image steps: %s", "FAILED" if problems else "ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
