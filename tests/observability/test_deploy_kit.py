"""The operator kit in deploy/observability/: every file parses, the dashboard keeps its uid and the
panel ids the portal embeds, and every query names only series the portal really exposes (checked
against a live exposition) or Knative's documented ones."""

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from observability import metrics, panels

KIT = Path(__file__).resolve().parents[2] / "deploy" / "observability"
KNATIVE_SERIES = {"revision_request_count", "revision_request_latencies_bucket",
                  "kn_serving_invocation_duration_seconds_count", "kn_serving_invocation_duration_seconds_bucket"}
METRIC_NAME = re.compile(r"\b((?:nimbus|revision|kn)_[a-z0-9_]+)\b")
LABEL_PARTS = re.compile(r"\{[^}]*\}|\b(?:by|without)\s*\([^)]*\)|, *[a-z_]+\)")


def metric_names(query: str) -> list[str]:
    """Series names in a PromQL query (label matchers, grouping and label_values' label left out)."""
    return METRIC_NAME.findall(LABEL_PARTS.sub(" ", query))


@pytest.fixture(scope="module")
def dashboard():
    return json.loads((KIT / "grafana" / "nimbus-function.json").read_text())


def exposed_series() -> set[str]:
    """Series names in the portal's exposition once every metric has a sample."""
    labels = {"tenant": "kit", "namespace": "nimbus-kit", "function": "f", "service": "f", "revision": "f-00001"}
    metrics.observe(labels, status="error", http_status=500, duration_ms=3, queue_ms=1, cold_start=True,
                    gb_seconds=0.1)
    metrics.cpu_throttled(labels, 0.25)
    names = set()
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        names.update(sample.name for sample in family.samples)
    return names


def test_every_file_parses():
    files = sorted(p for p in KIT.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".yml"))
    assert len(files) == 6
    for path in files:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        assert isinstance(data, dict) and data, path


def test_dashboard_identity_and_variables(dashboard):
    assert dashboard["uid"] == "nimbus-function" == panels.GRAFANA_SLUG
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert {"namespace", "function"} <= set(names)
    ids = {p["id"] for p in dashboard["panels"]}
    assert set(panels.GRAFANA_PANELS.values()) <= ids
    assert len(ids) == len(dashboard["panels"])


def test_dashboard_queries_name_real_metrics(dashboard):
    exposed = exposed_series()
    assert metrics.SERIES <= exposed
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    for query in queries:
        named = set(metric_names(query))
        assert named, query
        assert named <= exposed | KNATIVE_SERIES, (query, named - exposed - KNATIVE_SERIES)
        # Every query filters to the chosen function in the label scheme of the series it reads.
        if any(n.startswith(("nimbus_", "kn_")) for n in named) and "label_values" not in query:
            assert 'namespace="$namespace"' in query and 'service="$function"' in query, query
        if any(n.startswith("revision_") for n in named):
            assert 'namespace_name="$namespace"' in query and 'service_name="$function"' in query, query
    for panel in dashboard["panels"]:
        assert any(metric_names(t["expr"])[0].startswith("nimbus_") for t in panel["targets"]), panel["title"]


def test_prometheus_scrapes_portal_and_relabels_knative_service():
    config = yaml.safe_load((KIT / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["nimbus-portal"]["metrics_path"] == "/metrics"
    relabels = jobs["knative-queue-proxy"]["relabel_configs"]
    assert {"source_labels": ["__meta_kubernetes_pod_label_serving_knative_dev_service"],
            "target_label": "service"} in relabels
    assert {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"} in relabels


def test_grafana_provisioning_points_at_the_dashboard_and_datasource(dashboard):
    providers = yaml.safe_load((KIT / "grafana/provisioning/dashboards/nimbus.yaml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]
    sources = yaml.safe_load((KIT / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert sources[0]["type"] == "prometheus"
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == sources[0]["uid"]


def test_otel_collector_pipeline():
    config = yaml.safe_load((KIT / "otel-collector/config.yaml").read_text())
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"] and "http" in config["receivers"]["otlp"]["protocols"]
    for name in traces["exporters"] + traces["processors"]:
        assert name in config["exporters"] or name in config["processors"], name


def test_fluent_bit_kubernetes_filter_to_elasticsearch():
    config = yaml.safe_load((KIT / "fluent-bit/fluent-bit.yaml").read_text())["pipeline"]
    assert [f["name"] for f in config["filters"]] == ["kubernetes"]
    assert config["filters"][0]["labels"] is True
    output = config["outputs"][0]
    assert output["name"] == "es" and output["replace_dots"] is True
    # The field the embedded Kibana query filters on is the one replace_dots produces.
    assert panels.KIBANA_SERVICE_FIELD == "kubernetes.labels." + "serving.knative.dev/service".replace(".", "_")


def test_readme_documents_every_series():
    readme = (KIT / "README.md").read_text()
    for name in {n for n in metrics.SERIES if not n.endswith(("_sum", "_count"))} | {
            "revision_request_count", "revision_request_latencies", "kn_serving_invocation_duration_seconds"}:
        assert name in readme, name
