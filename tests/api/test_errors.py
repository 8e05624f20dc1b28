"""Every refusal comes out as JSON {code, detail, field?, errors?}: validation, conflict, quota,
stale versions, permission, authentication, unknown addresses and methods, malformed bodies."""

import pytest

FN = "/api/v1/tenants/acme/functions/"


def test_unauthenticated_is_401_json(client_for, db):
    response = client_for(None).get("/api/v1/tenants/")
    assert response.status_code == 401
    assert response.json() == {"code": "not_authenticated",
                               "detail": "Authentication credentials were not provided."}


def test_bad_token_is_401_json(client_for, db):
    response = client_for(token="nmb_deadbeef_nope").get("/api/v1/tenants/")
    assert response.status_code == 401
    assert response.json()["code"] == "authentication_failed"
    assert "Invalid, expired or revoked" in response.json()["detail"]


def test_method_not_allowed_is_405_json(client_for, members, tenant):
    response = client_for(members["owner"]).delete("/api/v1/tenants/acme/")
    assert response.status_code == 405
    assert response.json() == {"code": "method_not_allowed", "detail": 'Method "DELETE" not allowed.'}


def test_unknown_api_address_is_404_json(client_for, members, tenant):
    response = client_for(members["owner"]).get("/api/v1/no-such-thing/")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_unknown_api_address_is_404_json_for_a_post_too(members, tenant):
    from rest_framework.test import APIClient

    browser = APIClient(enforce_csrf_checks=True)
    browser.force_login(members["owner"])
    response = browser.post("/api/v1/tenants/acme/functions/hello/deploy-now", {}, format="json")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_missing_slash_gets_a_hint(client_for, members, tenant):
    response = client_for(members["owner"]).get("/api/v1/tenants/acme/functions")
    assert response.status_code == 404
    assert "Did you mean /api/v1/tenants/acme/functions/ ?" in response.json()["detail"]


def test_unknown_tenant_and_function_are_404_json(client_for, members, function):
    client = client_for(members["owner"])
    assert client.get("/api/v1/tenants/nope/").json() == {"code": "not_found", "detail": "Tenant not found."}
    response = client.get(FN + "nope/")
    assert response.status_code == 404
    assert response.json() == {"code": "not_found", "detail": "Function not found."}
    response = client.get(FN + "hello/revisions/7/")
    assert response.status_code == 404
    assert response.json()["detail"] == "Revision 7 not found."


def test_serializer_validation_names_the_field(client_for, members, tenant):
    response = client_for(members["owner"]).post(FN, {"runtime": "cobol"}, format="json")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert set(body["errors"]) == {"name", "runtime"}
    assert body["field"] in {"name", "runtime"}
    assert body["detail"].startswith(body["field"] + ": ")


def test_service_validation_is_400_with_field(client_for, members, tenant):
    response = client_for(members["owner"]).post(FN, {"name": "Bad Name"}, format="json")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert body["field"] == "name"
    assert "lowercase letters" in body["detail"]
    assert "name" in body["errors"]


def test_unknown_setting_is_refused(client_for, members, function):
    response = client_for(members["owner"]).patch(FN + "hello/", {"memroy_mb": 512}, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "memroy_mb"
    assert response.json()["detail"] == "memroy_mb: Unknown setting."


def test_malformed_json_is_400_parse_error(client_for, members, tenant):
    response = client_for(members["owner"]).generic("POST", FN, "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["code"] == "parse_error"
    assert "JSON parse error" in response.json()["detail"]


def test_duplicate_function_is_409_conflict(client_for, members, function):
    response = client_for(members["owner"]).post(FN, {"name": "hello"}, format="json")
    assert response.status_code == 409
    assert response.json() == {"code": "conflict", "detail": "A function named 'hello' already exists in acme.",
                               "field": "name"}


def test_taken_tenant_slug_is_409_conflict_on_the_field(client_for, members, tenant):
    response = client_for(members["viewer"]).post("/api/v1/tenants/", {"slug": "acme"}, format="json")
    assert response.status_code == 409
    assert response.json() == {"code": "conflict", "detail": "A tenant named 'acme' already exists.",
                               "field": "slug"}


def test_function_count_quota_is_403_quota_exceeded(client_for, members, function, operator, tenant):
    from tenancy.services import quota_update

    quota_update(acting_user=operator, tenant=tenant, max_functions=1)
    response = client_for(members["developer"]).post(FN, {"name": "second"}, format="json")
    assert response.status_code == 403
    assert response.json() == {"code": "quota_exceeded", "detail": "Tenant acme has reached its limit of 1 functions."}


def test_memory_quota_names_the_field(client_for, members, function):
    response = client_for(members["developer"]).patch(FN + "hello/", {"memory_mb": 4096}, format="json")
    assert response.status_code == 403
    body = response.json()
    assert body["code"] == "quota_exceeded"
    assert body["field"] == "memory_mb"
    assert "2048 MB per function" in body["detail"]


def test_stale_file_save_is_409_with_current_version(client_for, members, function):
    client = client_for(members["developer"])
    url = FN + "hello/files/handler.py"
    first = client.put(url, {"content": "def handle(e, c):\n    return 1\n", "base_version": 1}, format="json")
    assert first.status_code == 200
    assert first.json() == {"path": "handler.py", "version": 2}
    stale = client.put(url, {"content": "def handle(e, c):\n    return 2\n", "base_version": 1}, format="json")
    assert stale.status_code == 409
    body = stale.json()
    assert body["code"] == "stale_version"
    assert body["current_version"] == 2
    assert body["base_version"] == 1
    assert "Reload or merge" in body["detail"]
    # The newer content was not overwritten.
    assert "return 1" in client.get(url).json()["content"]


@pytest.mark.parametrize("method,suffix,body", [
    ("put", "files/", {"files": {"handler.py": "x = 1\n"}, "base_version": 1}),
    ("delete", "files/handler.py?base_version=1", None),
    ("post", "files/handler.py", {"new_path": "main.py", "base_version": 1}),
])
def test_every_source_write_refuses_a_stale_version(method, suffix, body, client_for, members, function):
    from functions.services import function_file_save

    function_file_save(acting_user=members["owner"], function=function, path="other.py", content="", base_version=1)
    client = client_for(members["developer"])
    url = FN + "hello/" + suffix
    response = getattr(client, method)(url, body, format="json") if body else getattr(client, method)(url)
    assert response.status_code == 409
    assert response.json()["code"] == "stale_version"
    assert response.json()["current_version"] == 2


def test_delete_file_needs_base_version(client_for, members, function):
    response = client_for(members["developer"]).delete(FN + "hello/files/handler.py")
    assert response.status_code == 400
    assert response.json()["field"] == "base_version"
    assert response.json()["detail"] == "base_version: This field is required."


def test_invalid_path_is_400_invalid_source(client_for, members, function):
    response = client_for(members["developer"]).put(FN + "hello/files/../etc/passwd",
                                                    {"content": "x", "base_version": 1}, format="json")
    # Django normalises nothing here: the path reaches the service, which refuses it.
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_source"
    assert response.json()["field"] == "path"


def test_traffic_validation_is_clear(client_for, members, deployed):
    response = client_for(members["developer"]).put(FN + "hello/traffic", [{"revision": 1, "percent": 60}],
                                                    format="json")
    assert response.status_code == 400
    assert response.json() == {"code": "invalid", "detail": "Percentages add up to 60, not 100.",
                               "field": "traffic", "errors": {"traffic": ["Percentages add up to 60, not 100."]}}


def test_traffic_item_validation_points_at_the_item(client_for, members, deployed):
    response = client_for(members["developer"]).put(FN + "hello/traffic", [{"revision": 1, "percent": 170}],
                                                    format="json")
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == "0.percent"
    assert "less than or equal to 100" in body["detail"]


def test_permission_denied_explains(client_for, members, function):
    response = client_for(members["viewer"]).post(FN + "hello/deploy", {}, format="json")
    assert response.status_code == 403
    assert response.json() == {"code": "permission_denied", "detail": "You may not deploy this function."}
