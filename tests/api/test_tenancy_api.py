"""Tenants, members, API tokens and the audit trail through the API, and their effects."""

from datetime import timedelta

from django.utils import timezone
from rest_framework.test import APIClient

from tenancy.models import ApiToken, AuditEvent, Membership, Tenant

T = "/api/v1/tenants/"


def test_tenant_list_shows_only_the_callers_tenants(client_for, members, outsider):
    assert [t["slug"] for t in client_for(members["viewer"]).get(T).json()["results"]] == ["acme"]
    assert [t["slug"] for t in client_for(outsider).get(T).json()["results"]] == ["globex"]


def test_tenant_list_with_a_token_shows_only_its_tenant(client_for, members, tenant, make_token):
    from tenancy.services import tenant_create

    tenant_create(acting_user=members["owner"], slug="second", name="Second")
    assert len(client_for(members["owner"]).get(T).json()["results"]) == 2
    token = make_token(members["owner"], tenant, ["read"])
    body = client_for(token=token).get(T).json()
    assert body["count"] == 1
    assert body["results"][0]["slug"] == "acme"


def test_create_tenant_makes_the_caller_owner_and_audits(client_for, db):
    from tests.conftest import make_user

    user = make_user("founder")
    response = client_for(user).post(T, {"slug": "initech", "name": "Initech"}, format="json", REMOTE_ADDR="10.1.2.3")
    assert response.status_code == 201
    body = response.json()
    assert body["slug"] == "initech"
    assert body["role"] == "owner"
    assert body["quota"]["max_functions"] == 50
    event = AuditEvent.objects.get(action="tenant.create")
    assert (event.actor, event.tenant.slug, event.ip) == (user, "initech", "10.1.2.3")


def test_token_cannot_create_tenants(client_for, members, tenant, make_token):
    token = make_token(members["owner"], tenant, ApiToken.Scope.values)
    response = client_for(token=token).post(T, {"slug": "sneaky"}, format="json")
    assert response.status_code == 403
    assert "cannot create tenants" in response.json()["detail"]
    assert not Tenant.objects.filter(slug="sneaky").exists()


def test_tenant_detail_has_quota_and_role(client_for, members, tenant):
    body = client_for(members["developer"]).get(T + "acme/").json()
    assert body["role"] == "developer"
    assert body["name"] == "Acme"
    assert set(body["quota"]) >= {"max_functions", "max_total_memory_mb", "max_instances_per_function"}


def test_rename_tenant(client_for, members, tenant):
    response = client_for(members["owner"]).patch(T + "acme/", {"name": "Acme Corp"}, format="json")
    assert response.status_code == 200
    assert response.json()["name"] == "Acme Corp"
    tenant.refresh_from_db()
    assert tenant.name == "Acme Corp"
    assert AuditEvent.objects.get(action="tenant.update").details == {"name": ["Acme", "Acme Corp"]}


def test_member_lifecycle(client_for, members, tenant):
    from tests.conftest import make_user

    make_user("newbie")
    admin = client_for(members["admin"])
    added = admin.post(T + "acme/members/", {"username": "newbie", "role": "viewer"}, format="json")
    assert added.status_code == 201
    assert added.json()["username"] == "newbie"
    assert added.json()["role"] == "viewer"
    listed = [m["username"] for m in admin.get(T + "acme/members/").json()["results"]]
    assert listed == ["acme-admin", "acme-developer", "acme-owner", "acme-viewer", "newbie"]
    changed = admin.patch(T + "acme/members/newbie/", {"role": "developer"}, format="json")
    assert changed.json()["role"] == "developer"
    assert admin.delete(T + "acme/members/newbie/").status_code == 204
    assert not Membership.objects.filter(user__username="newbie").exists()
    actions = list(AuditEvent.objects.filter(action__startswith="member.", details__user="newbie")
                   .order_by("id").values_list("action", flat=True))
    assert actions == ["member.add", "member.change_role", "member.remove"]


def test_member_refusals(client_for, members, tenant):
    admin = client_for(members["admin"])
    unknown = admin.post(T + "acme/members/", {"username": "ghost"}, format="json")
    assert unknown.status_code == 400
    assert unknown.json()["field"] == "username"
    assert "no user named 'ghost'" in unknown.json()["detail"]
    twice = admin.post(T + "acme/members/", {"username": "acme-viewer"}, format="json")
    assert twice.status_code == 409
    owner_by_admin = admin.patch(T + "acme/members/acme-viewer/", {"role": "owner"}, format="json")
    assert owner_by_admin.status_code == 403
    bad_role = admin.patch(T + "acme/members/acme-viewer/", {"role": "emperor"}, format="json")
    assert bad_role.status_code == 400
    assert bad_role.json()["field"] == "role"
    last_owner = client_for(members["owner"]).delete(T + "acme/members/acme-owner/")
    assert last_owner.status_code == 409
    assert "at least one owner" in last_owner.json()["detail"]
    assert admin.get(T + "acme/members/nobody/").status_code == 404


def test_token_plaintext_is_shown_once_and_works(client_for, members, tenant):
    client = client_for(members["developer"])
    created = client.post(T + "acme/tokens/", {"name": "laptop", "scopes": ["read", "deploy"]}, format="json")
    assert created.status_code == 201
    body = created.json()
    plaintext = body["token"]
    assert plaintext.startswith(f"nmb_{body['prefix']}_")
    assert body["scopes"] == ["deploy", "read"]
    listed = client.get(T + "acme/tokens/")
    assert plaintext not in listed.content.decode()
    token = ApiToken.objects.get(prefix=body["prefix"])
    assert token.token_hash not in listed.content.decode()
    assert "token" not in listed.json()["results"][0]
    # The token works, and marks itself used.
    assert client_for(token=plaintext).get(T + "acme/functions/").status_code == 200
    detail = client.get(T + f"acme/tokens/{body['prefix']}/").json()
    assert detail["last_used_at"] is not None
    assert detail["revoked"] is False


def test_revoked_token_is_refused(client_for, members, tenant, make_token):
    plaintext = make_token(members["developer"], tenant, ["read"])
    prefix = plaintext.split("_")[1]
    assert client_for(members["developer"]).delete(T + f"acme/tokens/{prefix}/").status_code == 204
    response = client_for(token=plaintext).get(T + "acme/")
    assert response.status_code == 401
    assert AuditEvent.objects.filter(action="token.revoke", details__prefix=prefix).exists()
    listed = client_for(members["developer"]).get(T + "acme/tokens/").json()["results"]
    assert listed[0]["revoked"] is True


def test_expired_token_is_refused(client_for, members, tenant):
    from tenancy.services import token_create

    token, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="short", scopes=["read"],
                                    expires_at=timezone.now() + timedelta(days=1))
    assert client_for(token=plaintext).get(T + "acme/").status_code == 200
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert client_for(token=plaintext).get(T + "acme/").status_code == 401


def test_token_scopes_are_validated(client_for, members, tenant):
    client = client_for(members["developer"])
    response = client.post(T + "acme/tokens/", {"name": "x", "scopes": ["root"]}, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "scopes.0"
    assert response.json()["detail"] == 'scopes.0: "root" is not a valid choice.'
    past = client.post(T + "acme/tokens/", {"name": "x", "scopes": ["read"], "expires_at": "2001-01-01T00:00:00Z"},
                       format="json")
    assert past.status_code == 400
    assert past.json()["field"] == "expires_at"


def test_members_see_their_own_tokens_admins_all(client_for, members, tenant, make_token):
    make_token(members["developer"], tenant, ["read"], name="dev-token")
    make_token(members["viewer"], tenant, ["read"], name="viewer-token")
    assert [t["name"] for t in client_for(members["viewer"]).get(T + "acme/tokens/").json()["results"]] == [
        "viewer-token"]
    names = {t["name"] for t in client_for(members["admin"]).get(T + "acme/tokens/").json()["results"]}
    assert names == {"dev-token", "viewer-token"}


def test_a_token_cannot_mint_a_stronger_token(client_for, members, tenant, make_token):
    plaintext = make_token(members["owner"], tenant, ["read", "write"])
    client = client_for(token=plaintext)
    refused = client.post(T + "acme/tokens/", {"name": "escalate", "scopes": ["deploy"]}, format="json")
    assert refused.status_code == 403
    assert "deploy" in refused.json()["detail"]
    allowed = client.post(T + "acme/tokens/", {"name": "narrower", "scopes": ["read"]}, format="json")
    assert allowed.status_code == 201


def test_removing_a_member_revokes_their_tokens(client_for, members, tenant, make_token):
    plaintext = make_token(members["developer"], tenant, ["read"])
    assert client_for(members["owner"]).delete(T + "acme/members/acme-developer/").status_code == 204
    assert client_for(token=plaintext).get(T + "acme/").status_code == 401


def test_audit_events_filter_and_search(client_for, members, function):
    client = client_for(members["admin"])
    everything = client.get(T + "acme/audit-events/").json()
    actions = [e["action"] for e in everything["results"]]
    assert actions[0] == "function.create"  # newest first
    assert actions.count("member.add") == 3
    by_action = client.get(T + "acme/audit-events/", {"action": "member.add"}).json()
    assert by_action["count"] == 3
    family = client.get(T + "acme/audit-events/", {"action": "member."}).json()
    assert family["count"] == 3
    by_actor = client.get(T + "acme/audit-events/", {"actor": "acme-developer"}).json()
    assert [e["action"] for e in by_actor["results"]] == ["function.create"]
    searched = client.get(T + "acme/audit-events/", {"search": "hello"}).json()
    assert [e["target_repr"] for e in searched["results"]] == ["acme/hello"]
    future = (timezone.now() + timedelta(hours=1)).isoformat()
    assert client.get(T + "acme/audit-events/", {"since": future}).json()["count"] == 0
    assert client.get(T + "acme/audit-events/", {"until": future}).json()["count"] == everything["count"]
    bad = client.get(T + "acme/audit-events/", {"since": "yesterday"})
    assert bad.status_code == 400
    assert bad.json()["field"] == "since"
    page = client.get(T + "acme/audit-events/", {"page_size": 2}).json()
    assert len(page["results"]) == 2
    assert page["next"] is not None


def test_audit_events_of_another_tenant_never_show(client_for, members, function, outsider):
    events = client_for(outsider).get(T + "globex/audit-events/").json()["results"]
    assert {e["action"] for e in events} == {"tenant.create"}
    assert all("acme" not in e["target_repr"] for e in events)


def test_session_writes_need_csrf_token_writes_do_not(members, tenant, make_token):
    browser = APIClient(enforce_csrf_checks=True)
    browser.get("/login/")  # as a browser would: a rendered form sets the CSRF cookie
    csrf = browser.cookies["csrftoken"].value
    browser.force_login(members["owner"])
    refused = browser.patch(T + "acme/", {"name": "No CSRF"}, format="json")
    assert refused.status_code == 403
    assert refused.json()["code"] == "permission_denied"
    assert "CSRF" in refused.json()["detail"]
    accepted = browser.patch(T + "acme/", {"name": "With CSRF"}, format="json", HTTP_X_CSRFTOKEN=csrf)
    assert accepted.status_code == 200
    cli = APIClient(enforce_csrf_checks=True)
    cli.credentials(HTTP_AUTHORIZATION="Bearer " + make_token(members["owner"], tenant, ["write"]))
    assert cli.patch(T + "acme/", {"name": "From CLI"}, format="json").status_code == 200
