"""Roles bind tokens and actions: a token's scopes stay within its creator's role when made and its
user's current role when used; IDE test signatures answer to the signer's current access; adding a
member discloses nothing about accounts outside the tenant; members can leave."""

import pytest
from django.test import Client
from rest_framework.test import APIClient

from functions.models import Function
from functions.services import function_share
from functions import test_invoke
from portal.errors import PermissionDenied, ValidationFailed
from tenancy.models import ApiToken, AuditEvent, Membership
from tenancy.permissions import ROLE_TOKEN_SCOPES
from tenancy.services import (
    tenant_member_change_role,
    tenant_member_remove,
    token_authenticate,
    token_create,
    user_deactivate,
)
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

ALL_SCOPES = ApiToken.Scope.values


def api(user=None, token=None):
    client = APIClient()
    if token:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    elif user:
        client.force_login(user)
    return client


def membership(members, role):
    return Membership.objects.get(user=members[role], tenant__slug="acme")


# ---- the scope table, when a token is made ---------------------------------------------------------

@pytest.mark.parametrize("role", ["viewer", "developer", "admin", "owner"])
def test_each_role_mints_exactly_the_scopes_its_row_allows(members, tenant, role):
    allowed = sorted(ROLE_TOKEN_SCOPES[role])
    token, _ = token_create(acting_user=members[role], tenant=tenant, name="ok", scopes=allowed)
    assert token.scopes == allowed
    for scope in sorted(set(ALL_SCOPES) - set(allowed)):
        with pytest.raises(ValidationFailed) as refused:
            token_create(acting_user=members[role], tenant=tenant, name="too-much", scopes=["read", scope])
        assert scope in refused.value.message and refused.value.field == "scopes"
    assert ApiToken.objects.filter(user=members[role], name="too-much").count() == 0


def test_viewer_reads_and_invokes_at_most_developer_does_not_administer(members):
    assert ROLE_TOKEN_SCOPES["viewer"] == {"read", "invoke"}
    assert ROLE_TOKEN_SCOPES["developer"] == {"read", "write", "deploy", "invoke", "publish"}
    assert ROLE_TOKEN_SCOPES["admin"] == ROLE_TOKEN_SCOPES["owner"] == set(ALL_SCOPES)


def test_viewer_minting_a_deploy_token_through_the_api_is_400_naming_the_scopes(members, tenant):
    response = api(members["viewer"]).post("/api/v1/tenants/acme/tokens/",
                                           {"name": "ci", "scopes": ["read", "deploy", "publish"]}, format="json")
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid" and "deploy, publish" in body["detail"] and "viewer" in body["detail"]
    assert not ApiToken.objects.filter(user=members["viewer"]).exists()


def test_viewer_minting_a_deploy_token_on_the_page_is_refused(members, tenant):
    client = Client()
    client.force_login(members["viewer"])
    page = client.get("/t/acme/tokens/").content.decode()
    assert 'value="read"' in page and 'value="invoke"' in page and 'value="deploy"' not in page  # not offered
    response = client.post("/t/acme/tokens/", {"name": "ci", "scopes": ["deploy"], "expires": "30"})
    assert response.status_code == 200 and "invalid-feedback" in response.content.decode()
    assert not ApiToken.objects.filter(user=members["viewer"]).exists()


# ---- the scope table, when a token is used -----------------------------------------------------------

def test_a_downgraded_developers_deploy_token_no_longer_deploys(members, tenant, function):
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="ci",
                                scopes=["read", "write", "deploy", "publish"])
    assert token_authenticate(plaintext).scopes == ["deploy", "publish", "read", "write"]
    tenant_member_change_role(acting_user=members["owner"], membership=membership(members, "developer"),
                              role="viewer")
    token = token_authenticate(plaintext)
    assert token.scopes == ["read"] and token.member_role == "viewer"
    response = api(token=plaintext).post("/api/v1/tenants/acme/functions/hello/deploy", {}, format="json")
    assert response.status_code == 403 and "'deploy' scope" in response.json()["detail"]
    assert api(token=plaintext).get("/api/v1/tenants/acme/functions/hello/").status_code == 200
    # Promoted again, the token does not get back what the downgrade took: its stored scopes were narrowed.
    tenant_member_change_role(acting_user=members["owner"], membership=membership(members, "developer"),
                              role="developer")
    assert token_authenticate(plaintext).scopes == ["read"]


def test_a_token_cannot_mint_past_its_users_current_role(members, tenant):
    _, plaintext = token_create(acting_user=members["admin"], tenant=tenant, name="ci", scopes=ALL_SCOPES)
    tenant_member_change_role(acting_user=members["owner"], membership=membership(members, "admin"), role="viewer")
    response = api(token=plaintext).post("/api/v1/tenants/acme/tokens/", {"name": "x", "scopes": ["deploy"]},
                                         format="json")
    assert response.status_code == 403  # the token has no "write" any more: it cannot make tokens at all


def test_a_removed_members_token_is_refused(members, tenant):
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["read"])
    tenant_member_remove(acting_user=members["owner"], membership=membership(members, "developer"))
    assert token_authenticate(plaintext) is None
    assert api(token=plaintext).get("/api/v1/tenants/acme/").status_code == 401


def test_a_token_whose_user_left_without_revocation_is_refused(members, tenant):
    """Belt and braces: a token of a non-member is unusable even if it was somehow not revoked."""
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["read"])
    Membership.objects.filter(user=members["developer"], tenant=tenant).delete()
    assert token_authenticate(plaintext) is None


def test_operators_tokens_keep_every_scope(operator, tenant):
    _, plaintext = token_create(acting_user=operator, tenant=tenant, name="ops", scopes=ALL_SCOPES)
    assert token_authenticate(plaintext).scopes == sorted(ALL_SCOPES)


def test_a_deactivated_users_token_is_refused_and_audited(members, tenant, operator):
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["read"])
    with pytest.raises(PermissionDenied):
        user_deactivate(acting_user=members["owner"], user=members["developer"])
    user_deactivate(acting_user=operator, user=members["developer"])
    assert token_authenticate(plaintext) is None
    assert AuditEvent.objects.filter(action="user.deactivate", actor=operator).exists()


# ---- the IDE test signature answers to the signer's current access ----------------------------------

def test_a_removed_members_test_signature_is_refused(members, tenant, function):
    signature = test_invoke.test_signature(user_id=members["developer"].pk, function_id=function.pk)
    assert test_invoke.check_test_signature(signature, function.pk)
    tenant_member_remove(acting_user=members["owner"], membership=membership(members, "developer"))
    assert not test_invoke.check_test_signature(signature, function.pk)


def test_a_downgraded_members_test_signature_is_refused(members, tenant, function):
    signature = test_invoke.test_signature(user_id=members["developer"].pk, function_id=function.pk)
    tenant_member_change_role(acting_user=members["owner"], membership=membership(members, "developer"),
                              role="viewer")
    assert not test_invoke.check_test_signature(signature, function.pk)


def test_a_viewers_signature_runs_only_a_function_shared_to_edit(members, tenant, function):
    viewer = members["viewer"]
    signature = test_invoke.test_signature(user_id=viewer.pk, function_id=function.pk)
    assert not test_invoke.check_test_signature(signature, function.pk)  # viewers read only
    function_share(acting_user=members["admin"], function=function, username=viewer.username, level="view")
    assert not test_invoke.check_test_signature(signature, function.pk)
    function_share(acting_user=members["admin"], function=function, username=viewer.username, level="edit")
    assert test_invoke.check_test_signature(signature, function.pk)


def test_a_deactivated_users_test_signature_is_refused(members, function, operator):
    signature = test_invoke.test_signature(user_id=members["developer"].pk, function_id=function.pk)
    user_deactivate(acting_user=operator, user=members["developer"])
    assert not test_invoke.check_test_signature(signature, function.pk)


def test_a_signature_for_an_unknown_user_or_function_is_refused(members, function):
    nobody = test_invoke.test_signature(user_id=999999, function_id=function.pk)
    assert not test_invoke.check_test_signature(nobody, function.pk)
    gone = test_invoke.test_signature(user_id=members["developer"].pk, function_id=function.pk)
    Function.objects.filter(pk=function.pk).delete()
    assert not test_invoke.check_test_signature(gone, function.pk)


# ---- adding a member discloses nothing about other accounts ----------------------------------------

def test_member_add_answer_has_no_email(members, tenant):
    stranger = make_user("stranger")
    response = api(members["admin"]).post("/api/v1/tenants/acme/members/",
                                          {"username": "stranger", "role": "viewer"}, format="json")
    assert response.status_code == 201
    assert response.json() == {"username": "stranger", "role": "viewer", "created_at": response.json()["created_at"]}
    assert stranger.email not in response.content.decode()


def test_member_list_and_detail_have_no_email_and_cannot_be_searched_by_it(members, tenant):
    client = api(members["viewer"])
    listed = client.get("/api/v1/tenants/acme/members/")
    assert listed.status_code == 200 and "@example.com" not in listed.content.decode()
    detail = client.get("/api/v1/tenants/acme/members/acme-owner/")
    assert detail.status_code == 200 and "email" not in detail.json()
    probe = client.get("/api/v1/tenants/acme/members/", {"search": "acme-owner@example"})
    assert probe.json()["results"] == [] if "results" in probe.json() else probe.json() == []


def test_members_page_shows_no_email_and_is_not_searched_by_it(members, tenant):
    client = Client()
    client.force_login(members["admin"])
    page = client.get("/t/acme/members/")
    assert page.status_code == 200 and "@example.com" not in page.content.decode()
    probe = client.get("/t/acme/members/", {"q": "owner@example.com"})
    assert "No member matches." in probe.content.decode()


def test_unknown_and_inactive_accounts_answer_alike(members, tenant):
    inactive = make_user("dormant", is_active=False)
    client = api(members["admin"])
    unknown = client.post("/api/v1/tenants/acme/members/", {"username": "nobody-here", "role": "viewer"},
                          format="json")
    dormant = client.post("/api/v1/tenants/acme/members/", {"username": inactive.username, "role": "viewer"},
                          format="json")
    assert unknown.status_code == dormant.status_code == 400
    assert unknown.json()["detail"].replace("nobody-here", "X") == dormant.json()["detail"].replace("dormant", "X")
    for response in (unknown, dormant):
        assert "@" not in response.content.decode()


# ---- leaving a tenant ------------------------------------------------------------------------------

def test_leave_through_the_api(members, tenant):
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["read", "write"])
    # Not with a token: a token cannot take its user out of the tenant.
    assert api(token=plaintext).post("/api/v1/tenants/acme/leave/").status_code == 403
    response = api(members["developer"]).post("/api/v1/tenants/acme/leave/")
    assert response.status_code == 204
    assert not Membership.objects.filter(user=members["developer"], tenant=tenant).exists()
    assert token_authenticate(plaintext) is None
    assert AuditEvent.objects.filter(action="member.leave", actor=members["developer"]).exists()
    # Gone means gone: the tenant is a 404 to them now, leaving again too.
    assert api(members["developer"]).post("/api/v1/tenants/acme/leave/").status_code == 404


def test_the_last_owner_cannot_leave_and_strangers_get_404(members, tenant, outsider):
    refused = api(members["owner"]).post("/api/v1/tenants/acme/leave/")
    assert refused.status_code == 409 and "last owner" in refused.json()["detail"]
    assert api(outsider).post("/api/v1/tenants/acme/leave/").status_code == 404
    assert api().post("/api/v1/tenants/acme/leave/").status_code == 401


def test_leave_on_the_members_page_asks_first(members, tenant):
    client = Client()
    client.force_login(members["viewer"])
    page = client.get("/t/acme/members/")
    assert "/t/acme/leave/" in page.content.decode()
    confirm = client.get("/t/acme/leave/")
    assert confirm.status_code == 200 and "Leave acme?" in confirm.content.decode()
    assert Membership.objects.filter(user=members["viewer"], tenant=tenant).exists()
    done = client.post("/t/acme/leave/")
    assert done.status_code == 302
    assert not Membership.objects.filter(user=members["viewer"], tenant=tenant).exists()


def test_the_last_owner_leaving_on_the_page_is_told_why(members, tenant):
    client = Client()
    client.force_login(members["owner"])
    response = client.post("/t/acme/leave/", follow=True)
    assert "last owner" in response.content.decode()
    assert Membership.objects.filter(user=members["owner"], tenant=tenant).exists()
