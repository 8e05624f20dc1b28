"""The pure builders: literal expected manifests, and every one valid for its kind's schema."""

import base64

import pytest

from functions.engines.base import TenantSpec, TrafficSpec
from functions.engines.knative import manifests, names
from portal.errors import EngineError, InvalidSource

from . import schemas
from .conftest import QUOTA, make_revision

needs_crds = pytest.mark.skipif(not schemas.crds_present(),
                                reason=f"the shared Knative CRDs are not at {schemas.CRD_DIR}")

LABELS = {"app.kubernetes.io/managed-by": "nimbus", "nimbus.dev/tenant": "acme", "nimbus.dev/function": "hello",
          "nimbus.dev/function-id": "7"}


def test_tenant_namespace_quota_and_limit_range(tenant_spec, config):
    assert manifests.tenant_manifests(tenant_spec, config) == [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "nimbus-acme", "labels": {"app.kubernetes.io/managed-by": "nimbus",
                                                         "nimbus.dev/tenant": "acme",
                                                         "nimbus.dev/isolation": "shared"}}},
        {"apiVersion": "v1", "kind": "ResourceQuota",
         "metadata": {"name": "nimbus-quota", "namespace": "nimbus-acme",
                      "labels": {"app.kubernetes.io/managed-by": "nimbus", "nimbus.dev/tenant": "acme"}},
         "spec": {"hard": {"count/services.serving.knative.dev": "5", "pods": "15", "requests.memory": "4096Mi",
                           "limits.memory": "4096Mi", "requests.nvidia.com/gpu": "1"}}},
        {"apiVersion": "v1", "kind": "LimitRange",
         "metadata": {"name": "nimbus-limits", "namespace": "nimbus-acme",
                      "labels": {"app.kubernetes.io/managed-by": "nimbus", "nimbus.dev/tenant": "acme"}},
         "spec": {"limits": [{"type": "Container", "max": {"memory": "512Mi"}, "default": {"memory": "128Mi"},
                              "defaultRequest": {"memory": "64Mi", "cpu": "25m"}}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "nimbus-deny-egress", "namespace": "nimbus-acme",
                      "labels": {"app.kubernetes.io/managed-by": "nimbus", "nimbus.dev/tenant": "acme"}},
         "spec": {"podSelector": {"matchLabels": {"nimbus.dev/egress": "denied"}}, "policyTypes": ["Egress"],
                  "egress": []}},
    ]


def test_limit_range_defaults_never_exceed_a_small_ceiling(config):
    tenant = TenantSpec(slug="tiny", quota={"max_memory_mb_per_function": 96})
    limit = manifests.tenant_limit_range(tenant, config)["spec"]["limits"][0]
    assert limit == {"type": "Container", "max": {"memory": "96Mi"}, "default": {"memory": "96Mi"},
                     "defaultRequest": {"memory": "64Mi", "cpu": "25m"}}


@pytest.mark.parametrize(("isolation", "expected"), [
    ("shared", {}),
    ("sandboxed", {"runtimeClassName": "gvisor"}),
    ("dedicated", {"nodeSelector": {"nimbus.dev/tenant": "acme"},
                   "tolerations": [{"key": "nimbus.dev/tenant", "operator": "Equal", "value": "acme",
                                    "effect": "NoSchedule"}]}),
])
def test_isolation_places_the_pods(isolation, expected, config):
    spec = make_revision(tenant=TenantSpec(slug="acme", isolation=isolation, quota=QUOTA))
    pod_spec = manifests.service(spec, config, traffic=None)["spec"]["template"]["spec"]
    for key in ("runtimeClassName", "nodeSelector", "tolerations"):
        assert pod_spec.get(key) == expected.get(key)


def test_unknown_isolation_is_refused(config):
    with pytest.raises(EngineError, match="isolation"):
        manifests.isolation_pod_fields(TenantSpec(slug="acme", isolation="moon"), config)


def test_service_for_a_revision(config):
    spec = make_revision(number=3, env={"GREETING": "hi", "PORT": "1", "TOKEN": "plain"},
                         secrets={"TOKEN": "s3cret", "DB_PASSWORD": "pw"}, gpus=1, memory_mb=512,
                         cpu_millicores=250, concurrency=4, timeout_seconds=60, min_instances=1, max_instances=8,
                         files={"handler.py": "x = 1\n", "lib/util.py": "y = 2\n"})
    traffic = manifests.traffic_targets("hello", [TrafficSpec(3, 90), TrafficSpec(2, 10, "canary")])
    assert manifests.service(spec, config, traffic=traffic) == {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": "hello", "namespace": "nimbus-acme", "labels": LABELS},
        "spec": {
            "template": {
                "metadata": {
                    "name": "hello-00003",
                    "labels": {**LABELS, "nimbus.dev/revision": "3", "nimbus.dev/egress": "denied"},
                    "annotations": {
                        "autoscaling.knative.dev/min-scale": "1",
                        "autoscaling.knative.dev/max-scale": "8",
                        "autoscaling.knative.dev/target": "4",
                        "autoscaling.knative.dev/scale-to-zero-pod-retention-period": "30s",
                        "nimbus.dev/content-hash": spec.content_hash,
                    },
                },
                "spec": {
                    "containerConcurrency": 4,
                    "timeoutSeconds": 60,
                    "enableServiceLinks": False,
                    "containers": [{
                        "name": "user-container",
                        "image": "registry.example.com/nimbus/runtime-python:3.11",
                        "ports": [{"name": "http1", "containerPort": 8080}],
                        "env": [
                            {"name": "NIMBUS_CODE_DIR", "value": "/var/nimbus/code"},
                            {"name": "NIMBUS_HANDLER", "value": "handler.handle"},
                            {"name": "NIMBUS_TENANT", "value": "acme"},
                            {"name": "NIMBUS_FUNCTION", "value": "hello"},
                            {"name": "NIMBUS_REVISION", "value": "3"},
                            {"name": "NIMBUS_TIMEOUT_SECONDS", "value": "60"},
                            {"name": "NIMBUS_DEBUG", "value": "0"},
                            {"name": "NIMBUS_MEMORY_MB", "value": "512"},
                            {"name": "GREETING", "value": "hi"},
                            {"name": "DB_PASSWORD",
                             "valueFrom": {"secretKeyRef": {"name": "hello-00003-secrets", "key": "DB_PASSWORD"}}},
                            {"name": "TOKEN",
                             "valueFrom": {"secretKeyRef": {"name": "hello-00003-secrets", "key": "TOKEN"}}},
                        ],
                        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"},
                                      "limits": {"cpu": "250m", "memory": "512Mi", "nvidia.com/gpu": "1"}},
                        "volumeMounts": [{"name": "code", "mountPath": "/var/nimbus/code", "readOnly": True}],
                        "readinessProbe": {"httpGet": {"path": "/_nimbus/health"}},
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                    }],
                    "volumes": [{"name": "code", "configMap": {
                        "name": "hello-00003-code",
                        "items": [{"key": "handler.py", "path": "handler.py"},
                                  {"key": "lib__util.py", "path": "lib/util.py"}]}}],
                },
            },
            "traffic": [
                {"revisionName": "hello-00003", "latestRevision": False, "percent": 90},
                {"revisionName": "hello-00002", "latestRevision": False, "percent": 10, "tag": "canary"},
            ],
        },
    }


def test_code_config_map_and_secret(config):
    spec = make_revision(number=3, files={"handler.py": "x = 1\n", "lib/util.py": "y = 2\n"},
                         secrets={"TOKEN": "s3cret"})
    assert manifests.code_config_map(spec, config) == {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "hello-00003-code", "namespace": "nimbus-acme",
                     "labels": {**LABELS, "nimbus.dev/revision": "3"},
                     "annotations": {"nimbus.dev/content-hash": spec.content_hash}},
        "immutable": True,
        "data": {"handler.py": "x = 1\n", "lib__util.py": "y = 2\n"},
    }
    assert manifests.secret(spec, config) == {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "hello-00003-secrets", "namespace": "nimbus-acme",
                     "labels": {**LABELS, "nimbus.dev/revision": "3"}},
        "type": "Opaque",
        "immutable": True,
        "data": {"TOKEN": base64.b64encode(b"s3cret").decode()},
    }
    assert manifests.secret(make_revision(secrets={}), config) is None


def test_offline_service_is_cluster_local(config):
    service = manifests.service(make_revision(), config, traffic=None, offline=True)
    assert service["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
    assert service["metadata"]["annotations"] == {"nimbus.dev/offline": "true"}
    assert "traffic" not in service["spec"]


def test_egress_is_a_pod_label_the_tenants_policy_selects(config, tenant_spec):
    def egress(spec):
        return manifests.service(spec, config, traffic=None)["spec"]["template"]["metadata"]["labels"][
            "nimbus.dev/egress"]

    assert egress(make_revision(allow_egress=False)) == "denied"
    assert egress(make_revision(allow_egress=True)) == "allowed"
    selector = manifests.tenant_network_policy(tenant_spec, config)["spec"]["podSelector"]["matchLabels"]
    assert selector == {"nimbus.dev/egress": "denied"}


def test_unlimited_concurrency_keeps_knatives_default_target(config):
    service = manifests.service(make_revision(concurrency=0), config, traffic=None)
    assert service["spec"]["template"]["spec"]["containerConcurrency"] == 0
    assert service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/target"] == "100"


def test_paths_that_squash_to_one_key_stay_apart():
    items = manifests.code_items({"a/b.py": "1", "a__b.py": "2", "c d.py": "3"})
    assert items == [{"key": "a__b.py", "path": "a/b.py"}, {"key": "a__b.py.2", "path": "a__b.py"},
                     {"key": "c_d.py", "path": "c d.py"}]


def test_sources_over_the_config_map_limit_are_refused(config):
    spec = make_revision(files={"handler.py": "x", "data.txt": "a" * 1_000_001})
    with pytest.raises(InvalidSource, match="ConfigMap, which holds at most 1,000,000 bytes") as caught:
        manifests.code_config_map(spec, config)
    assert caught.value.field == "files"
    with pytest.raises(InvalidSource):
        manifests.revision_manifests(spec, config, traffic=None)


def test_a_runtime_without_an_image_is_an_engine_error(config):
    with pytest.raises(EngineError, match="No runtime image is configured for 'ruby3'"):
        manifests.service(make_revision(runtime="ruby3"), config, traffic=None)


def test_node_runtime_uses_its_image(config):
    service = manifests.service(make_revision(runtime="node20", handler="handler.handle"), config, traffic=None)
    assert service["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/nimbus/runtime-node:20"


# ---- every generated manifest validates ---------------------------------------------------------

def all_generated(config):
    out = []
    for isolation in ("shared", "sandboxed", "dedicated"):
        tenant = TenantSpec(slug="acme", isolation=isolation, quota=dict(QUOTA))
        out += manifests.tenant_manifests(tenant, config)
        spec = make_revision(number=12, tenant=tenant, gpus=2, env={"A": "1"}, secrets={"B": "2"},
                             files={"handler.py": "x", "pkg/mod.py": "y", "pkg/data/x.json": "{}"})
        out += manifests.revision_manifests(spec, config, traffic=manifests.traffic_targets(
            "hello", [TrafficSpec(12, 50), TrafficSpec(11, 50, "previous")]))
        out.append(manifests.service(spec, config, traffic=None, offline=True))
    return out


@needs_crds
def test_every_generated_manifest_is_valid(config):
    generated = all_generated(config)
    assert {m["kind"] for m in generated} == {"Namespace", "ResourceQuota", "LimitRange", "NetworkPolicy",
                                              "ConfigMap", "Secret", "Service"}
    for manifest in generated:
        assert schemas.schema_errors(manifest) == [], manifest["kind"]


@needs_crds
def test_the_validator_catches_schema_violations(config):
    service = manifests.service(make_revision(), config, traffic=None)
    template = service["spec"]["template"]
    template["spec"]["containerConcurrency"] = "four"
    template["spec"]["containers"][0]["imagePullPolicy2"] = "Always"
    template["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 0.5  # neither int nor string
    errors = dict(schemas.schema_errors(service))
    assert "spec.template.spec.containerConcurrency" in errors
    assert "imagePullPolicy2" in errors["spec.template.spec.containers[0]"]
    assert "spec.template.spec.containers[0].resources.limits.cpu" in errors


@needs_crds
def test_int_or_string_and_preserved_fields_are_accepted(config):
    service = manifests.service(make_revision(), config, traffic=None)
    container = service["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["cpu"] = 1  # an int where a quantity is int-or-string
    service["spec"]["template"]["metadata"]["anything"] = {"kept": True}  # template metadata preserves unknowns
    assert schemas.schema_errors(service) == []


@needs_crds
@pytest.mark.parametrize(("change", "field"), [
    (lambda s: s["spec"]["template"]["spec"]["containers"][0].pop("image"), "containers[0].image"),
    (lambda s: s["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort=8012),
     "ports[0].containerPort"),
    (lambda s: s["metadata"].setdefault("annotations", {}).update({"autoscaling.knative.dev/max-scale": "3"}),
     "metadata.annotations.autoscaling.knative.dev/max-scale"),
    (lambda s: s["spec"]["template"]["metadata"].update(name="other-00001"), "spec.template.metadata.name"),
    (lambda s: s["spec"].update(traffic=[{"revisionName": "hello-00003", "percent": 90}]), "spec.traffic"),
])
def test_webhook_rules(config, change, field):
    service = manifests.service(make_revision(), config, traffic=None)
    change(service)
    assert any(path.endswith(field) for path, _ in schemas.schema_errors(service))


def test_core_kinds_are_checked_with_kubernetes_validate(config, tenant_spec):
    quota = manifests.tenant_resource_quota(tenant_spec, config)
    assert schemas.core_errors(quota) == []
    quota["spec"]["hardd"] = quota["spec"].pop("hard")
    assert schemas.core_errors(quota) != []
    config_map = manifests.code_config_map(make_revision(), config)
    config_map["data"]["handler.py"] = 42
    assert schemas.core_errors(config_map) != []


# ---- names ------------------------------------------------------------------------------------------

def test_names():
    assert names.namespace("acme", "nimbus-") == "nimbus-acme"
    assert names.service("hello") == "hello"
    assert names.revision("hello", 3) == "hello-00003"
    assert names.revision_number("hello", "hello-00003") == 3
    assert names.revision_number("hello", "hello-world-00003") is None
    assert names.revision_number("hello", None) is None
    assert names.code_config_map("hello", 3) == "hello-00003-code"
    assert names.secret("hello", 12) == "hello-00012-secrets"


def test_names_are_dns_safe_and_bounded():
    long_name = "f" + "x" * 70
    assert len(names.service(long_name)) == 40
    assert names.service(long_name) != names.service(long_name + "y")
    assert names.dns_label("9Lives_Here") == "x-9lives-here"
    assert len(names.namespace("t" * 30, "a-very-long-namespace-prefix-for-nimbus-tenants-")) <= 63
    assert len(names.secret("a" * 40, 99999)) <= 63


def test_the_readme_sample_is_what_the_builders_make():
    import re

    import yaml

    from functions.engines.base import FunctionRef, RevisionSpec

    readme = (schemas.REPO_ROOT / "deploy" / "kubernetes" / "README.md").read_text()
    sample = re.findall(r"```yaml\n(.*?)```", readme, re.S)[-1]
    documented = list(yaml.safe_load_all(sample))
    config = manifests.KnativeConfig(runtime_images={"python3.11": "registry.example.com/nimbus/runtime-python:3.11"})
    tenant = TenantSpec(slug="acme", isolation="sandboxed")
    spec = RevisionSpec(
        function=FunctionRef(tenant="acme", name="hello", function_id=7), number=3, revision_id=42,
        content_hash="9f2c4e0b7d1a", runtime="python3.11", handler="handler.handle",
        files={"handler.py": 'def handle(event, context):\n    return {"hello": event.query.get("name", "world")}\n'},
        env={"GREETING": "hello"}, secrets={"API_KEY": "x"}, concurrency=10, max_instances=5, tenant=tenant)
    built = manifests.revision_manifests(spec, config, traffic=manifests.traffic_targets(
        "hello", [TrafficSpec(3, 90), TrafficSpec(2, 10, "previous")]))
    built[1]["data"]["API_KEY"] = "<base64>"
    assert documented == built
