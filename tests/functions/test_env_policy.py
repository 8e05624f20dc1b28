"""The environment-variable policy: which names a function may set, refused by the services when
they are written (the REST API, the portal's form) and dropped again by the engines' builders.

The IDE's WebSocket protocol has no action that sets variables or secrets, so it has no attack
test here.
"""

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from functions.engines import envpolicy
from functions.engines.base import FunctionRef, RevisionSpec
from functions.engines.knative import manifests
from functions.models import EnvVar, Secret
from functions.services import function_env_set, function_secret_set
from portal.errors import ValidationFailed
from tenancy.models import AuditEvent

FN = "/api/v1/tenants/acme/functions/hello/"

PLATFORM = ["PORT", "HOME", "PATH", "TMPDIR", "K_SERVICE", "K_REVISION", "K_CONFIGURATION", "NIMBUS_HANDLER",
            "NIMBUS_ANYTHING", "KUBERNETES_SERVICE_HOST", "kubernetes_port", "path", "Home"]
LOADER_AND_LIBC = ["LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "LD_DEBUG", "LD_BIND_NOW", "ld_preload",
                   "Ld_Audit", "GCONV_PATH", "GLIBC_TUNABLES", "MALLOC_CHECK_", "MALLOC_ARENA_MAX",
                   "LOCPATH", "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF", "GETCONF_DIR", "NIS_PATH"]
INTERPRETERS = ["PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONINSPECT", "PYTHONWARNINGS",
                "PYTHONBREAKPOINT", "PYTHONSAFEPATH", "PYTHONIC", "pythonpath",
                "NODE_OPTIONS", "NODE_PATH", "NODE_REPL_EXTERNAL_MODULE", "node_options",
                "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "CDPATH",
                "PERL5OPT", "PERL5LIB", "PERLLIB", "RUBYOPT", "RUBYLIB",
                "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH",
                "GOFLAGS", "GODEBUG"]
ORDINARY = ["DATABASE_HOST", "API_KEY", "LOG_LEVEL", "TZ", "TZDIR", "NODE_ENV", "LANG", "GREETING",
            "MY_PATH", "LOAD_BALANCER", "ENVIRONMENT", "PY_VERSION", "SERVICE_PORT", "K8S_NAMESPACE", "_PRIVATE"]

# What an attacker in the tenant would send through the API and the portal.
ATTACKS = ["LD_PRELOAD", "ld_preload", "LD_AUDIT", "GCONV_PATH", "PYTHONSTARTUP", "PYTHONPATH", "NODE_OPTIONS",
           "BASH_ENV"]


# ---- the policy ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PLATFORM)
def test_platform_names_are_reserved(name):
    assert envpolicy.refusal(name) == f"'{name}' is reserved by the platform."


@pytest.mark.parametrize("name", LOADER_AND_LIBC + INTERPRETERS)
def test_loader_and_interpreter_variables_are_refused(name):
    reason = envpolicy.refusal(name)
    assert reason is not None
    assert reason.startswith(f"'{name}' is refused: loader and interpreter variables")
    assert reason.endswith("could change how the platform starts the function.")


@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_names_are_allowed(name):
    assert envpolicy.refusal(name) is None


def test_allowed_keeps_the_ordinary_and_names_the_dropped_in_order():
    env = {"LOG_LEVEL": "debug", "LD_PRELOAD": "/tmp/evil.so", "TZ": "UTC", "pythonpath": "/tmp",
           "PATH": "/tmp", "API_KEY": "k"}
    assert envpolicy.allowed(env) == ({"LOG_LEVEL": "debug", "TZ": "UTC", "API_KEY": "k"},
                                      ["LD_PRELOAD", "pythonpath", "PATH"])
    assert envpolicy.allowed({}) == ({}, [])


# ---- the services ----------------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("service", [function_env_set, function_secret_set])
def test_services_refuse_on_the_name_field(service, function, members):
    with pytest.raises(ValidationFailed) as refused:
        service(acting_user=members["developer"], function=function, name="LD_PRELOAD", value="/tmp/evil.so")
    assert refused.value.field == "name"
    assert "'LD_PRELOAD' is refused" in refused.value.message
    # A trailing newline is not a way around either check.
    with pytest.raises(ValidationFailed, match="not a valid variable name"):
        service(acting_user=members["developer"], function=function, name="PATH\n", value="/tmp")
    assert not EnvVar.objects.filter(function=function).exists()
    assert not Secret.objects.filter(function=function).exists()


# ---- attacks through the REST API ------------------------------------------------------------

@pytest.fixture
def developer_api(members):
    client = APIClient()
    client.force_login(members["developer"])
    return client


@pytest.fixture
def configured(function, members):
    """The "hello" function with one variable and one secret already set, so "unchanged" means
    something."""
    function_env_set(acting_user=members["owner"], function=function, name="GREETING", value="hi")
    function_secret_set(acting_user=members["owner"], function=function, name="API_KEY", value="k-123")
    return function


def stored(function):
    return (sorted(EnvVar.objects.filter(function=function).values_list("name", "value")),
            sorted(Secret.objects.filter(function=function).values_list("name", "ciphertext")))


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["env", "secrets"])
@pytest.mark.parametrize("name", ATTACKS)
def test_api_refuses_start_up_variables(kind, name, developer_api, configured):
    before = stored(configured)
    audit_rows = AuditEvent.objects.count()
    response = developer_api.put(f"{FN}{kind}/", {"name": name, "value": "/tmp/evil.so"}, format="json")
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid"
    assert body["field"] == "name"
    assert f"'{name}'" in body["detail"]
    assert body["errors"] == {"name": [body["detail"]]}
    assert stored(configured) == before
    assert AuditEvent.objects.count() == audit_rows
    listed = developer_api.get(f"{FN}{kind}/").json()
    assert name not in {row["name"] for row in listed}


@pytest.mark.django_db
def test_api_still_accepts_ordinary_names(developer_api, configured):
    # The refusals above are the policy's, not a developer who may set nothing.
    assert developer_api.put(FN + "env/", {"name": "NODE_ENV", "value": "production"},
                             format="json").status_code == 200
    assert developer_api.put(FN + "secrets/", {"name": "DATABASE_PASSWORD", "value": "pw"},
                             format="json").status_code == 200


# ---- attacks through the portal's form -------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["env", "secret"])
@pytest.mark.parametrize("name", ATTACKS)
def test_portal_form_refuses_start_up_variables(kind, name, client, members, configured):
    client.force_login(members["developer"])
    before = stored(configured)
    page = client.post(reverse("function_env", kwargs={"tenant": "acme", "function": "hello"}),
                       {"kind": kind, f"{kind}-name": name, f"{kind}-value": "/tmp/evil.so"})
    assert page.status_code == 200  # the form again, with the refusal by its field
    errors = page.context[f"{kind}_form"].errors["name"]
    assert any(f"'{name}' is refused" in error for error in errors)
    assert stored(configured) == before


# ---- the engines' second line --------------------------------------------------------------

def test_knative_container_env_drops_refused_names():
    spec = RevisionSpec(
        function=FunctionRef(tenant="acme", name="hello", function_id=7), number=3, revision_id=43,
        content_hash="c0ffee", runtime="python3.11", handler="handler.handle", files={},
        env={"LOG_LEVEL": "debug", "LD_PRELOAD": "/tmp/evil.so", "pythonpath": "/tmp", "NIMBUS_HANDLER": "x.y"},
        secrets={"API_KEY": "k", "NODE_OPTIONS": "--require /tmp/evil.js", "BASH_ENV": "/tmp/evil.sh"})
    env = manifests.container_env(spec, manifests.KnativeConfig())
    own = [entry for entry in env if not entry["name"].startswith("NIMBUS_")]
    assert own == [
        {"name": "LOG_LEVEL", "value": "debug"},
        {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "hello-00003-secrets", "key": "API_KEY"}}},
    ]
    assert {"name": "NIMBUS_HANDLER", "value": "handler.handle"} in env
