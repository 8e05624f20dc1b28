"""The observability API: metrics of a function and a tenant, log search, a trace; another tenant's
is 404, an API token reaches its own tenant with the read scope."""

import pytest

from functions.models import InvocationLog
from observability import ingest
from tenancy.services import token_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def api(client, members):
    client.force_login(members["viewer"])
    return client


def test_function_and_tenant_metrics(api, function, record, minute):
    ingest.invocations_written([record(minute, 10), record(minute, 30, status="error")])
    data = api.get("/api/v1/tenants/acme/functions/hello/metrics?range=15m").json()
    assert data["range"] == "15m" and data["summary"]["invocations"] == 2 and data["summary"]["errors"] == 1
    assert len(data["series"]["time"]) == len(data["series"]["p95_ms"]) == 15
    tenant = api.get("/api/v1/tenants/acme/metrics?range=7d").json()
    assert tenant["summary"]["invocations"] == 2 and tenant["functions"][0]["function"] == "hello"


def test_log_search(api, function, record, minute):
    row = record(minute, 5)
    InvocationLog.objects.bulk_create([InvocationLog(invocation=row, time=minute, level="INFO", message="alpha"),
                                       InvocationLog(invocation=row, time=minute, level="ERROR", message="beta")])
    data = api.get("/api/v1/tenants/acme/functions/hello/logs/?level=ERROR").json()
    assert [line["message"] for line in data["results"]] == ["beta"]
    assert data["results"][0]["invocation"] == str(row.id) and data["results"][0]["trace_id"] == row.trace_id
    assert api.get("/api/v1/tenants/acme/functions/hello/logs/?q=ALPHA").json()["count"] == 1
    bad = api.get("/api/v1/tenants/acme/functions/hello/logs/?invocation=nope")
    assert bad.status_code == 400


def test_trace(api, function, record, minute):
    row = record(minute, 5, instance="i", queue_ms=1)
    ingest.invocations_written([row])
    data = api.get(f"/api/v1/tenants/acme/traces/{row.trace_id}/").json()
    assert [s["kind"] for s in data["spans"]] == ["gateway", "queue", "handler"]
    assert all(s["function"] == "hello" for s in data["spans"])


def test_other_tenant_is_404(client, outsider, function, record, minute):
    row = record(minute, 5)
    ingest.invocations_written([row])
    client.force_login(outsider)
    for url in ("/api/v1/tenants/acme/functions/hello/metrics", "/api/v1/tenants/acme/functions/hello/logs/",
                f"/api/v1/tenants/acme/traces/{row.trace_id}/", "/api/v1/tenants/acme/metrics",
                f"/api/v1/tenants/globex/traces/{row.trace_id}/"):
        assert client.get(url).status_code == 404, url
    client.logout()
    assert client.get("/api/v1/tenants/acme/metrics").status_code in (401, 403)


def test_token_with_read_scope(client, members, tenant, function):
    _, secret = token_create(acting_user=members["owner"], tenant=tenant, name="ci", scopes=["read"])
    response = client.get("/api/v1/tenants/acme/functions/hello/metrics", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 200


def test_responses_match_the_openapi_schema(api, function, record, minute):
    """What the observability endpoints answer is what the schema says (the API's contract test helpers)."""
    import jsonschema
    from drf_spectacular.generators import SchemaGenerator

    from tests.api.test_schema_contract import _nullable_to_json_schema, response_schema, template_of

    openapi = _nullable_to_json_schema(SchemaGenerator().get_schema(request=None, public=True))
    row = record(minute, 7, instance="i", queue_ms=3)
    ingest.invocations_written([row])
    InvocationLog.objects.create(invocation=row, time=minute, level="INFO", message="schema")
    for url in ("/api/v1/tenants/acme/functions/hello/metrics?range=6h", "/api/v1/tenants/acme/metrics",
                "/api/v1/tenants/acme/functions/hello/logs/", f"/api/v1/tenants/acme/traces/{row.trace_id}/"):
        response = api.get(url)
        assert response.status_code == 200, url
        jsonschema.validate(response.json(), response_schema(openapi, template_of(openapi, url), "get", 200))
