"""The Knative engine against a real cluster (``-m k8s``), skipped unless NIMBUS_TEST_KUBECONFIG
points at one. It installs nothing: the Knative CRDs must be there (a bare API server with only
the CRDs is enough). NIMBUS_TEST_KNATIVE_READY=1 also waits for Knative to report Ready, which
needs Knative Serving's controllers and the runtime images. Triggers and sequences become
PingSources, Brokers, Triggers and flows Sequences (Knative Eventing's CRDs must be installed too).
See deploy/kubernetes/README.md.
"""

import base64
import os
import time
import uuid

import pytest

from functions.engines import set_engine
from functions.engines.knative.client import KubeClient
from functions.engines.knative.engine import KnativeEngine
from functions.services import (
    function_create,
    function_delete,
    function_deploy,
    function_env_set,
    function_ref,
    function_secret_set,
    function_traffic_set,
)
from tenancy.services import tenant_create

KUBECONFIG = os.environ.get("NIMBUS_TEST_KUBECONFIG", "")
WAIT_READY = os.environ.get("NIMBUS_TEST_KNATIVE_READY", "") in {"1", "true", "yes"}

pytestmark = [
    pytest.mark.k8s,
    pytest.mark.skipif(not KUBECONFIG, reason="set NIMBUS_TEST_KUBECONFIG to a cluster's kubeconfig to run the k8s suite"),
    pytest.mark.django_db,
]


@pytest.fixture
def cluster(settings, operator):
    values = {
        **settings.NIMBUS_KNATIVE,
        "KUBECONFIG": KUBECONFIG,
        "CONTEXT": os.environ.get("NIMBUS_TEST_KUBE_CONTEXT", ""),
        "NAMESPACE_PREFIX": "nimbus-test-",
        "WAIT_READY": WAIT_READY,
        "DEPLOY_TIMEOUT": float(os.environ.get("NIMBUS_TEST_KNATIVE_TIMEOUT", "300")),
    }
    settings.NIMBUS_ENGINE = "knative"
    settings.NIMBUS_KNATIVE = values
    engine = KnativeEngine(values=values)
    set_engine(engine)
    slug = "k" + uuid.uuid4().hex[:10]
    tenant = tenant_create(acting_user=operator, slug=slug, name=f"k8s suite {slug}")
    yield engine, tenant, f"nimbus-test-{slug}"
    set_engine(None)
    client = engine.client
    try:
        client.call(client.core.delete_namespace, f"nimbus-test-{slug}", what="deleting the test namespace",
                    idempotent=True)
    except Exception:  # noqa: BLE001 - cleanup is best effort; the name is unique
        pass


def deploy(user, function, capture):
    with capture(execute=True):
        revision = function_deploy(acting_user=user, function=function)
    revision.refresh_from_db()
    assert revision.status == "ready", revision.status_message
    return revision


def test_tenant_and_function_objects_on_the_cluster(cluster, operator, django_capture_on_commit_callbacks):
    engine, tenant, namespace = cluster
    client: KubeClient = engine.client
    function = function_create(acting_user=operator, tenant=tenant, name="hello", starter="hello")
    function_env_set(acting_user=operator, function=function, name="GREETING", value="hello from k8s")
    function_secret_set(acting_user=operator, function=function, name="API_KEY", value="k8s-secret")
    first = deploy(operator, function, django_capture_on_commit_callbacks)

    ns = client.read_core("Namespace", None, namespace)
    assert ns["metadata"]["labels"]["nimbus.dev/tenant"] == tenant.slug
    quota = client.read_core("ResourceQuota", namespace, "nimbus-quota")
    assert quota["spec"]["hard"]["limits.memory"] == f"{tenant.quota.max_total_memory_mb}Mi"
    limits = client.read_core("LimitRange", namespace, "nimbus-limits")
    assert limits["spec"]["limits"][0]["max"]["memory"] == f"{tenant.quota.max_memory_mb_per_function}Mi"
    policy = client.read_core("NetworkPolicy", namespace, "nimbus-deny-egress")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"nimbus.dev/egress": "denied"}

    service = client.get_custom("serving.knative.dev/v1", "Service", namespace, "hello")
    template = service["spec"]["template"]
    assert template["metadata"]["name"] == "hello-00001"
    assert template["metadata"]["labels"]["nimbus.dev/egress"] == ("allowed" if function.allow_egress else "denied")
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] == str(function.max_instances)
    assert template["spec"]["containerConcurrency"] == function.concurrency
    container = template["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["GREETING"]["value"] == "hello from k8s"
    assert env["API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "hello-00001-secrets", "key": "API_KEY"}
    code = client.read_core("ConfigMap", namespace, "hello-00001-code")
    items = template["spec"]["volumes"][0]["configMap"]["items"]
    assert {item["path"]: code["data"][item["key"]] for item in items} == first.files
    secret = client.read_core("Secret", namespace, "hello-00001-secrets")
    assert base64.b64decode(secret["data"]["API_KEY"]).decode() == "k8s-secret"

    deploy(operator, function, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        function_traffic_set(acting_user=operator, function=function,
                             targets=[{"revision": 2, "percent": 60}, {"revision": 1, "percent": 40, "tag": "old"}])
    traffic = client.get_custom("serving.knative.dev/v1", "Service", namespace, "hello")["spec"]["traffic"]
    assert [(t["revisionName"], t["percent"], t.get("tag")) for t in traffic] == [
        ("hello-00002", 60, None), ("hello-00001", 40, "old")]

    if WAIT_READY:
        deadline = time.monotonic() + 120
        while not (status := engine.status(function_ref(function))).ready and time.monotonic() < deadline:
            time.sleep(2)
        assert status.ready and status.url, status.message
        assert {(r.revision, r.percent) for r in status.revisions} == {(2, 60), (1, 40)}

    with django_capture_on_commit_callbacks(execute=True):
        function_delete(acting_user=operator, function=function)
    assert client.get_custom("serving.knative.dev/v1", "Service", namespace, "hello") is None
    assert client.read_core("ConfigMap", namespace, "hello-00001-code") is None


def test_triggers_and_sequences_become_eventing_objects(cluster, operator, django_capture_on_commit_callbacks):
    from functions.services_triggers import sequence_create, sequence_delete, trigger_create, trigger_update

    engine, tenant, namespace = cluster
    client: KubeClient = engine.client
    function = function_create(acting_user=operator, tenant=tenant, name="on-order", starter="cloudevent")
    deploy(operator, function, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        nightly = trigger_create(acting_user=operator, function=function, name="nightly", kind="cron",
                                 schedule="0 3 * * *", time_zone="Europe/Berlin")
    with django_capture_on_commit_callbacks(execute=True):
        trigger_create(acting_user=operator, function=function, name="created", kind="event",
                       filters=[{"attribute": "type", "value": "com.example.order.created", "match": "exact"}])

    ping = client.get_custom("sources.knative.dev/v1", "PingSource", namespace, "on-order-nightly")
    assert ping["spec"]["schedule"] == "0 3 * * *"
    assert ping["spec"]["sink"]["ref"]["name"] == "on-order"
    assert client.get_custom("eventing.knative.dev/v1", "Broker", namespace, "default") is not None
    trigger = client.get_custom("eventing.knative.dev/v1", "Trigger", namespace, "on-order-created")
    assert trigger["spec"]["broker"] == "default"
    assert trigger["spec"]["filter"]["attributes"] == {"type": "com.example.order.created"}
    assert trigger["spec"]["subscriber"]["ref"]["name"] == "on-order"

    # Disabling the cron trigger removes its PingSource and keeps the event Trigger.
    with django_capture_on_commit_callbacks(execute=True):
        trigger_update(acting_user=operator, trigger=nightly, enabled=False)
    assert client.get_custom("sources.knative.dev/v1", "PingSource", namespace, "on-order-nightly") is None
    assert client.get_custom("eventing.knative.dev/v1", "Trigger", namespace, "on-order-created") is not None

    with django_capture_on_commit_callbacks(execute=True):
        sequence = sequence_create(acting_user=operator, tenant=tenant, name="pipeline", functions=["on-order"])
    flow = client.get_custom("flows.knative.dev/v1", "Sequence", namespace, "pipeline")
    assert [step["ref"]["name"] for step in flow["spec"]["steps"]] == ["on-order"]
    with django_capture_on_commit_callbacks(execute=True):
        sequence_delete(acting_user=operator, sequence=sequence)
    assert client.get_custom("flows.knative.dev/v1", "Sequence", namespace, "pipeline") is None
