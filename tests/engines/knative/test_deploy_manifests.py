"""The portal's own deployment (deploy/kubernetes and the Dockerfile): every manifest valid for
its kind, the pieces wired to each other, and the ClusterRole granting what the engine really
calls (recorded on the API stand-in) and no more."""

import re

import kubernetes_validate
import pytest
import yaml

from functions.engines.base import FunctionRef, TrafficSpec

from .conftest import FakeKnative, make_revision
from .schemas import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy" / "kubernetes"
MANIFEST_FILES = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def documents():
    return [(path.name, doc) for path in MANIFEST_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind, name=None):
    found = [doc for _, doc in documents() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def test_the_expected_objects_are_there():
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for _, doc in documents())
    assert kinds == [("ClusterRole", "nimbus-engine"), ("ClusterRoleBinding", "nimbus-engine"),
                     ("ConfigMap", "nimbus-settings"), ("Deployment", "nimbus-portal"), ("Job", "nimbus-migrate"),
                     ("Namespace", "nimbus-system"), ("Secret", "nimbus-secrets"), ("Service", "nimbus-portal"),
                     ("ServiceAccount", "nimbus-portal")]


@pytest.mark.parametrize(("filename", "doc"), documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_each_manifest_is_valid_for_its_kind(filename, doc):
    assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
        assert doc["metadata"]["namespace"] == "nimbus-system"


def test_kustomization_lists_existing_files_and_not_the_secret_template():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert all((DEPLOY / name).is_file() for name in kustomization["resources"])
    assert "secret.example.yaml" not in kustomization["resources"]


def test_deployment_runs_daphne_with_probes_resources_and_settings():
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container, = pod["spec"]["containers"]
    assert container["command"][:3] == ["python", "-m", "portal.serve"]
    assert container["command"][-1] == "portal.asgi:application"
    port = int(container["command"][container["command"].index("-p") + 1])
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    for probe, path in (("readinessProbe", "/healthz"), ("livenessProbe", "/livez")):
        assert container[probe]["httpGet"]["path"] == path
        assert container[probe]["httpGet"]["port"] == "http"
        headers = {h["name"]: h["value"] for h in container[probe]["httpGet"]["httpHeaders"]}
        allowed = one("ConfigMap", "nimbus-settings")["data"]["ALLOWED_HOSTS"].split(",")
        assert headers["Host"] in allowed and headers["X-Forwarded-Proto"] == "https"
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    refs = {(k, v["name"]) for e in container["envFrom"] for k, v in e.items()}
    assert refs == {("configMapRef", "nimbus-settings"), ("secretRef", "nimbus-secrets")}
    assert pod["spec"]["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]

    service = one("Service", "nimbus-portal")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_migration_job_uses_the_portal_image_and_settings():
    job_pod = one("Job")["spec"]["template"]["spec"]
    portal = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    job, = job_pod["containers"]
    assert job["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert job["image"] == portal["image"] and job["envFrom"] == portal["envFrom"]
    assert job_pod["restartPolicy"] == "Never"


def test_settings_select_the_knative_engine_in_cluster():
    data = one("ConfigMap", "nimbus-settings")["data"]
    assert data["NIMBUS_ENGINE"] == "knative" and data["NIMBUS_KUBECONFIG"] == ""
    for key in ("NIMBUS_NAMESPACE_PREFIX", "NIMBUS_IMAGE_PYTHON", "NIMBUS_IMAGE_NODE", "NIMBUS_SANDBOX_RUNTIME_CLASS",
                "NIMBUS_DEDICATED_NODE_LABEL", "NIMBUS_KNATIVE_DOMAIN", "NIMBUS_KUBE_TIMEOUT"):
        assert data[key]
    assert set(one("Secret")["stringData"]) == {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "NIMBUS_SECRETS_KEYS",
                                                    "NIMBUS_METRICS_TOKEN"}


def rbac_allows(rules, group, resource, verb):
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def test_cluster_role_binding_targets_the_portal_service_account():
    binding = one("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": one("ClusterRole")["metadata"]["name"]}
    account = one("ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    rules = one("ClusterRole")["rules"]
    assert not any("*" in r["verbs"] or "*" in r["resources"] or "*" in r["apiGroups"] for r in rules)
    # Read-only where the engine only reads.
    assert not rbac_allows(rules, "", "pods", "delete")
    assert not rbac_allows(rules, "serving.knative.dev", "revisions", "patch")


def request_permission(method, path, query_has_watch):
    """(apiGroup, resource, verb) the API server authorizes a request as."""
    match = re.match(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?"
                     r"(?:/(?P<plural>[a-z]+))?(?:/(?P<name>[^/]+))?(?:/(?P<sub>[a-z]+))?$", path)
    group, ns, plural, name, sub = match.group("group", "ns", "plural", "name", "sub")
    group = group or ""
    if plural is None:  # /api/v1/namespaces/<name>
        plural, name = "namespaces", ns
    resource = f"{plural}/{sub}" if sub else plural
    if method == "GET":
        verb = "get" if name else ("watch" if query_has_watch else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}[method]
    return group, resource, verb


def test_cluster_role_grants_every_call_the_engine_makes(engine, stand_in, tenant_spec):
    ref = FunctionRef(tenant="acme", name="hello", function_id=7)
    stand_in.controller = FakeKnative("ready")
    engine.ensure_tenant(tenant_spec)
    for number in (1, 2):
        engine.deploy(make_revision(number=number, secrets={"K": "v"}), traffic=[TrafficSpec(number, 100)],
                      progress=lambda event: None)
    stand_in.add_pod("nimbus-acme", "hello-00002-deployment-x",
                     {"serving.knative.dev/service": "hello", "serving.knative.dev/revision": "hello-00002"},
                     log="2026-11-22T10:00:00Z hi\n")
    engine.set_traffic(ref, [TrafficSpec(2, 50), TrafficSpec(1, 50, "old")])
    engine.set_offline(ref, True)
    engine.status(ref)
    list(engine.logs(ref))
    list(engine.logs(ref, follow=True))
    engine.delete(ref)

    rules = one("ClusterRole")["rules"]
    used = set()
    for method, path, _, query in stand_in.requests:
        used.add(request_permission(method, path, query.get("watch") == "true"))
    missing = sorted(p for p in used if not rbac_allows(rules, *p))
    assert missing == []
    assert {("", "pods/log", "get"), ("serving.knative.dev", "services", "watch"),
            ("", "configmaps", "deletecollection")} <= used


def dockerfile_instructions():
    text = (REPO_ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip().split(None, 1) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_copies_what_exists_and_serves_the_probed_port():
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM"
    for keyword, args in instructions:
        if keyword == "FROM":
            image = args.split()[0]
            assert ":" in image and not image.endswith(":latest"), image
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), source
    cmd = [args for keyword, args in instructions if keyword == "CMD"][-1]
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert yaml.safe_load(cmd) == container["command"]
    user = [args for keyword, args in instructions if keyword == "USER"][-1]
    assert int(user) == one("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "node_modules" in ignored


@pytest.mark.parametrize("runtime", ["python", "node"])
def test_runtime_images_keep_the_container_contract_the_manifests_assume(runtime, settings):
    from functions.engines.knative import manifests

    text = (REPO_ROOT / "functions" / "runtimes" / runtime / "Dockerfile").read_text()
    assert re.search(rf"\bPORT={manifests.CONTAINER_PORT}\b", text)
    assert re.search(rf"^EXPOSE {manifests.CONTAINER_PORT}$", text, re.M)
    assert f"NIMBUS_CODE_DIR={settings.NIMBUS_KNATIVE['CODE_DIR']}" in text
