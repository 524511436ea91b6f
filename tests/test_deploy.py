"""The deployment files: the Dockerfile passes hadolint; every manifest validates strictly against its
published schema (kubernetes-validate for the built-in kinds, the vendored CRDs in deploy/schemas/ for the
InferencePool, ScaledObject and ServiceMonitor); the manifests agree with each other and with the server's
flags; every metric a dashboard or manifest names is one the server exports (scripts/deploy_metrics.py);
deploy/healthcheck.py answers from the real gRPC health service; the image's steps build and serve.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kubernetes_validate.utils import latest_version
from reformer_server.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
HEALTHCHECK = DEPLOY / "healthcheck.py"
K8S_MIN_VERSION = "1.27"  # native gRPC probes are GA from here; the newest is what kubernetes-validate bundles
TEARDOWN_MARGIN_S = 10  # seconds between the end of the drain and SIGKILL: cancel the rest, free the GPU
READINESS_SERVICE = "reformer.v1.TextGeneration"


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


dm = _load_script("deploy_metrics")


def _objects() -> list[tuple[str, dict[str, Any]]]:
    """(where, object) for every Kubernetes object under deploy/ (not the vendored CRDs, not kustomizations)."""
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if "schemas" in path.relative_to(DEPLOY).parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "apiVersion" in doc and doc.get("kind") != "Kustomization":
                out.append((f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def _one(kind: str, name: str = "reformer-serve") -> dict[str, Any]:
    found = [d for _, d in _objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} under deploy/"
    return found[0]


def _strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields refused, as the API server's strict field validation
    does (an object with `properties` and no `additionalProperties` or preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): JSON schema} of every served version of every vendored CRD."""
    out = {}
    for path in sorted((DEPLOY / "schemas").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                out[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = schema
    return out


CRDS = _crd_schemas()
BUILTIN = [(w, d) for w, d in _objects() if (d["apiVersion"], d["kind"]) not in CRDS]
CUSTOM = [(w, d) for w, d in _objects() if (d["apiVersion"], d["kind"]) in CRDS]


def schema_problems(doc: dict[str, Any]) -> list[str]:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRDS:
        validator = jsonschema.Draft202012Validator(CRDS[key])
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    problems = []
    for version in (K8S_MIN_VERSION, latest_version()):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            problems.append(f"@{version}: {'.'.join(map(str, getattr(e, 'path', [])))}: {e.message}")
    return problems


# ---- standard tools -------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dockerfile() -> list[dict[str, Any]]:
    return DockerfileParser(str(ROOT / "Dockerfile")).structure


def test_dockerfile_installs_the_pins_of_setup_and_of_the_stubs() -> None:
    runs = " ".join(i["value"] for i in _dockerfile() if i["instruction"] == "RUN")
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert set(re.findall(r"torch==[\d.]+", runs)) == set(re.findall(r"torch==[\d.]+", setup))
    stubs = (ROOT / "server" / "reformer_server" / "_proto" / "generation_pb2_grpc.py").read_text()
    generator = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", stubs)
    assert generator is not None and f"grpcio-tools=={generator.group(1)}" in runs


def test_every_copy_source_is_in_the_build_context() -> None:
    # docker-py's exclude_paths returns the files `docker build` sends, after .dockerignore
    context = exclude_paths(str(ROOT), (ROOT / ".dockerignore").read_text().splitlines())
    copies = [i["value"].split() for i in _dockerfile() if i["instruction"] in ("COPY", "ADD")]
    sources = [src.rstrip("/") for args in copies if not args[0].startswith("--from") for src in args[:-1]]
    assert sources and all(src in context for src in sources), sorted(set(sources) - context)
    assert "scripts/setup.sh" not in context and not any(p.startswith(".git/") for p in context)


def test_image_serves_every_port_on_all_interfaces() -> None:
    env = DockerfileParser(str(ROOT / "Dockerfile")).envs
    cmd = json.loads(next(i["value"] for i in reversed(_dockerfile()) if i["instruction"] == "CMD"))
    cfg = parse_config(cmd[1:], {k: v for k, v in env.items() if k.startswith("REFORMER_")})
    exposed = {int(p) for i in _dockerfile() if i["instruction"] == "EXPOSE" for p in i["value"].split()}
    assert cfg.host == "0.0.0.0" and exposed == {cfg.port, cfg.http_port, cfg.metrics_port}


def test_every_kind_has_a_schema() -> None:
    kinds = {d["kind"] for _, d in CUSTOM}
    assert kinds == {"InferencePool", "ScaledObject", "ServiceMonitor"}
    assert {d["kind"] for _, d in BUILTIN} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}


@pytest.mark.parametrize(("where", "doc"), BUILTIN + CUSTOM, ids=[w for w, _ in BUILTIN + CUSTOM])
def test_manifest_validates_strictly_against_its_schema(where: str, doc: dict[str, Any]) -> None:
    assert schema_problems(doc) == []


@pytest.mark.parametrize(
    ("kind", "edit", "expected"),
    [
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"].update(
            failureTreshold=3), "failureTreshold"),
        ("InferencePool", lambda d: d["spec"].update(targetPort=8000), "targetPort"),
        ("InferencePool", lambda d: d["spec"]["targetPorts"][0].update(number=0), "minimum"),
        ("ScaledObject", lambda d: d["spec"].update(minReplicaCount="one"), "is not of type 'integer'"),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0].pop("type"), "'type' is a required property"),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervall="15s"), "intervall"),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(scrapeTimeout="10 seconds"), "does not match"),
    ],
)
def test_schema_validation_rejects_misspelt_and_malformed_fields(kind: str, edit: Any, expected: str) -> None:
    doc = copy.deepcopy(next(d for _, d in _objects() if d["kind"] == kind))
    edit(doc)
    problems = schema_problems(doc)
    assert any(expected in p for p in problems), problems


# ---- the metrics the deployment names are the server's --------------------------------------------------------


def test_every_metric_a_dashboard_or_manifest_names_is_exported_by_the_server() -> None:
    named = dm.named_metrics()
    assert {n for _, n in named} >= {"reformer_num_requests_waiting", "reformer_cache_usage_ratio",
                                     "reformer_time_to_first_token_seconds_bucket"}
    assert dm.unknown_metrics() == []


def test_the_metric_check_catches_a_misspelt_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    named = dm.named_metrics()
    monkeypatch.setattr(dm, "named_metrics", lambda: [*named, ("edited", "reformer_cache_usage_percent")])
    assert dm.unknown_metrics() == ["edited: reformer_cache_usage_percent is not a metric the server exports"]
    with pytest.raises(ValueError):
        dm.promql_metric_names("sum(rate(reformer_generation_tokens_total[5m])")


# ---- the manifests agree with each other and with the server ---------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _server_container() -> dict[str, Any]:
    return _one("Deployment")["spec"]["template"]["spec"]["containers"][0]


def _server_config() -> Any:
    """The container's env and args through the server's own flag parser, as the server reads them."""
    container = _server_container()
    env = {e["name"]: e.get("value", "placeholder") for e in container.get("env", [])}
    return parse_config(container.get("args", []), env)


def test_selectors_and_ports_reach_the_server_pods() -> None:
    pod = _one("Deployment")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    service, pool = _one("Service"), _one("InferencePool")
    assert _matches(_one("Deployment")["spec"]["selector"]["matchLabels"], labels)
    assert service["spec"]["clusterIP"] == "None", "a headless Service lets gRPC clients balance across pods"
    assert _matches(service["spec"]["selector"], labels)
    assert _matches(_one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert _matches(_one("ServiceMonitor")["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert _matches(pool["spec"]["selector"]["matchLabels"], labels)
    cfg = _server_config()
    ports = {p["name"]: p["containerPort"] for p in _server_container()["ports"]}
    assert cfg.host == "0.0.0.0"
    assert ports == {"grpc": cfg.port, "http": cfg.http_port, "metrics": cfg.metrics_port}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [cfg.http_port]
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in service_ports for e in _one("ServiceMonitor")["spec"]["endpoints"])


def test_endpoint_picker_serves_the_pool_and_scrapes_the_metrics_port() -> None:
    pool, epp_service = _one("InferencePool"), _one("Service", "reformer-serve-epp")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == epp_service["metadata"]["name"]
    assert ref["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]
    epp = _one("Deployment", "reformer-serve-epp")["spec"]["template"]
    args = dict(a.lstrip("-").split("=", 1) for a in epp["spec"]["containers"][0]["args"])
    assert args["pool-name"] == pool["metadata"]["name"]
    assert int(args["model-server-metrics-port"]) == _server_config().metrics_port
    config = yaml.safe_load(_one("ConfigMap", "reformer-serve-epp")["data"][Path(args["config-file"]).name])
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p["type"] for p in config["plugins"]}
    for profile in config["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= declared
    assert _matches(epp_service["spec"]["selector"], epp["metadata"]["labels"])


def test_probes_ask_the_health_service_names_the_server_answers() -> None:
    container, cfg = _server_container(), _server_config()
    expected = {"startupProbe": "", "livenessProbe": "", "readinessProbe": READINESS_SERVICE}
    for probe, service in expected.items():
        assert container[probe]["grpc"] == {"port": cfg.port, "service": service}, probe


def test_termination_period_covers_prestop_drain_and_teardown() -> None:
    pod_spec, container, cfg = _one("Deployment")["spec"]["template"]["spec"], _server_container(), _server_config()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    termination = pod_spec["terminationGracePeriodSeconds"]
    assert termination >= float(command[1]) + cfg.grace_period + TEARDOWN_MARGIN_S
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= termination, "liveness restarts a drain"
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1 and cfg.device == "cuda"


def test_pods_run_as_the_images_user() -> None:
    dockerfile = DockerfileParser(str(ROOT / "Dockerfile"))
    user = [i["value"] for i in dockerfile.structure if i["instruction"] == "USER"][-1]
    assert str(_one("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == user.split(":")[0]


def test_autoscalers_scale_the_deployment_below_the_servers_caps() -> None:
    cfg = _server_config()
    caps = {"reformer_num_requests_running": cfg.max_batch, "reformer_num_requests_waiting": cfg.max_queue}
    hpa, keda = _one("HorizontalPodAutoscaler"), _one("ScaledObject")
    for target in (hpa["spec"]["scaleTargetRef"], keda["spec"]["scaleTargetRef"]):
        assert (target["kind"], target["name"]) == ("Deployment", "reformer-serve")
    served = {rule["seriesQuery"].split("{")[0].strip() for rule in dm.adapter_rules()}
    for metric in hpa["spec"]["metrics"]:
        name = metric["pods"]["metric"]["name"]
        assert name in served, f"no adapter rule serves {name}"
        assert 0 < float(metric["pods"]["target"]["averageValue"]) < caps[name]
    for trigger in keda["spec"]["triggers"]:
        name = dm.promql_metric_names(trigger["metadata"]["query"])[0]
        limit = caps.get(name, 1.0)  # the cache ratio's cap is 1
        assert 0 < float(trigger["metadata"]["threshold"]) < limit, trigger["name"]


def test_kustomizations_list_every_manifest_of_their_folder() -> None:
    for folder in (DEPLOY, DEPLOY / "gateway"):
        listed = set(yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"])
        present = {p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert listed == present, folder


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "reformer-dashboard.json").read_text())
    assert {"uid", "title", "panels", "schemaVersion", "templating"} <= set(dashboard)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        if p.get("type") != "row":
            assert p["datasource"]["uid"] == "${datasource}" and all(t.get("expr") for t in p["targets"]), p["title"]


# ---- deploy/healthcheck.py against a real health service -------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def _run_healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}  # no REFORMER_* from the test environment
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_healthcheck_exits_zero_only_while_the_service_is_serving(
    health_server: tuple[str, health.HealthServicer],
) -> None:
    address, servicer = health_server
    service = "reformer.v1.TextGeneration"
    servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    not_ready = _run_healthcheck("--address", address)
    assert not_ready.returncode == 1 and "NOT_SERVING" in not_ready.stderr
    assert _run_healthcheck("--address", address, "--service", "").returncode == 0
    servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    assert _run_healthcheck("--address", address).returncode == 0
    unknown = _run_healthcheck("--address", address, "--service", "reformer.v1.Nope")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    proc = _run_healthcheck("--address", "127.0.0.1:1", "--timeout", "2")
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr


# ---- the Dockerfile's steps, replayed without Docker ----------------------------------------------------------


@pytest.mark.slow
def test_image_steps_build_wheels_that_serve_pass_the_healthcheck_and_drain(tmp_path: Path) -> None:
    """scripts/check_image_steps.py: context, codegen, wheels, CMD, HEALTHCHECK, client, /metrics, SIGTERM.

    It serves the bundled model as the image does; while that checkpoint is not in the tree yet (it is
    trained separately), a tiny random one stands in so the image's own steps are still exercised.
    """
    argv = [sys.executable, str(ROOT / "scripts" / "check_image_steps.py"), "--timeout", "300"]
    if not (ROOT / "reformer_infer" / "models" / "austen" / "config.json").is_file():
        import torch

        from reformer_infer import ReformerConfig, ReformerLM, save_model

        torch.manual_seed(0)
        config = ReformerConfig(
            attn_layers=["local", "lsh"],
            hidden_size=32,
            num_attention_heads=2,
            attention_head_size=16,
            feed_forward_size=64,
            lsh_attn_chunk_length=4,
            local_attn_chunk_length=8,
            num_buckets=4,
            num_hashes=2,
            vocab_size=258,
            axial_pos_shape=[16, 16],
            axial_pos_embds_dim=[16, 16],
            max_position_embeddings=256,
        )
        save_model(ReformerLM(config).eval(), tmp_path / "tiny")
        argv += ["--model", str(tmp_path / "tiny")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "HEALTHCHECK passed" in proc.stderr and "image steps: ok" in proc.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_healthcheck_speaks_tls_and_sends_the_token_from_the_server_environment(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=reformer",
         "-addext", "subjectAltName=DNS:reformer.example", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    seen: list[str] = []

    class RecordAuth(grpc.ServerInterceptor):
        def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001, ANN201
            seen.extend(v for k, v in handler_call_details.invocation_metadata if k == "authorization")
            return continuation(handler_call_details)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[RecordAuth()])
    servicer = health.HealthServicer()
    servicer.set("reformer.v1.TextGeneration", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        env = {"PATH": "/usr/bin:/bin", "REFORMER_PORT": str(port), "REFORMER_TLS_CERT": str(cert),
               "REFORMER_AUTH_TOKEN": "s3cret"}  # fmt: skip
        run = [sys.executable, str(HEALTHCHECK), "--timeout", "5"]
        ok = subprocess.run(
            [*run, "--tls-server-name", "reformer.example"], capture_output=True, text=True, env=env
        )
        assert ok.returncode == 0, ok.stderr
        assert seen == ["Bearer s3cret"]
        wrong_name = subprocess.run(
            run, capture_output=True, text=True, env=env
        )  # the cert does not name 127.0.0.1
        assert wrong_name.returncode == 1 and "UNAVAILABLE" in wrong_name.stderr
    finally:
        server.stop(grace=None)
