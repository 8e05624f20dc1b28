"""Fixtures for the Knative engine tests: specs, the API stand-in, a kubeconfig, an engine."""

import threading
import time

import pytest

from functions.engines.base import FunctionRef, RevisionSpec, TenantSpec
from functions.engines.knative.client import KubeClient
from functions.engines.knative.engine import KnativeEngine
from functions.engines.knative.manifests import KnativeConfig

from . import schemas
from .apiserver import KubeStandIn

QUOTA = {"max_functions": 5, "max_memory_mb_per_function": 512, "max_total_memory_mb": 4096,
         "max_instances_per_function": 3, "max_gpus": 1, "max_concurrent_invocations": 200}
IMAGES = {"python3.11": "registry.example.com/nimbus/runtime-python:3.11",
          "node20": "registry.example.com/nimbus/runtime-node:20"}


@pytest.fixture
def config():
    return KnativeConfig(namespace_prefix="nimbus-", runtime_images=IMAGES, sandbox_runtime_class="gvisor",
                         dedicated_node_label="nimbus.dev/tenant", code_dir="/var/nimbus/code",
                         scale_to_zero_retention="30s")


@pytest.fixture
def tenant_spec():
    return TenantSpec(slug="acme", isolation="shared", quota=dict(QUOTA))


def make_revision(number=3, *, tenant=None, **overrides):
    tenant = tenant or TenantSpec(slug="acme", isolation="shared", quota=dict(QUOTA))
    values = dict(function=FunctionRef(tenant="acme", name="hello", function_id=7), number=number,
                  revision_id=40 + number, content_hash="c0ffee" * 10 + "abcd", runtime="python3.11",
                  handler="handler.handle", files={"handler.py": "def handle(event, context):\n    return 'hi'\n"},
                  tenant=tenant)
    values.update(overrides)
    return RevisionSpec(**values)


@pytest.fixture
def stand_in():
    # The stand-in enforces the CRD schemas like a real API server; without them it cannot.
    if not schemas.crds_present():
        pytest.skip(f"the shared Knative CRDs are not at {schemas.CRD_DIR} (set NIMBUS_KNATIVE_CRDS)")
    server = KubeStandIn().start()
    yield server
    server.stop()


@pytest.fixture
def engine_values(stand_in, tmp_path):
    return {"KUBECONFIG": str(stand_in.kubeconfig(tmp_path / "kubeconfig")), "CONTEXT": "stand-in",
            "NAMESPACE_PREFIX": "nimbus-", "RUNTIME_IMAGES": IMAGES, "REQUEST_TIMEOUT": 2, "RETRIES": 2,
            "DEPLOY_TIMEOUT": 10, "WAIT_READY": True, "DOMAIN": "example.com", "SCALE_TO_ZERO_RETENTION": "30s"}


@pytest.fixture
def kube(engine_values):
    client = KubeClient.from_settings(engine_values)
    client.backoff = 0.01
    return client


@pytest.fixture
def engine(engine_values, kube):
    return KnativeEngine(client=kube, values=engine_values)


def ready_status(revision_name: str, *, url="http://hello.nimbus-acme.example.com", traffic=None) -> dict:
    status = {"latestCreatedRevisionName": revision_name, "latestReadyRevisionName": revision_name, "url": url,
              "conditions": [{"type": "ConfigurationsReady", "status": "True"},
                             {"type": "RoutesReady", "status": "True"},
                             {"type": "Ready", "status": "True"}]}
    if traffic is not None:
        status["traffic"] = traffic
    return status


class FakeKnative:
    """Plays Knative Serving's controllers on the stand-in: after a Service write it stamps out the
    template's Revision and reports it ready, or failed with ``fail_message``, or never."""

    def __init__(self, mode="ready", fail_message="", delay=0.05):
        self.mode, self.fail_message, self.delay = mode, fail_message, delay
        self.done = threading.Event()

    def __call__(self, stand_in, key, obj):
        prefix, plural, namespace, name = key
        if plural != "services":
            return
        time.sleep(self.delay)
        revision = obj["spec"]["template"]["metadata"]["name"]
        ready = self.mode == "ready"
        stand_in.put("apis/serving.knative.dev/v1", "revisions", {
            "apiVersion": "serving.knative.dev/v1", "kind": "Revision",
            "metadata": {"name": revision, "namespace": namespace,
                         "labels": {"serving.knative.dev/service": name}},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "Unknown"}]}})
        current = stand_in.service(namespace, name)
        if current is None:
            return
        previous = (current.get("status") or {}).get("latestReadyRevisionName")
        traffic = [dict(t, url=f"http://{t['tag']}-{name}.{namespace}.example.com") if t.get("tag") else t
                   for t in current["spec"].get("traffic") or [{"revisionName": revision, "percent": 100}]]
        if self.mode == "ready":
            status = ready_status(revision, traffic=traffic)
        elif self.mode == "failed":
            status = {"latestCreatedRevisionName": revision, "latestReadyRevisionName": previous,
                      "conditions": [{"type": "ConfigurationsReady", "status": "False", "reason": "RevisionFailed",
                                      "message": self.fail_message},
                                     {"type": "Ready", "status": "False", "reason": "RevisionFailed",
                                      "message": self.fail_message}]}
        else:  # "slow": created, never ready
            status = {"latestCreatedRevisionName": revision, "latestReadyRevisionName": previous,
                      "conditions": [{"type": "ConfigurationsReady", "status": "Unknown",
                                      "message": "Waiting for the revision's pods"}]}
        stand_in.set_status(namespace, name, status)
        self.done.set()
