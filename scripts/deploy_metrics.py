"""Which metrics the deployment files name, and which ones the server exports.

    python scripts/deploy_metrics.py     # prints every name and exits 1 if one is not exported

Named: every metric selected by a PromQL expression (promql-parser) of the Grafana dashboard, the
prometheus-adapter rules and the KEDA ScaledObject; the HPA's metric names (served by the adapter under the
series' own name); and the metric flags of the gateway's endpoint picker. Exported: the series a real
`ServerMetrics` registry shows after it has served one request through the same calls the servicer makes
(no source scraping). Used by tests/test_deploy.py and scripts/check_image_steps.py.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "reformer-dashboard.json"
ADAPTER_CONFIG = DEPLOY / "monitoring" / "prometheus-adapter-config.yaml"
ADAPTER_VALUES = DEPLOY / "monitoring" / "prometheus-adapter-values.yaml"
# The endpoint picker's flags that name a model-server metric (gateway-api-inference-extension EPP).
EPP_METRIC_FLAGS = ("--total-queued-requests-metric", "--total-running-requests-metric",
                    "--kv-cache-usage-percentage-metric")


def server_series() -> set[str]:
    """Every sample name a server's /metrics shows once it has served a request (CUDA gauges included)."""
    for path in (str(ROOT), str(ROOT / "server")):
        if path not in sys.path:
            sys.path.append(path)
    import prometheus_client
    from reformer_server.metrics import ServerMetrics

    from reformer_infer.requests import EngineStats, FinishEvent, FinishReason

    prometheus_client.disable_created_metrics()  # as ReformerServer does
    m = ServerMetrics()
    m.bind_engine(lambda: EngineStats(cache_bytes_budget=1))
    m.bind_cuda("cuda:0")  # the allocator gauges read 0 on a machine without CUDA
    m.set_model("m", "eager", {})
    tracker = m.request_tracker(3)
    tracker.tokens(1)
    tracker.tokens(1)
    tracker.finished(FinishEvent("r", FinishReason.LENGTH, prompt_tokens=3, generated_tokens=2), "length")
    m.rpc_done("Generate", "OK")
    m.http_done("/v1/completions", 200)
    return {s.name for family in m.registry.collect() for s in family.samples}


def _yaml_docs(path: Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(path.read_text()):
        if isinstance(doc, dict):
            yield doc


def _docs_of_kind(kind: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if "schemas" not in path.relative_to(DEPLOY).parts:
            yield from ((path, d) for d in _yaml_docs(path) if d.get("kind") == kind)


def adapter_rules() -> list[dict[str, Any]]:
    """The adapter rules of the ConfigMap; the Helm values must carry the same list."""
    configmap = yaml.safe_load(ADAPTER_CONFIG.read_text())
    rules = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    if values["rules"]["custom"] != rules:
        raise ValueError(f"{ADAPTER_VALUES.name} rules.custom differ from {ADAPTER_CONFIG.name}")
    return rules


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) of the dashboard's panels and variables, the adapter rules and the KEDA triggers."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    out = [(f"dashboard panel {p.get('title')!r}", t["expr"]) for p in panels for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            out.append((f"dashboard variable {variable['name']}", re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1",
                                                                        query.strip())))
    for i, rule in enumerate(adapter_rules()):
        # The adapter fills in its Go templates before it queries; so do we.
        metrics_query = (rule["metricsQuery"].replace("<<.Series>>", rule["seriesQuery"].split("{")[0].strip())
                         .replace("<<.LabelMatchers>>", 'pod=~"reformer-serve-.*"').replace("<<.GroupBy>>", "pod"))
        out += [(f"adapter rule {i}", rule["seriesQuery"]), (f"adapter rule {i}", metrics_query)]
    for path, obj in _docs_of_kind("ScaledObject"):
        for trigger in obj["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                out.append((f"{path.relative_to(ROOT)} trigger {trigger.get('name')}", trigger["metadata"]["query"]))
    return out


def promql_metric_names(expr: str) -> list[str]:
    """The metrics one PromQL expression selects (Grafana's interval variables filled in); ValueError if it
    does not parse."""
    import promql_parser

    tree = promql_parser.parse(re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr))
    names: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name or "")
        return True

    promql_parser.walk(tree, visit)
    return names


def named_metrics() -> list[tuple[str, str]]:
    """(where, metric name) of every metric the deployment files name."""
    out = [(where, name) for where, expr in queries() for name in promql_metric_names(expr) or [""]]
    for path, hpa in _docs_of_kind("HorizontalPodAutoscaler"):
        out += [(f"{path.relative_to(ROOT)}", m["pods"]["metric"]["name"]) for m in hpa["spec"]["metrics"]
                if m["type"] == "Pods"]
    for path, deployment in _docs_of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for arg in container.get("args", []):
                flag, _, value = arg.partition("=")
                if flag in EPP_METRIC_FLAGS:
                    out.append((f"{path.relative_to(ROOT)} {flag}", value))
    return out


def unknown_metrics() -> list[str]:
    exported = server_series()
    return [f"{where}: {name or 'a selector without a metric name'} is not a metric the server exports"
            for where, name in named_metrics() if name not in exported]


if __name__ == "__main__":
    for where, name in named_metrics():
        print(f"{name:50s} {where}")
    problems = unknown_metrics()
    print("\n".join(problems) or "all exported", file=sys.stderr)
    sys.exit(1 if problems else 0)
