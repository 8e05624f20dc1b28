"""The API keeps the contract it publishes: PATCH changes only what is sent and names what it cannot
change; every refusal, nested input included, has the schema's flat error shape; query parameters
are checked (garbage is a 400 naming the parameter); bodies are JSON of the declared types; and text
the database cannot store never reaches it from a trigger, a retry policy or a sequence."""

import json

import jsonschema
import pytest
from drf_spectacular.generators import SchemaGenerator

from functions.models import Delivery, RetryPolicy, Trigger
from portal.errors import ValidationFailed
from tenancy.models import Membership, Tenant

T = "/api/v1/tenants/acme/"
FN = T + "functions/hello/"


@pytest.fixture(scope="module")
def error_schema():
    openapi = SchemaGenerator().get_schema(request=None, public=True)
    return {**openapi["components"]["schemas"]["Error"], "components": openapi["components"]}


@pytest.fixture
def trigger(function, members):
    from functions.services_triggers import trigger_create

    return trigger_create(acting_user=members["owner"], function=function, name="nightly", kind="cron",
                          schedule="0 3 * * *")


def refused(response, field, error_schema=None):
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid"
    assert body["field"] == field, body
    assert field in body["errors"]
    if error_schema is not None:
        jsonschema.validate(body, error_schema)
    return body


# ---- PATCH is partial, and names what it cannot change --------------------------------------------------

def test_tenant_patch_without_fields_changes_nothing(client_for, members, tenant):
    response = client_for(members["owner"]).patch(T, {}, format="json")
    assert response.status_code == 200
    assert response.json()["name"] == "Acme"


def test_tenant_patch_of_isolation_by_an_owner_is_refused_not_ignored(client_for, members, tenant):
    response = client_for(members["owner"]).patch(T, {"isolation": "dedicated"}, format="json")
    assert response.status_code == 403
    assert "isolation" in response.json()["detail"]
    tenant.refresh_from_db()
    assert tenant.isolation == Tenant.Isolation.SHARED


def test_tenant_patch_of_isolation_by_an_operator_is_applied(client_for, operator, tenant):
    response = client_for(operator).patch(T, {"isolation": "dedicated"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["isolation"] == "dedicated"
    assert response.json()["name"] == "Acme"  # only what was sent changed
    tenant.refresh_from_db()
    assert tenant.isolation == Tenant.Isolation.DEDICATED


def test_tenant_patch_of_name_leaves_isolation(client_for, members, tenant):
    response = client_for(members["owner"]).patch(T, {"name": "Acme Corp"}, format="json")
    assert response.status_code == 200
    assert (response.json()["name"], response.json()["isolation"]) == ("Acme Corp", "shared")


@pytest.mark.parametrize("body,field,message", [
    ({"slug": "renamed"}, "slug", "read-only"),
    ({"status": "suspended"}, "status", "read-only"),
    ({"quota": {"max_functions": 999}}, "quota", "read-only"),
    ({"name": "Acme", "colour": "red"}, "colour", "Unknown field"),
    ({"isolation": "moon"}, "isolation", "not a valid choice"),
])
def test_tenant_patch_names_what_it_cannot_change(body, field, message, client_for, members, tenant, error_schema):
    response = client_for(members["owner"]).patch(T, body, format="json")
    assert message in refused(response, field, error_schema)["detail"]
    tenant.refresh_from_db()
    assert (tenant.slug, tenant.name, tenant.status) == ("acme", "Acme", Tenant.Status.ACTIVE)


def test_member_patch_without_role_changes_nothing(client_for, members, tenant):
    response = client_for(members["owner"]).patch(T + "members/acme-viewer/", {}, format="json")
    assert response.status_code == 200
    assert response.json()["role"] == "viewer"


def test_member_patch_names_read_only_fields(client_for, members, tenant):
    response = client_for(members["owner"]).patch(T + "members/acme-viewer/", {"username": "someone-else"},
                                                  format="json")
    assert "read-only" in refused(response, "username")["detail"]
    assert Membership.objects.filter(tenant=tenant, user__username="acme-viewer").exists()


@pytest.mark.parametrize("body,field", [({"kind": "event"}, "kind"), ({"name": "renamed"}, "name"),
                                        ({"enabled": False, "colour": "red"}, "colour")])
def test_trigger_patch_names_what_it_cannot_change(body, field, client_for, members, trigger):
    response = client_for(members["owner"]).patch(FN + "triggers/nightly/", body, format="json")
    refused(response, field)
    trigger.refresh_from_db()
    assert (trigger.name, trigger.kind, trigger.enabled) == ("nightly", Trigger.Kind.CRON, True)


def test_trigger_patch_changes_only_what_is_sent(client_for, members, trigger):
    response = client_for(members["owner"]).patch(FN + "triggers/nightly/", {"enabled": False}, format="json")
    assert response.status_code == 200
    assert (response.json()["enabled"], response.json()["schedule"]) == (False, "0 3 * * *")


def test_function_patch_says_a_shown_field_is_read_only(client_for, members, function):
    response = client_for(members["owner"]).patch(FN, {"name": "renamed", "memory_mb": 256}, format="json")
    assert "read-only" in refused(response, "name")["detail"]
    function.refresh_from_db()
    assert (function.name, function.memory_mb) != ("renamed", 256)


def test_retry_policy_refuses_unknown_fields(client_for, members, function):
    response = client_for(members["owner"]).put(FN + "retry-policy", {"attempts": 9}, format="json")
    refused(response, "attempts")
    assert not RetryPolicy.objects.filter(function=function, max_attempts=9).exists()


# ---- errors in the published shape, nested input included ----------------------------------------------

def test_errors_of_list_items_are_flat_by_path(client_for, members, function, error_schema):
    response = client_for(members["owner"]).post(FN + "triggers/", {
        "name": "events", "kind": "event", "filters": [{"attribute": "type", "value": "x"}, {"attribute": "type"}]},
        format="json")
    body = refused(response, "filters.1.value", error_schema)
    assert body["errors"] == {"filters.1.value": ["This field is required."]}
    assert body["detail"] == "filters.1.value: This field is required."


def test_errors_of_a_list_body_are_flat_by_index(client_for, members, deployed, error_schema):
    response = client_for(members["owner"]).put(FN + "traffic", [{"revision": 1, "percent": 100},
                                                                 {"revision": 0, "percent": 170}], format="json")
    body = refused(response, "1.revision", error_schema)
    assert set(body["errors"]) == {"1.revision", "1.percent"}


def test_errors_of_list_field_items_are_flat_by_index(client_for, members, tenant, error_schema):
    response = client_for(members["owner"]).post(T + "tokens/", {"name": "ci", "scopes": ["read", "AAA"]},
                                                 format="json")
    body = refused(response, "scopes.1", error_schema)
    assert body["errors"] == {"scopes.1": ['"AAA" is not a valid choice.']}


def test_log_search_errors_are_messages_by_parameter(client_for, members, function, error_schema):
    response = client_for(members["owner"]).get(FN + "logs/?level=LOUD&since=yesterday")
    body = refused(response, "level", error_schema)
    assert body["errors"] == {"level": ["Select a valid choice. LOUD is not one of the available choices."],
                              "since": ["Enter a valid date/time."]}


def test_non_field_errors_have_no_field(client_for, members, deployed, error_schema):
    response = client_for(members["owner"]).put(FN + "traffic", {"revision": 1}, format="json")
    assert response.status_code == 400
    body = response.json()
    jsonschema.validate(body, error_schema)
    assert "field" not in body
    assert list(body["errors"]) == ["non_field_errors"]


# ---- query parameters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("query,parameter", [
    ("", "page_size=null"), ("", "page_size=-1"), ("", "page_size=0"), ("", "page_size=100000"),
    ("", "page_size="), ("", "page=abc"), ("", "page=0"), ("", "page=1.5"),
    ("", "ordering=unknown"), ("", "ordering=name,-secret"),
    ("audit-events/", "until="), ("audit-events/", "since=yesterday"), ("audit-events/", "until=2026-13-45T00:00:00Z"),
    ("functions/", "state=unknown"), ("functions/", "state="), ("functions/", "ordering=tenant"),
    ("functions/hello/invocations/", "revision=0.5"), ("functions/hello/invocations/", "revision="),
    ("functions/hello/invocations/", "revision=1.0"), ("functions/hello/logs/", "revision=1.0"),
    ("functions/hello/invocations/", "status=unknown"), ("functions/hello/invocations/", "ordering=error"),
    ("functions/hello/revisions/", "status="), ("functions/hello/metrics", "range=AAA"), ("metrics", "range="),
    ("metrics", "range=AAA"), ("functions/hello/deliveries/", "state="), ("functions/hello/deliveries/", "state=nope"),
    ("functions/hello/logs/", "until="), ("functions/hello/logs/", "revision=0.5"), ("functions/hello/logs/", "level="),
    ("functions/hello/logs/", "invocation=42"), ("tokens/", "ordering=token_hash"), ("tokens/", "page_size=abc"),
])
def test_garbage_query_parameters_are_400_naming_them(query, parameter, client_for, members, function, error_schema):
    response = client_for(members["owner"]).get(f"{T}{query}?{parameter}" if query else f"/api/v1/tenants/?{parameter}")
    body = refused(response, parameter.split("=")[0], error_schema)
    assert body["detail"].startswith(parameter.split("=")[0] + ": ")


@pytest.mark.parametrize("url,count", [
    ("/api/v1/tenants/?page_size=1", 1), ("/api/v1/tenants/?page_size=500&page=1", 2),
    ("/api/v1/tenants/?ordering=-slug", 2), (T + "functions/?ordering=-created_at,name&state=draft", 1),
    (T + "audit-events/?until=2999-01-01T00:00:00Z", None), (FN + "invocations/?revision=1&status=success", 0),
    (T + "metrics?range=24h", None),
])
def test_valid_query_parameters_still_work(url, count, client_for, members, outsider, function, operator):
    client = client_for(operator if url.startswith("/api/v1/tenants/?") else members["owner"])
    response = client.get(url)
    assert response.status_code == 200, response.content
    if count is not None:
        assert len(response.json()["results"]) == count


def test_a_page_past_the_last_is_still_404(client_for, members, tenant):
    response = client_for(members["owner"]).get("/api/v1/tenants/?page=9")
    assert response.status_code == 404
    assert response.json() == {"code": "not_found", "detail": "Invalid page."}


def test_page_last_still_reads_the_last_page(client_for, members, tenant):
    response = client_for(members["owner"]).get("/api/v1/tenants/?page=last&page_size=1")
    assert response.status_code == 200, response.content
    assert response.json()["next"] is None and len(response.json()["results"]) == 1


def test_dead_letters_are_dead_whatever_state_is_asked(client_for, members, function):
    Delivery.objects.create(function=function, source=Delivery.Source.ASYNC, state=Delivery.State.SUCCEEDED)
    dead = Delivery.objects.create(function=function, source=Delivery.Source.ASYNC, state=Delivery.State.DEAD)
    body = client_for(members["owner"]).get(FN + "dead-letters/?state=succeeded").json()
    assert [d["id"] for d in body["results"]] == [str(dead.pk)]


def test_query_parameters_read_are_declared(client_for):
    openapi = SchemaGenerator().get_schema(request=None, public=True)
    names = {path: {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
             for path, item in openapi["paths"].items() for method, operation in item.items() if method == "get"}
    assert names["/api/v1/tenants/{tenant_slug}/functions/{function_name}/metrics"] == {"range"}
    assert {"page", "page_size", "state"} <= names["/api/v1/tenants/{tenant_slug}/functions/{function_name}/deliveries/"]
    assert "state" not in names["/api/v1/tenants/{tenant_slug}/functions/{function_name}/dead-letters/"]
    assert {"q", "level", "revision", "invocation", "since", "until", "page", "page_size"} == \
        names["/api/v1/tenants/{tenant_slug}/functions/{function_name}/logs/"]
    page_size = next(p for p in openapi["paths"]["/api/v1/tenants/"]["get"]["parameters"] if p["name"] == "page_size")
    assert (page_size["schema"]["minimum"], page_size["schema"]["maximum"]) == (1, 500)


# ---- bodies: JSON, of the declared types ---------------------------------------------------------------

def test_request_bodies_are_declared_as_json_only():
    openapi = SchemaGenerator().get_schema(request=None, public=True)
    bodies = {f"{method.upper()} {path}": set(operation["requestBody"]["content"])
              for path, item in openapi["paths"].items() for method, operation in item.items()
              if "requestBody" in operation}
    assert len(bodies) > 15
    assert {label for label, media in bodies.items() if media != {"application/json"}} == set()
    deploy = openapi["paths"]["/api/v1/tenants/{tenant_slug}/functions/{function_name}/deploy"]["post"]
    assert "415" in deploy["responses"]


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=b"])
def test_form_and_multipart_bodies_are_refused_as_the_schema_says(content_type, client_for, members, function):
    body = "description=changed" if content_type.startswith("application") else (
        '--b\r\nContent-Disposition: form-data; name="description"\r\n\r\nchanged\r\n--b--\r\n')
    response = client_for(members["owner"]).generic("PATCH", FN, body, content_type=content_type)
    assert response.status_code == 415, response.content
    assert response.json()["code"]
    function.refresh_from_db()
    assert function.description != "changed"


@pytest.mark.parametrize("method,url,body,field", [
    ("patch", FN, {"memory_mb": "256"}, "memory_mb"),
    ("patch", FN, {"debug": "yes"}, "debug"),
    ("patch", FN, {"description": 42}, "description"),
    ("post", FN + "deploy", {"promote": "true"}, "promote"),
    ("put", FN + "files/handler.py", {"content": 1, "base_version": 1}, "content"),
    ("put", FN + "files/handler.py", {"content": "", "base_version": "1"}, "base_version"),
    ("put", FN + "retry-policy", {"backoff_max_seconds": "5"}, "backoff_max_seconds"),
    ("post", FN + "triggers/", {"name": "e", "kind": "event", "filters": [{"attribute": "type", "value": 7}]},
     "filters.0.value"),
    ("put", FN + "traffic", [{"revision": "1", "percent": 100}], "0.revision"),
    ("post", T + "tokens/", {"name": "ci", "scopes": "read"}, "scopes"),
])
def test_values_of_another_json_type_are_refused(method, url, body, field, client_for, members, deployed,
                                                 error_schema):
    response = getattr(client_for(members["owner"]), method)(url, body, format="json")
    assert refused(response, field, error_schema)["detail"].startswith(f"{field}: Expected ")


# ---- text the database cannot store, in triggers, retry policies and sequences ---------------------------

def _raw_json(client, method, url, text):
    return client.generic(method, url, text, content_type="application/json")


@pytest.mark.parametrize("body,field", [
    ('{"name": "e", "kind": "event", "filters": [{"attribute": "type", "value": "a\\ud800"}]}', "filters.0.value"),
    ('{"name": "c", "kind": "cron", "schedule": "0 3 * * *", "time_zone": "UTC\\udfff"}', "time_zone"),
    ('{"name": "c", "kind": "cron", "schedule": "0 3 * * *\\ud800"}', "schedule"),
    ('{"name": "e", "kind": "event", "filters": [{"attribute": "type", "value": "a\\u0000"}]}', "filters.0.value"),
])
def test_unstorable_text_in_a_new_trigger_is_400(body, field, client_for, members, function, error_schema):
    response = _raw_json(client_for(members["owner"]), "POST", FN + "triggers/", body)
    refused(response, field, error_schema)
    assert not Trigger.objects.filter(function=function).exists()


def test_unstorable_text_in_a_trigger_change_is_400(client_for, members, function, error_schema):
    from functions.services_triggers import trigger_create

    trigger_create(acting_user=members["owner"], function=function, name="events", kind="event",
                   filters=[{"attribute": "type", "value": "order.created"}])
    response = _raw_json(client_for(members["owner"]), "PATCH", FN + "triggers/events/",
                         '{"filters": [{"attribute": "type", "value": "\\udc00"}]}')
    refused(response, "filters.0.value", error_schema)
    assert Trigger.objects.get(function=function, name="events").filters[0]["value"] == "order.created"


def test_unstorable_text_in_a_retry_policy_is_400(client_for, members, function, error_schema):
    response = _raw_json(client_for(members["owner"]), "PUT", FN + "retry-policy",
                         '{"callback_url": "https://example.com/\\ud800"}')
    refused(response, "callback_url", error_schema)


@pytest.mark.parametrize("changes,field", [
    ({"name": "n", "kind": "event", "filters": [{"attribute": "type", "value": "a\x00b"}]}, "filters.0.value"),
    ({"name": "n", "kind": "event", "filters": [{"attribute": "type", "value": "x", "match\x00": "exact"}]},
     "filters.0"),
    ({"name": "n", "kind": "cron", "schedule": "0 3 * * *\x00"}, "schedule"),
    ({"name": "n", "kind": "cron", "schedule": "0 3 * * *", "time_zone": "UTC\x00"}, "time_zone"),
    ({"name": "n\x00", "kind": "http"}, "name"),
])
def test_trigger_services_refuse_a_nul(changes, field, members, function):
    from functions.services_triggers import trigger_create

    with pytest.raises(ValidationFailed) as refusal:
        trigger_create(acting_user=members["owner"], function=function, **changes)
    assert refusal.value.field == field


def test_trigger_update_and_policy_and_sequence_services_refuse_a_nul(members, function, trigger):
    from functions.services import function_create
    from functions.services_triggers import retry_policy_set, sequence_create, trigger_update

    with pytest.raises(ValidationFailed) as refusal:
        trigger_update(acting_user=members["owner"], trigger=trigger, time_zone="Europe/Berlin\x00")
    assert refusal.value.field == "time_zone"
    with pytest.raises(ValidationFailed) as refusal:
        retry_policy_set(acting_user=members["owner"], function=function, callback_url="https://example.com/\x00")
    assert refusal.value.field == "callback_url"
    function_create(acting_user=members["owner"], tenant=function.tenant, name="second")
    with pytest.raises(ValidationFailed) as refusal:
        sequence_create(acting_user=members["owner"], tenant=function.tenant, name="pipe", description="a\x00",
                        functions=["hello", "second"])
    assert refusal.value.field == "description"
    with pytest.raises(ValidationFailed) as refusal:
        sequence_create(acting_user=members["owner"], tenant=function.tenant, name="pipe",
                        functions=["hello", "sec\x00ond"])
    assert refusal.value.field == "functions.1"


def test_sequence_with_an_unstorable_description_is_400(client_for, members, function, error_schema):
    response = _raw_json(client_for(members["owner"]), "POST", T + "sequences/",
                         json.dumps({"name": "pipe", "functions": ["hello"]})[:-1] + ', "description": "\\ud800"}')
    refused(response, "description", error_schema)


@pytest.mark.parametrize("url", [T + "audit-events/", FN + "logs/"])
def test_date_times_with_any_iso_offset_are_compared_in_utc(url, client_for, members, function):
    # PostgreSQL refuses an offset past ±15:59 ("time zone displacement out of range"): a 500 before.
    client = client_for(members["owner"])
    assert client.get(url + "?since=2000-01-01T03:22:31%2B23:10").status_code == 200
    assert client.get(url + "?until=2999-01-01T00:00:00-21:29").status_code == 200
    refused(client.get(url + "?since=0001-01-01T00:00:00%2B05:00"), "since")


def test_deleting_a_file_is_documented_as_the_200_it_answers(client_for, members, function):
    openapi = SchemaGenerator().get_schema(request=None, public=True)
    responses = openapi["paths"]["/api/v1/tenants/{tenant_slug}/functions/{function_name}/files/{path}"]["delete"][
        "responses"]
    assert "200" in responses and "204" not in responses
    response = client_for(members["owner"]).delete(FN + "files/handler.py?base_version=1")
    assert response.status_code == 200
    assert response.json() == {"path": "handler.py", "version": 2}
