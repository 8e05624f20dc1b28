"""The client layer over real HTTP against the API stand-in: apply, reads, and each failure mode."""

import threading

import pytest

from functions.engines.knative import manifests
from functions.engines.knative.client import KubeClient, api_client_from_settings
from portal.errors import Conflict, EngineError

from .conftest import make_revision


@pytest.fixture
def namespace(kube, tenant_spec, config):
    for manifest in manifests.tenant_manifests(tenant_spec, config):
        kube.apply(manifest)
    return "nimbus-acme"


def test_apply_is_server_side_apply_with_the_nimbus_field_manager(kube, stand_in, namespace, config):
    service = manifests.service(make_revision(), config, traffic=None)
    stored = kube.apply(service)
    assert stored["metadata"]["generation"] == 1
    assert stored["spec"] == service["spec"]
    patches = [r for r in stand_in.requests if r[0] == "PATCH"]
    assert patches and all(r[2] == "application/apply-patch+yaml" for r in patches)
    assert all(r[3]["fieldManager"] == "nimbus" and r[3]["force"] == "true" for r in patches)
    assert "/apis/serving.knative.dev/v1/namespaces/nimbus-acme/services/hello" in [r[1] for r in patches]
    # Applying the same object again changes nothing; a new template bumps the generation.
    assert kube.apply(service)["metadata"]["generation"] == 1
    assert kube.apply(manifests.service(make_revision(number=4), config, traffic=None))["metadata"]["generation"] == 2


def test_core_objects_read_back(kube, namespace, tenant_spec, config):
    quota = kube.read_core("ResourceQuota", namespace, "nimbus-quota")
    assert quota["spec"]["hard"]["limits.memory"] == "4096Mi"
    assert kube.read_core("Namespace", None, namespace)["metadata"]["labels"]["nimbus.dev/tenant"] == "acme"
    assert kube.read_core("ConfigMap", namespace, "absent") is None


def test_missing_objects_are_none_or_false(kube, namespace):
    assert kube.get_custom("serving.knative.dev/v1", "Service", namespace, "nope") is None
    assert kube.delete_custom("serving.knative.dev/v1", "Service", namespace, "nope") is False
    assert kube.list_custom("serving.knative.dev/v1", "Revision", namespace) == []


def test_writing_into_a_missing_namespace_is_not_found(kube, config):
    with pytest.raises(EngineError, match="applying ConfigMap nimbus-acme/hello-00003-code .*namespace missing"):
        kube.apply(manifests.code_config_map(make_revision(), config))


def test_a_stale_resource_version_is_a_conflict(kube, namespace, config):
    kube.apply(manifests.service(make_revision(), config, traffic=None))
    first = kube.get_custom("serving.knative.dev/v1", "Service", namespace, "hello")
    second = kube.get_custom("serving.knative.dev/v1", "Service", namespace, "hello")
    first["spec"]["traffic"] = [{"revisionName": "hello-00003", "percent": 100}]
    kube.replace_custom("serving.knative.dev/v1", "Service", first)
    second["spec"]["traffic"] = [{"revisionName": "hello-00003", "percent": 100, "tag": "x"}]
    with pytest.raises(Conflict, match="has been modified"):
        kube.replace_custom("serving.knative.dev/v1", "Service", second)


def test_an_invalid_object_is_a_422_naming_the_field(kube, namespace, config):
    service = manifests.service(make_revision(), config, traffic=None)
    service["spec"]["template"]["spec"]["containerConcurrency"] = "lots"
    with pytest.raises(EngineError) as caught:
        kube.apply(service)
    assert caught.value.field == "spec.template.spec.containerConcurrency"
    assert "Kubernetes refused applying Service nimbus-acme/hello" in caught.value.message
    assert "spec.template.spec.containerConcurrency: 'lots' is not of type 'integer'" in caught.value.message


def test_webhook_rules_are_enforced_by_the_stand_in(kube, namespace, config):
    service = manifests.service(make_revision(), config, traffic=None)
    service["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 9090
    with pytest.raises(EngineError, match="port 9090 is reserved"):
        kube.apply(service)


def test_immutable_code_cannot_change(kube, namespace, config):
    kube.apply(manifests.code_config_map(make_revision(), config))
    changed = manifests.code_config_map(make_revision(files={"handler.py": "other"}), config)
    with pytest.raises(EngineError, match="immutable") as caught:
        kube.apply(changed)
    assert caught.value.field == "data"


def test_idempotent_calls_are_retried_after_server_errors(kube, stand_in, namespace):
    stand_in.fail_next = [503, 500]
    assert kube.get_custom("serving.knative.dev/v1", "Service", namespace, "hello") is None
    gets = [r for r in stand_in.requests if r[0] == "GET" and r[1].endswith("/services/hello")]
    assert len(gets) == 3


def test_retries_give_up(kube, stand_in, namespace):
    stand_in.fail_next = [503, 503, 503]
    with pytest.raises(EngineError, match="HTTP 503"):
        kube.get_custom("serving.knative.dev/v1", "Service", namespace, "hello")


def test_a_conditional_write_is_not_retried(kube, stand_in, namespace, config):
    kube.apply(manifests.service(make_revision(), config, traffic=None))
    current = kube.get_custom("serving.knative.dev/v1", "Service", namespace, "hello")
    stand_in.fail_next = [503]
    with pytest.raises(EngineError, match="HTTP 503"):
        kube.replace_custom("serving.knative.dev/v1", "Service", current)
    assert [r[0] for r in stand_in.requests].count("PUT") == 1


def test_a_stalled_api_server_times_out(engine_values, stand_in):
    client = KubeClient.from_settings({**engine_values, "REQUEST_TIMEOUT": 0.3, "RETRIES": 1})
    client.backoff = 0.01
    stand_in.stall.set()
    try:
        with pytest.raises(EngineError, match=r"did not answer reading Service nimbus-acme/hello \(timeout 0.3s, "
                                              r"2 attempt\(s\)\)"):
            client.get_custom("serving.knative.dev/v1", "Service", "nimbus-acme", "hello")
    finally:
        stand_in.stall.clear()
    assert [r[1] for r in stand_in.requests].count("/apis/serving.knative.dev/v1/namespaces/nimbus-acme/services/hello") == 2


def test_wrong_credentials_are_explained(engine_values, stand_in, tmp_path):
    config_text = (tmp_path / "kubeconfig").read_text().replace("stand-in-token", "wrong")
    (tmp_path / "bad").write_text(config_text)
    client = KubeClient.from_settings({**engine_values, "KUBECONFIG": str(tmp_path / "bad")})
    with pytest.raises(EngineError, match=r"not allowed reading Service nimbus-acme/hello \(HTTP 401\)"):
        client.get_custom("serving.knative.dev/v1", "Service", "nimbus-acme", "hello")


def test_without_kubeconfig_outside_a_cluster_the_error_says_what_to_set(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(EngineError, match="NIMBUS_KUBECONFIG"):
        api_client_from_settings({"KUBECONFIG": ""})


def test_watch_streams_the_current_state_then_changes(kube, stand_in, namespace, config):
    kube.apply(manifests.service(make_revision(), config, traffic=None))
    seen = []

    def change_later():
        stand_in.set_status(namespace, "hello", {"url": "http://hello.example.com"})

    timer = threading.Timer(0.2, change_later)
    timer.start()
    for kind, obj in kube.watch_custom("serving.knative.dev/v1", "Service", namespace, "hello", timeout_seconds=5):
        seen.append((kind, (obj.get("status") or {}).get("url")))
        if len(seen) == 2:
            break
    timer.join()
    assert seen == [("ADDED", None), ("MODIFIED", "http://hello.example.com")]


def test_pod_logs(kube, stand_in, namespace):
    stand_in.add_pod(namespace, "hello-00003-deployment-abc", {"serving.knative.dev/service": "hello"},
                     log="2026-11-22T15:00:00.123456789Z one\n2026-11-22T15:00:01Z two\n")
    assert kube.pod_log(namespace, "hello-00003-deployment-abc", container="user-container", tail_lines=1) == \
        "2026-11-22T15:00:01Z two\n"
    assert list(kube.follow_pod_log(namespace, "hello-00003-deployment-abc", container="user-container")) == [
        "2026-11-22T15:00:00.123456789Z one", "2026-11-22T15:00:01Z two"]
    assert kube.pod_log(namespace, "gone", container="user-container") == ""
