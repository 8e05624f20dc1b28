"""A downgrade narrows the member's tokens of the tenant in the database, not only at each use: a
later promotion gives no scope back (more takes a new token), a token left with no scope is revoked,
and each change is audited. Promotions and other tenants' tokens are left alone."""

import pytest

from tenancy.models import ApiToken, AuditEvent, Membership
from tenancy.services import (
    tenant_create,
    tenant_member_add,
    tenant_member_change_role,
    token_authenticate,
    token_create,
)
from tests.conftest import make_user

pytestmark = pytest.mark.django_db


def change(members, role, to):
    return tenant_member_change_role(acting_user=members["owner"],
                                     membership=Membership.objects.get(user=members[role], tenant__slug="acme"),
                                     role=to)


def stored(plaintext) -> ApiToken:
    return ApiToken.objects.get(prefix=plaintext.split("_")[1])


def test_a_downgraded_then_promoted_developers_token_does_not_get_deploy_back(members, tenant):
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="ci",
                                scopes=["read", "write", "deploy", "invoke"])
    change(members, "developer", "viewer")
    assert stored(plaintext).scopes == ["invoke", "read"]
    change(members, "developer", "developer")
    assert stored(plaintext).scopes == ["invoke", "read"]
    assert token_authenticate(plaintext).scopes == ["invoke", "read"]
    narrowed = AuditEvent.objects.get(action="token.narrow")
    assert narrowed.actor == members["owner"] and narrowed.tenant == tenant
    assert narrowed.details == {"prefix": stored(plaintext).prefix, "from": ["deploy", "invoke", "read", "write"],
                                "to": ["invoke", "read"], "role": "viewer"}


def test_a_token_left_with_no_scope_is_revoked_and_audited(members, tenant):
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="deployer",
                                scopes=["deploy", "publish"])
    change(members, "developer", "viewer")
    token = stored(plaintext)
    assert token.revoked_at is not None and token.scopes == ["deploy", "publish"]  # kept for the record
    assert token_authenticate(plaintext) is None
    revoked = AuditEvent.objects.get(action="token.revoke", details__prefix=token.prefix)
    assert revoked.actor == members["owner"] and "viewer role allows none" in revoked.details["reason"]
    change(members, "developer", "developer")
    assert token_authenticate(plaintext) is None


def test_promotions_and_tokens_already_within_the_role_are_untouched(members, tenant):
    _, within = token_create(acting_user=members["developer"], tenant=tenant, name="ro", scopes=["read"])
    _, viewer = token_create(acting_user=members["viewer"], tenant=tenant, name="v", scopes=["read", "invoke"])
    change(members, "developer", "viewer")
    change(members, "viewer", "developer")
    assert stored(within).scopes == ["read"] and stored(viewer).scopes == ["invoke", "read"]
    assert not AuditEvent.objects.filter(action__in=["token.narrow", "token.revoke"]).exists()


def test_only_the_tenant_whose_role_changed(members, tenant):
    other_owner = make_user("initech-owner")
    other = tenant_create(acting_user=other_owner, slug="initech", name="Initech")
    tenant_member_add(acting_user=other_owner, tenant=other, username=members["developer"].username,
                      role="developer")
    _, elsewhere = token_create(acting_user=members["developer"], tenant=other, name="ci",
                                scopes=["read", "deploy"])
    _, here = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["read", "deploy"])
    change(members, "developer", "viewer")
    assert stored(here).scopes == ["read"] and stored(elsewhere).scopes == ["deploy", "read"]
