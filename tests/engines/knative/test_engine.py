"""KnativeEngine over real HTTP against the API stand-in, with a fake Knative controller."""

import json

import pytest

from functions.engines.base import DeployEvent, FunctionRef, TrafficSpec
from functions.engines.knative.client import KubeClient
from functions.engines.knative.engine import KnativeEngine, parse_log_line, revision_progress
from portal.errors import EngineError, InvalidSource

from .conftest import FakeKnative, make_revision, ready_status

SERVING = "apis/serving.knative.dev/v1"
REF = FunctionRef(tenant="acme", name="hello", function_id=7)


@pytest.fixture
def tenant_ready(engine, tenant_spec):
    engine.ensure_tenant(tenant_spec)
    return "nimbus-acme"


def deploy(engine, number, traffic=None, **overrides):
    events: list[DeployEvent] = []
    spec = make_revision(number=number, **overrides)
    traffic = traffic if traffic is not None else [TrafficSpec(number, 100)]
    try:
        engine.deploy(spec, traffic=traffic, progress=events.append)
    finally:
        deploy.events = events
    return events


def test_ensure_tenant_applies_namespace_quota_and_limits(engine, stand_in, tenant_spec):
    engine.ensure_tenant(tenant_spec)
    engine.ensure_tenant(tenant_spec)  # idempotent
    assert stand_in.get("api/v1", "namespaces", None, "nimbus-acme")["metadata"]["labels"]["nimbus.dev/tenant"] == "acme"
    assert stand_in.get("api/v1", "resourcequotas", "nimbus-acme", "nimbus-quota")["spec"]["hard"]["pods"] == "15"
    limits = stand_in.get("api/v1", "limitranges", "nimbus-acme", "nimbus-limits")["spec"]["limits"][0]
    assert limits["max"] == {"memory": "512Mi"}
    policy = stand_in.get("apis/networking.k8s.io/v1", "networkpolicies", "nimbus-acme", "nimbus-deny-egress")
    assert policy["spec"]["policyTypes"] == ["Egress"]


def test_deploy_follows_the_watch_to_ready_then_routes_traffic(engine, stand_in, tenant_ready):
    stand_in.controller = FakeKnative("ready")
    events = deploy(engine, 1, secrets={"TOKEN": "t"})
    assert [(e.step, e.status) for e in events] == [
        ("manifests", "ok"), ("instance", "running"), ("instance", "ok"), ("health", "ok"), ("traffic", "ok")]
    assert events[0].message == ("Applied ConfigMap hello-00001-code, Secret hello-00001-secrets in namespace "
                                 "nimbus-acme.")
    assert events[-1].message == "Traffic: hello-00001 100%."
    service = stand_in.service(tenant_ready, "hello")
    assert service["spec"]["template"]["metadata"]["name"] == "hello-00001"
    assert service["spec"]["traffic"] == [{"revisionName": "hello-00001", "latestRevision": False, "percent": 100}]
    assert stand_in.get("api/v1", "configmaps", tenant_ready, "hello-00001-code")["data"]["handler.py"].startswith("def")
    assert stand_in.get("api/v1", "secrets", tenant_ready, "hello-00001-secrets")["data"] == {"TOKEN": "dA=="}
    # The watch asked for this one Service.
    assert any(r[0] == "GET" and r[1].endswith("/namespaces/nimbus-acme/services") and r[3]["watch"] == "true"
               and r[3]["fieldSelector"] == "metadata.name=hello" for r in stand_in.requests)


def test_a_failed_revision_reports_knatives_message_and_keeps_the_old_traffic(engine, stand_in, tenant_ready):
    stand_in.controller = FakeKnative("ready")
    deploy(engine, 1)
    stand_in.controller = FakeKnative("failed", fail_message='Container failed with: ModuleNotFoundError: "numpy"')
    with pytest.raises(EngineError, match='Revision hello-00002 failed: Container failed with: ModuleNotFoundError'):
        deploy(engine, 2)
    assert (deploy.events[-1].step, deploy.events[-1].status) == ("health", "failed")
    service = stand_in.service(tenant_ready, "hello")
    assert service["spec"]["template"]["metadata"]["name"] == "hello-00002"
    assert service["spec"]["traffic"] == [{"revisionName": "hello-00001", "latestRevision": False, "percent": 100}]


def test_a_revision_that_never_becomes_ready_hits_the_deadline(engine_values, kube, stand_in, tenant_spec):
    engine = KnativeEngine(client=kube, values={**engine_values, "DEPLOY_TIMEOUT": 2})
    engine.ensure_tenant(tenant_spec)
    stand_in.controller = FakeKnative("slow")
    with pytest.raises(EngineError, match=r"Revision hello-00001 was not ready within 2s: Waiting for the revision's pods"):
        deploy(engine, 1)
    assert [(e.step, e.status) for e in deploy.events][-2:] == [("instance", "ok"), ("health", "failed")]
    # Nothing was routed to the revision that never came up.
    assert "traffic" not in stand_in.service("nimbus-acme", "hello")["spec"]


def test_watches_cut_short_are_resumed_until_the_revision_is_ready(engine, stand_in, tenant_ready):
    stand_in.watch_limit = 0.2
    stand_in.controller = None
    made_ready = []

    def knative_catches_up(method, path):
        # After a few watches, Knative reports the revision ready.
        watches = [r for r in stand_in.requests if r[0] == "GET" and r[1].endswith("/services")]
        if len(watches) == 3 and not made_ready:
            made_ready.append(True)
            stand_in.set_status(tenant_ready, "hello", ready_status("hello-00001"))

    stand_in.on_request = knative_catches_up
    events = deploy(engine, 1)
    assert [(e.step, e.status) for e in events][-2:] == [("health", "ok"), ("traffic", "ok")]
    assert made_ready
    assert len([r for r in stand_in.requests if r[0] == "GET" and r[1].endswith("/services")]) >= 3


def test_a_stalled_api_server_fails_the_deploy_with_a_timeout(engine_values, stand_in, tenant_ready):
    client = KubeClient.from_settings({**engine_values, "REQUEST_TIMEOUT": 0.3, "RETRIES": 0})
    engine = KnativeEngine(client=client, values=engine_values)
    stand_in.stall.set()
    try:
        with pytest.raises(EngineError, match=r"did not answer reading Service nimbus-acme/hello \(timeout 0.3s"):
            deploy(engine, 1)
    finally:
        stand_in.stall.clear()
    assert stand_in.service("nimbus-acme", "hello") is None


def test_without_waiting_the_objects_are_applied_on_a_bare_api_server(engine_values, kube, stand_in, tenant_spec):
    engine = KnativeEngine(client=kube, values={**engine_values, "WAIT_READY": False})
    engine.ensure_tenant(tenant_spec)
    events = deploy(engine, 1)
    assert [(e.step, e.status) for e in events] == [
        ("manifests", "ok"), ("instance", "running"), ("health", "ok"), ("traffic", "ok")]
    assert stand_in.service("nimbus-acme", "hello")["spec"]["traffic"][0]["revisionName"] == "hello-00001"


def test_a_source_too_big_for_a_config_map_is_refused_before_anything_is_written(engine, stand_in, tenant_ready):
    writes_before = len(stand_in.requests)
    with pytest.raises(InvalidSource):
        deploy(engine, 1, files={"handler.py": "x", "blob.txt": "b" * 1_100_000})
    assert [r for r in stand_in.requests[writes_before:] if r[0] in ("PATCH", "PUT", "POST")] == []


def test_deploying_into_a_tenant_without_namespace_fails_clearly(engine, stand_in):
    with pytest.raises(EngineError, match=r"Not found on the cluster: applying ConfigMap nimbus-acme/hello-00001-code "
                                          r"\(is the tenant's namespace missing\?\)\."):
        deploy(engine, 1)


def test_status_from_conditions(engine, stand_in, tenant_ready):
    assert engine.status(REF).message == "Not deployed on the cluster."
    stand_in.controller = None
    engine_values_wait = engine.wait_ready
    engine.wait_ready = False
    deploy(engine, 1)
    engine.wait_ready = engine_values_wait
    stand_in.set_status(tenant_ready, "hello", {
        "latestCreatedRevisionName": "hello-00001",
        "conditions": [{"type": "Ready", "status": "False", "reason": "RevisionMissing",
                        "message": "Configuration \"hello\" is waiting for a Revision to become ready."}]})
    status = engine.status(REF)
    assert (status.ready, status.latest_ready_revision) == (False, None)
    assert status.message == 'Configuration "hello" is waiting for a Revision to become ready.'
    assert status.url == "http://hello.nimbus-acme.example.com"  # from the configured domain

    stand_in.put(SERVING, "revisions", {"apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                                        "metadata": {"name": "hello-00001", "namespace": tenant_ready,
                                                     "labels": {"serving.knative.dev/service": "hello"}},
                                        "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    for i, ready in enumerate([True, True, False]):
        stand_in.add_pod(tenant_ready, f"hello-00001-deployment-{i}",
                         {"serving.knative.dev/service": "hello", "serving.knative.dev/revision": "hello-00001"},
                         ready=ready)
    stand_in.set_status(tenant_ready, "hello", ready_status("hello-00001", url="https://hello.acme.example.org", traffic=[
        {"revisionName": "hello-00001", "percent": 100, "tag": "live", "url": "https://live-hello.acme.example.org"}]))
    status = engine.status(REF)
    assert (status.ready, status.url, status.latest_ready_revision, status.offline) == (
        True, "https://hello.acme.example.org", 1, False)
    assert [(r.revision, r.ready, r.percent, r.tag, r.instances, r.url) for r in status.revisions] == [
        (1, True, 100, "live", 2, "https://live-hello.acme.example.org")]


def test_set_traffic_splits_between_revisions(engine, stand_in, tenant_ready):
    stand_in.controller = FakeKnative("ready")
    deploy(engine, 1)
    deploy(engine, 2)
    engine.set_traffic(REF, [TrafficSpec(2, 80), TrafficSpec(1, 20, "previous")])
    assert stand_in.service(tenant_ready, "hello")["spec"]["traffic"] == [
        {"revisionName": "hello-00002", "latestRevision": False, "percent": 80},
        {"revisionName": "hello-00001", "latestRevision": False, "percent": 20, "tag": "previous"}]
    status = engine.status(REF)
    assert [(r.revision, r.percent, r.tag) for r in status.revisions] == [(2, 80, ""), (1, 20, "previous")]


def test_set_traffic_reads_again_after_a_conflict(engine, stand_in, tenant_ready):
    stand_in.controller = FakeKnative("ready")
    deploy(engine, 1)
    stand_in.controller = None
    puts = []

    def concurrent_writer(method, path):
        if method == "PUT":
            puts.append(path)
            if len(puts) == 1:  # someone else writes between our read and our write
                stand_in.set_status(tenant_ready, "hello", ready_status("hello-00001"))

    stand_in.on_request = concurrent_writer
    engine.set_traffic(REF, [TrafficSpec(1, 100, "stable")])
    assert len(puts) == 2
    assert stand_in.service(tenant_ready, "hello")["spec"]["traffic"][0]["tag"] == "stable"


def test_set_traffic_needs_a_deployed_function(engine, tenant_ready):
    with pytest.raises(EngineError, match="has no Knative Service yet"):
        engine.set_traffic(REF, [TrafficSpec(1, 100)])


def test_offline_removes_the_public_route_and_survives_a_redeploy(engine, stand_in, tenant_ready):
    stand_in.controller = FakeKnative("ready")
    deploy(engine, 1)
    engine.set_offline(REF, True)
    service = stand_in.service(tenant_ready, "hello")
    assert service["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
    assert service["spec"]["traffic"][0]["revisionName"] == "hello-00001"
    assert engine.status(REF).offline is True
    deploy(engine, 2)
    assert stand_in.service(tenant_ready, "hello")["metadata"]["labels"]["networking.knative.dev/visibility"] == \
        "cluster-local"
    engine.set_offline(REF, False)
    service = stand_in.service(tenant_ready, "hello")
    assert "networking.knative.dev/visibility" not in service["metadata"]["labels"]
    assert engine.status(REF).offline is False


def test_delete_removes_the_service_code_and_secrets(engine, stand_in, tenant_ready):
    stand_in.controller = FakeKnative("ready")
    deploy(engine, 1, secrets={"A": "b"})
    deploy(engine, 2)
    engine.delete(REF)
    assert stand_in.service(tenant_ready, "hello") is None
    left = [k for k in stand_in.objects if k[1] in ("configmaps", "secrets")]
    assert left == []
    engine.delete(REF)  # absent is not an error
    assert stand_in.get("api/v1", "resourcequotas", tenant_ready, "nimbus-quota") is not None


def log_line(time, message, **extra):
    return f"{time} " + json.dumps({"time": time, "level": "INFO", "message": message, **extra})


def test_logs_of_the_functions_instances(engine, stand_in, tenant_ready):
    labels = {"serving.knative.dev/service": "hello"}
    stand_in.add_pod(tenant_ready, "hello-00001-deployment-a", {**labels, "serving.knative.dev/revision": "hello-00001"},
                     log="\n".join([log_line("2026-11-22T10:00:00.000000001Z", "first", invocation_id="inv-1"),
                                    log_line("2026-11-22T10:00:02Z", "third")]))
    stand_in.add_pod(tenant_ready, "hello-00002-deployment-b", {**labels, "serving.knative.dev/revision": "hello-00002"},
                     log="2026-11-22T10:00:01Z plain text from a crashed import\n")
    lines = list(engine.logs(REF))
    assert [(line.message, line.revision, line.invocation_id) for line in lines] == [
        ("first", 1, "inv-1"), ("plain text from a crashed import", 2, None), ("third", 1, None)]
    assert [line.message for line in engine.logs(REF, revision=2)] == ["plain text from a crashed import"]
    assert [line.message for line in engine.logs(REF, limit=1)] == ["third"]
    followed = list(engine.logs(REF, revision=1, follow=True))
    assert [line.message for line in followed] == ["first", "third"]
    assert followed[0].instance == "hello-00001-deployment-a"


def test_parse_log_line():
    line = parse_log_line('2026-11-22T10:00:00.123456789Z {"level": "error", "message": "boom"}', revision=3,
                          instance="p")
    assert (line.time.isoformat(), line.level, line.message, line.revision) == (
        "2026-11-22T10:00:00.123456+00:00", "ERROR", "boom", 3)
    assert parse_log_line("not a log line", revision=None, instance="p") is None


def test_revision_progress_ignores_status_older_than_the_spec():
    service = {"metadata": {"generation": 3},
               "status": {"observedGeneration": 2, "latestReadyRevisionName": "hello-00003"}}
    assert revision_progress(service, "hello-00003") == ("pending", "")
    service["status"]["observedGeneration"] = 3
    assert revision_progress(service, "hello-00003") == ("ready", "")


def test_choosing_the_engine_needs_no_cluster(settings, monkeypatch):
    from functions.engines import get_engine, set_engine

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings.NIMBUS_ENGINE = "knative"
    settings.NIMBUS_KNATIVE = {**settings.NIMBUS_KNATIVE, "KUBECONFIG": ""}
    set_engine(None)
    try:
        engine = get_engine()
        assert isinstance(engine, KnativeEngine)
        # The first call that needs the API says what is missing.
        with pytest.raises(EngineError, match="needs NIMBUS_KUBECONFIG or to run inside a cluster"):
            engine.status(REF)
    finally:
        set_engine(None)
