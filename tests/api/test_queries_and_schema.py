"""List endpoints cost the same number of queries at 10 and at 100 rows, and the OpenAPI schema
generates cleanly and is browsable without a CDN."""

import pytest
import yaml
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from functions.services import function_create
from tenancy.services import quota_update

FNS = "/api/v1/tenants/acme/functions/"


def queries_for(client, url, **params):
    client.get(url, params)  # warm process-wide caches (content types) so only per-request queries count
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, params)
    assert response.status_code == 200
    return response, len(captured)


@pytest.fixture
def roomy_tenant(tenant, operator):
    quota_update(acting_user=operator, tenant=tenant, max_functions=200, max_total_memory_mb=10_000_000)
    return tenant


def create_functions(tenant, user, start, stop):
    for index in range(start, stop):
        function_create(acting_user=user, tenant=tenant, name=f"fn-{index:03d}")


@pytest.mark.parametrize("role", ["viewer", "owner"])
def test_function_list_query_count_does_not_grow(role, client_for, members, roomy_tenant,
                                                 django_assert_num_queries):
    client = client_for(members[role])
    create_functions(roomy_tenant, members["developer"], 0, 10)
    response, at_10 = queries_for(client, FNS, page_size=500)
    assert len(response.json()["results"]) == 10
    create_functions(roomy_tenant, members["developer"], 10, 100)
    # The same count, pinned: 100 functions on a page cost what 10 cost.
    with django_assert_num_queries(at_10):
        response = client.get(FNS, {"page_size": 500})
    assert len(response.json()["results"]) == 100
    expected = ["view"] if role == "viewer" else ["view", "change", "deploy", "delete", "share"]
    assert {tuple(f["permissions"]) for f in response.json()["results"]} == {tuple(expected)}


def test_function_list_query_count_with_direct_grants(client_for, members, roomy_tenant, django_assert_num_queries):
    """Per-user grants on some functions are prefetched too, not looked up per row."""
    from functions.models import Function
    from functions.services import function_share
    from tests.conftest import make_user

    make_user("guest")
    create_functions(roomy_tenant, members["developer"], 0, 10)
    for function in Function.objects.all()[:3]:
        function_share(acting_user=members["owner"], function=function, username="guest", level="deploy")
    client = client_for(members["viewer"])
    _, at_10 = queries_for(client, FNS, page_size=500)
    create_functions(roomy_tenant, members["developer"], 10, 100)
    for function in Function.objects.all()[3:30]:
        function_share(acting_user=members["owner"], function=function, username="acme-viewer", level="edit")
    with django_assert_num_queries(at_10):
        response = client.get(FNS, {"page_size": 500})
    editable = [f for f in response.json()["results"] if "change" in f["permissions"]]
    assert len(editable) == 27


@pytest.mark.parametrize("url,make", [
    ("/api/v1/tenants/acme/audit-events/", None),
    ("/api/v1/tenants/acme/members/", "members"),
    ("/api/v1/tenants/acme/tokens/", "tokens"),
])
def test_tenant_lists_query_count_does_not_grow(url, make, client_for, members, tenant, django_assert_num_queries):
    from tenancy.services import tenant_member_add, token_create
    from tests.conftest import make_user

    def grow(start, stop):
        for index in range(start, stop):
            if make == "members":
                make_user(f"user-{index}")
                tenant_member_add(acting_user=members["owner"], tenant=tenant, username=f"user-{index}",
                                  role="viewer")
            elif make == "tokens":
                token_create(acting_user=members["owner"], tenant=tenant, name=f"t{index}", scopes=["read"])
            else:
                from tenancy.services import tenant_update

                tenant_update(acting_user=members["owner"], tenant=tenant, name=f"Acme {index}")

    client = client_for(members["owner"])
    grow(0, 5)
    _, small = queries_for(client, url)
    grow(5, 40)
    with django_assert_num_queries(small):
        client.get(url)


def test_revision_and_invocation_lists_query_count_does_not_grow(client_for, members, deployed,
                                                                   django_assert_num_queries):
    from django.utils import timezone

    from functions.models import Invocation, Revision

    client = client_for(members["viewer"])
    url = FNS + "hello/revisions/"
    inv_url = FNS + "hello/invocations/"
    revision = Revision.objects.get(function=deployed)
    Invocation.objects.create(function=deployed, revision=revision, started_at=timezone.now(), status="success")
    _, revisions_small = queries_for(client, url)
    _, invocations_small = queries_for(client, inv_url)
    for number in range(2, 30):
        Revision.objects.create(function=deployed, number=number, content_hash=str(number), files={}, config={},
                                author=members["developer"])
    Invocation.objects.bulk_create([Invocation(function=deployed, revision=revision, started_at=timezone.now(),
                                               status="success") for _ in range(40)])
    with django_assert_num_queries(revisions_small):
        assert client.get(url).json()["count"] == 29
    with django_assert_num_queries(invocations_small):
        assert client.get(inv_url).json()["count"] == 41


# ---- OpenAPI ---------------------------------------------------------------------------------

def test_schema_generates_without_warnings(tmp_path, db):
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    schema = yaml.safe_load(out.read_text())
    deploy = schema["paths"]["/api/v1/tenants/{tenant_slug}/functions/{function_name}/deploy"]["post"]
    assert set(deploy["responses"]) == {"202", "400", "401", "403", "404", "409", "415"}
    assert deploy["responses"]["409"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}
    assert {"apiToken": []} in deploy["security"]
    assert schema["components"]["securitySchemes"]["apiToken"]["scheme"] == "bearer"
    for path in ["/api/v1/tenants/{tenant_slug}/functions/{function_name}/files/{path}",
                 "/api/v1/tenants/{tenant_slug}/tokens/{prefix}/",
                 "/api/v1/tenants/{tenant_slug}/audit-events/"]:
        assert path in schema["paths"]
    secret_input = schema["components"]["schemas"]["SecretInputRequest"]["properties"]
    assert "value" in secret_input
    assert "value" not in schema["components"]["schemas"]["Secret"]["properties"]


def test_schema_endpoint_and_docs_ui_without_cdn(client, db):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    assert "/api/v1/tenants/" in schema.json()["paths"]
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    assert "cdn.jsdelivr.net" not in html and "unpkg.com" not in html
