"""Every page against every kind of caller: each role of the tenant, a user of another tenant
(404: existence does not leak) and an anonymous visitor (redirect to login)."""

import pytest
from django.urls import reverse

ROLES = ("owner", "admin", "developer", "viewer")
EVERYONE = set(ROLES)
AUDITORS = {"owner", "admin"}
CHANGERS = {"owner", "admin", "developer"}
DELETERS = {"owner", "admin"}

TENANT_PAGES = [
    ("tenant_functions", EVERYONE),
    ("tenant_members", EVERYONE),
    ("tenant_tokens", EVERYONE),
    ("tenant_quota", EVERYONE),
    ("tenant_audit", AUDITORS),
]

FUNCTION_PAGES = [
    ("function_detail", {}, EVERYONE),
    ("function_config", {}, EVERYONE),
    ("function_files", {}, EVERYONE),
    ("function_file", {"path": "handler.py"}, EVERYONE),
    ("function_revisions", {}, EVERYONE),
    ("function_revisions_table", {}, EVERYONE),
    ("function_traffic", {}, EVERYONE),
    ("function_env", {}, EVERYONE),
    ("function_sharing", {}, EVERYONE),
    ("function_invocations", {}, EVERYONE),
    ("function_delete", {}, DELETERS),
    ("revision_rollback", {"number": 1}, CHANGERS),
    ("function_state", {}, CHANGERS),
    ("function_env_remove", {"kind": "env", "name": "LOG_LEVEL"}, CHANGERS),
]


@pytest.fixture
def function_with_parts(deployed, members):
    from functions.services import function_env_set

    function_env_set(acting_user=members["developer"], function=deployed, name="LOG_LEVEL", value="debug")
    return deployed


@pytest.mark.django_db
@pytest.mark.parametrize("name,allowed", TENANT_PAGES)
def test_tenant_pages_by_caller(name, allowed, tenant, members, outsider, client_for, client):
    url = reverse(name, kwargs={"tenant": tenant.slug})
    for role in ROLES:
        response = client_for(members[role]).get(url)
        assert response.status_code == (200 if role in allowed else 403), (role, url)
    assert client_for(outsider).get(url).status_code == 404
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith(reverse("login") + "?next=")


@pytest.mark.django_db
@pytest.mark.parametrize("name,extra,allowed", FUNCTION_PAGES)
def test_function_pages_by_caller(name, extra, allowed, function_with_parts, members, outsider, client_for, client):
    url = reverse(name, kwargs={"tenant": "acme", "function": function_with_parts.name, **extra})
    for role in ROLES:
        response = client_for(members[role]).get(url)
        assert response.status_code == (200 if role in allowed else 403), (role, url)
    assert client_for(outsider).get(url).status_code == 404
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith(reverse("login") + "?next=")


@pytest.mark.django_db
def test_operator_sees_every_tenant(tenant, function, operator, client_for):
    client = client_for(operator)
    assert client.get(reverse("tenant_audit", args=["acme"])).status_code == 200
    assert client.get(reverse("function_delete", args=["acme", "hello"])).status_code == 200


@pytest.mark.django_db
def test_unknown_objects_are_404(function, members, client_for):
    client = client_for(members["owner"])
    assert client.get("/t/nope/").status_code == 404
    assert client.get("/t/acme/f/nope/").status_code == 404
    assert client.get("/t/acme/f/hello/files/missing.py").status_code == 404
    assert client.get("/t/acme/f/hello/revisions/9/rollback/").status_code == 404
    assert client.get("/t/acme/f/hello/env/bogus/X/remove/").status_code == 404


@pytest.mark.django_db
def test_function_shared_with_an_outsider_is_reachable_by_them_only(function, members, outsider, client_for):
    from functions.services import function_share

    function_share(acting_user=members["owner"], function=function, username=outsider.username, level="view")
    client = client_for(outsider)
    assert client.get(reverse("function_detail", args=["acme", "hello"])).status_code == 200
    # The function is shared, the tenant is not.
    assert client.get(reverse("tenant_functions", args=["acme"])).status_code == 404


@pytest.mark.django_db
def test_dashboard_and_login_pages(members, client, client_for):
    response = client.get(reverse("home"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    login_page = client.get(reverse("login"))
    assert login_page.status_code == 200
    assert b'autofocus' in login_page.content and b'name="password"' in login_page.content
    for role in ROLES:
        assert client_for(members[role]).get(reverse("home")).status_code == 200


@pytest.mark.django_db
def test_htmx_request_after_logout_redirects_the_whole_window(function, client):
    url = reverse("function_revisions_table", args=["acme", "hello"])
    response = client.get(url, headers={"HX-Request": "true"})
    assert response.status_code == 204
    assert response["HX-Redirect"].startswith(reverse("login") + "?next=")
