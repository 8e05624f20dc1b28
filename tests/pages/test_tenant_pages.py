"""Tenant pages: functions list (search, filters, pagination, create), members, tokens, quota, audit."""

import pytest
from django.urls import reverse

from functions.models import Function
from functions.services import function_create, function_update
from tenancy.models import ApiToken, Membership
from tests.conftest import make_user


def roomy_quota(tenant):
    tenant.quota.max_functions = 100
    tenant.quota.max_total_memory_mb = 10**6
    tenant.quota.save()


def make_functions(tenant, user, count, start=0):
    for i in range(start, start + count):
        function_create(acting_user=user, tenant=tenant, name=f"fn-{i:03d}", description=f"number {i}")


# ---- functions list --------------------------------------------------------------------------

@pytest.mark.django_db
def test_function_list_search_filter_and_pagination(tenant, members, client_for):
    roomy_quota(tenant)
    make_functions(tenant, members["developer"], 30)
    function_update(acting_user=members["developer"], function=Function.objects.get(name="fn-007"),
                    description="billing webhook")
    client = client_for(members["viewer"])
    url = reverse("tenant_functions", args=["acme"])

    first = client.get(url)
    assert first.context["page"].paginator.count == 30
    assert len(first.context["rows"]) == 25
    second = client.get(url, {"page": 2})
    assert [f.name for f, _ in second.context["rows"]] == [f"fn-{i:03d}" for i in range(25, 30)]

    found = client.get(url, {"q": "billing"})
    assert [f.name for f, _ in found.context["rows"]] == ["fn-007"]
    assert client.get(url, {"q": "fn-01"}).context["page"].paginator.count == 10
    assert client.get(url, {"state": "deployed"}).context["rows"] == []
    assert b"No function matches" in client.get(url, {"state": "deployed"}).content
    assert client.get(url, {"runtime": "node20"}).context["page"].paginator.count == 0
    # The pager keeps the filters.
    filtered = client.get(url, {"q": "fn", "page": 1})
    assert b"?q=fn&amp;page=2" in filtered.content


@pytest.mark.django_db
def test_function_list_query_count_does_not_grow(tenant, members, client_for, django_assert_num_queries):
    roomy_quota(tenant)
    client = client_for(members["developer"])
    url = reverse("tenant_functions", args=["acme"])
    make_functions(tenant, members["developer"], 10)
    client.get(url)  # warm the session and content-type caches
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ten:
        assert len(client.get(url).context["rows"]) == 10
    make_functions(tenant, members["developer"], 50, start=10)
    with django_assert_num_queries(len(ten.captured_queries)):
        assert len(client.get(url).context["rows"]) == 25


@pytest.mark.django_db
def test_empty_tenant_explains_what_to_do(tenant, members, client_for):
    developer_page = client_for(members["developer"]).get(reverse("tenant_functions", args=["acme"]))
    assert b"No functions yet" in developer_page.content and b"Create function" in developer_page.content
    viewer_page = client_for(members["viewer"]).get(reverse("tenant_functions", args=["acme"]))
    assert b"No functions yet" in viewer_page.content and b"Create function" not in viewer_page.content


@pytest.mark.django_db
def test_create_function_happy_and_refused(tenant, members, client_for):
    client = client_for(members["developer"])
    url = reverse("tenant_functions", args=["acme"])
    response = client.post(url, {"name": "api", "runtime": "node20", "starter": "http-json"})
    assert response.status_code == 302 and response["Location"] == reverse("function_detail", args=["acme", "api"])
    assert Function.objects.get(name="api").runtime == "node20"
    # Same name again: the service's Conflict lands on the name field.
    again = client.post(url, {"name": "api", "runtime": "python3.11", "starter": "hello"})
    assert "already exists" in str(again.context["create_form"].errors["name"])
    # A starter the runtime does not have is refused by the form.
    bad = client.post(url, {"name": "job", "runtime": "node20", "starter": "cron"})
    assert "starter" in bad.context["create_form"].errors
    # Quota: no more functions than the tenant's limit.
    tenant.quota.max_functions = 1
    tenant.quota.save()
    full = client.post(url, {"name": "more", "runtime": "python3.11", "starter": "hello"})
    assert "limit of 1 functions" in str(full.context["create_form"].non_field_errors())
    # A viewer cannot create at all.
    assert client_for(members["viewer"]).post(url, {"name": "x", "runtime": "python3.11",
                                                    "starter": "hello"}).status_code == 403
    assert Function.objects.count() == 1


@pytest.mark.django_db
def test_starter_options_follow_the_runtime(tenant, members, client_for):
    client = client_for(members["developer"])
    node = client.get(reverse("function_starter_options", args=["acme"]), {"runtime": "node20"})
    assert b'value="http-json"' in node.content and b'value="cron"' not in node.content
    python = client.get(reverse("function_starter_options", args=["acme"]), {"runtime": "python3.11"})
    assert b'value="cron"' in python.content


# ---- members ---------------------------------------------------------------------------------

@pytest.mark.django_db
def test_members_add_change_and_remove_with_confirmation(tenant, members, client_for):
    make_user("newbie")
    client = client_for(members["admin"])
    url = reverse("tenant_members", args=["acme"])
    assert client.post(url, {"username": "newbie", "role": "viewer"}).status_code == 302
    membership = Membership.objects.get(user__username="newbie")
    assert membership.role == "viewer"
    missing = client.post(url, {"username": "ghost", "role": "viewer"})
    assert "no user named" in str(missing.context["form"].errors["username"])

    role_url = reverse("tenant_member_role", args=["acme", membership.pk])
    client.post(role_url, {f"m{membership.pk}-role": "developer"})
    membership.refresh_from_db()
    assert membership.role == "developer"
    # An admin may not make an owner: the refusal comes back as a message.
    response = client.post(role_url, {f"m{membership.pk}-role": "owner"}, follow=True)
    assert "Only an owner" in response.content.decode()
    membership.refresh_from_db()
    assert membership.role == "developer"

    remove_url = reverse("tenant_member_remove", args=["acme", membership.pk])
    confirm = client.get(remove_url)
    assert confirm.status_code == 200 and b"Remove newbie?" in confirm.content
    assert Membership.objects.filter(pk=membership.pk).exists()
    assert client.post(remove_url).status_code == 302
    assert not Membership.objects.filter(pk=membership.pk).exists()


@pytest.mark.django_db
def test_members_search_and_role_filter(tenant, members, client_for):
    client = client_for(members["viewer"])
    url = reverse("tenant_members", args=["acme"])
    assert len(client.get(url).context["rows"]) == 4
    assert [m.user.username for m, _ in client.get(url, {"q": "dev"}).context["rows"]] == ["acme-developer"]
    assert [m.role for m, _ in client.get(url, {"role": "owner"}).context["rows"]] == ["owner"]
    assert b"No member matches" in client.get(url, {"q": "nobody"}).content


@pytest.mark.django_db
def test_members_page_is_read_only_for_viewer(tenant, members, client_for):
    client = client_for(members["viewer"])
    page = client.get(reverse("tenant_members", args=["acme"]))
    assert b"Add member" not in page.content and b"Remove" not in page.content
    owner = Membership.objects.get(tenant=tenant, role="owner")
    assert client.post(reverse("tenant_members", args=["acme"]), {"username": "x", "role": "viewer"}).status_code == 403
    assert client.post(reverse("tenant_member_remove", args=["acme", owner.pk])).status_code == 403
    assert Membership.objects.filter(pk=owner.pk).exists()


@pytest.mark.django_db
def test_last_owner_cannot_be_removed(tenant, members, client_for):
    owner = Membership.objects.get(tenant=tenant, role="owner")
    response = client_for(members["owner"]).post(reverse("tenant_member_remove", args=["acme", owner.pk]), follow=True)
    assert "at least one owner" in response.content.decode()
    assert Membership.objects.filter(pk=owner.pk).exists()


# ---- tokens ----------------------------------------------------------------------------------

@pytest.mark.django_db
def test_token_plaintext_is_shown_once_and_revoke_asks_first(tenant, members, client_for):
    client = client_for(members["developer"])
    url = reverse("tenant_tokens", args=["acme"])
    created = client.post(url, {"name": "ci", "scopes": ["read", "deploy"], "expires": "30"})
    assert created.status_code == 200
    plaintext = created.context["new_token"]["plaintext"]
    assert plaintext.startswith("nmb_") and plaintext.encode() in created.content
    token = ApiToken.objects.get(name="ci")
    assert token.scopes == ["deploy", "read"] and token.expires_at is not None
    assert plaintext.encode() not in client.get(url).content

    refused = client.post(url, {"name": "none", "expires": "30"})
    assert "scopes" in refused.context["form"].errors

    revoke_url = reverse("tenant_token_revoke", args=["acme", token.pk])
    assert b"Revoke token ci?" in client.get(revoke_url).content
    token.refresh_from_db()
    assert token.revoked_at is None
    client.post(revoke_url)
    token.refresh_from_db()
    assert token.revoked_at is not None
    # Revoked tokens leave the list unless asked for.
    assert b"No active API tokens" in client.get(url).content
    assert b"revoked</span>" in client.get(url, {"revoked": "1"}).content


@pytest.mark.django_db
def test_tokens_of_others_are_hidden_unless_admin(tenant, members, client_for):
    from tenancy.services import token_create

    token, _ = token_create(acting_user=members["owner"], tenant=tenant, name="owner-token", scopes=["read"])
    dev = client_for(members["developer"])
    assert b"owner-token" not in dev.get(reverse("tenant_tokens", args=["acme"])).content
    assert dev.get(reverse("tenant_token_revoke", args=["acme", token.pk])).status_code == 404
    admin_page = client_for(members["admin"]).get(reverse("tenant_tokens", args=["acme"]))
    assert b"owner-token" in admin_page.content


# ---- quota and audit -------------------------------------------------------------------------

@pytest.mark.django_db
def test_quota_shows_usage(tenant, members, client_for):
    function_create(acting_user=members["developer"], tenant=tenant, name="big", memory_mb=1024, max_instances=4)
    page = client_for(members["viewer"]).get(reverse("tenant_quota", args=["acme"]))
    usage = {row["label"]: (row["used"], row["limit"]) for row in page.context["usage"]}
    assert usage["Functions"] == (1, 50)
    assert usage["Reserved memory"] == (4096, 16384)
    assert usage["GPUs"] == (0, 0)
    # The tenant-wide concurrency quota, and the calls of the tenant running in this process now.
    from functions.engines.concurrency import tenant_slots

    assert page.context["max_concurrent"] == 200 and page.context["in_flight"] == 0
    assert tenant_slots.take(tenant.pk, 200)
    try:
        busy = client_for(members["viewer"]).get(reverse("tenant_quota", args=["acme"]))
    finally:
        tenant_slots.give_back(tenant.pk)
    assert '<td class="text-end" id="quota-in-flight">1</td>' in busy.content.decode()


@pytest.mark.django_db
def test_audit_filters_and_pagination(tenant, members, client_for):
    roomy_quota(tenant)
    make_functions(tenant, members["developer"], 55)
    client = client_for(members["admin"])
    url = reverse("tenant_audit", args=["acme"])
    page = client.get(url, {"action": "function.create"})
    assert page.context["page"].paginator.count == 55 and len(page.context["page"].object_list) == 50
    assert client.get(url, {"action": "member."}).context["page"].paginator.count == 3
    assert client.get(url, {"actor": "acme-owner"}).context["page"].paginator.count == 4
    assert client.get(url, {"q": "fn-054"}).context["page"].paginator.count == 1
