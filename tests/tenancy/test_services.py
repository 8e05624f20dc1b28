import pytest
from django.contrib.auth import get_user_model

from portal.errors import Conflict, PermissionDenied, ValidationFailed
from tenancy.models import ApiToken, AuditEvent, Membership, Role, Tenant
from tenancy.selectors import tenant_for_user, tenants_for_user, user_can_tenant
from tenancy.services import (
    tenant_create,
    tenant_member_add,
    tenant_member_change_role,
    tenant_member_remove,
    tenant_suspend,
    token_authenticate,
    token_create,
    token_revoke,
)
from portal.errors import NotFound
from tests.conftest import make_user

pytestmark = pytest.mark.django_db


def test_tenant_create_makes_owner_quota_and_audit(members, tenant):
    assert Membership.objects.get(tenant=tenant, user=members["owner"]).role == Role.OWNER
    assert tenant.quota.max_functions == 50
    event = AuditEvent.objects.filter(action="tenant.create", tenant=tenant).get()
    assert event.actor == members["owner"]


@pytest.mark.parametrize("slug", ["", "Acme", "1abc", "a_b", "ab-", "x" * 31, "../x"])
def test_tenant_slug_validated(slug, operator):
    with pytest.raises(ValidationFailed) as err:
        tenant_create(acting_user=operator, slug=slug, name="x")
    assert err.value.field == "slug"
    assert not Tenant.objects.exists()


def test_duplicate_tenant_is_a_conflict(tenant, operator):
    with pytest.raises(Conflict) as refused:
        tenant_create(acting_user=operator, slug="acme", name="again")
    assert refused.value.field == "slug"


@pytest.mark.parametrize("role,expected", [
    ("owner", {"view_tenant", "create_function", "manage_members", "manage_tokens", "view_audit", "change_tenant"}),
    ("admin", {"view_tenant", "create_function", "manage_members", "manage_tokens", "view_audit"}),
    ("developer", {"view_tenant", "create_function"}),
    ("viewer", {"view_tenant"}),
])
def test_role_permissions_on_tenant(members, tenant, role, expected):
    user = members[role]
    actions = {"view_tenant", "create_function", "manage_members", "manage_tokens", "view_audit", "change_tenant"}
    assert {a for a in actions if user_can_tenant(user, tenant, a)} == expected


def test_outsider_gets_not_found(tenant, outsider):
    with pytest.raises(NotFound):
        tenant_for_user(outsider, "acme")
    assert list(tenants_for_user(outsider).values_list("slug", flat=True)) == ["globex"]


def test_developer_cannot_manage_members(members, tenant):
    with pytest.raises(PermissionDenied):
        tenant_member_add(acting_user=members["developer"], tenant=tenant, username="acme-viewer", role="admin")


def test_admin_cannot_make_owners(members, tenant):
    newcomer = make_user("newcomer")
    with pytest.raises(PermissionDenied):
        tenant_member_add(acting_user=members["admin"], tenant=tenant, username=newcomer.username, role="owner")
    membership = tenant_member_add(acting_user=members["admin"], tenant=tenant, username="newcomer", role="viewer")
    assert membership.role == "viewer"


def test_role_change_moves_group_and_permissions(members, tenant):
    viewer = members["viewer"]
    membership = Membership.objects.get(tenant=tenant, user=viewer)
    tenant_member_change_role(acting_user=members["admin"], membership=membership, role="admin")
    viewer = get_user_model().objects.get(pk=viewer.pk)  # fresh permission cache
    assert user_can_tenant(viewer, tenant, "manage_members")
    assert AuditEvent.objects.filter(action="member.change_role", details__to="admin").exists()


def test_last_owner_cannot_leave(members, tenant):
    membership = Membership.objects.get(tenant=tenant, user=members["owner"])
    with pytest.raises(Conflict):
        tenant_member_remove(acting_user=members["owner"], membership=membership)
    with pytest.raises(Conflict):
        tenant_member_change_role(acting_user=members["owner"], membership=membership, role="viewer")


def test_removed_member_loses_access_and_tokens(members, tenant):
    dev = members["developer"]
    token, plaintext = token_create(acting_user=dev, tenant=tenant, name="ci", scopes=["read"])
    tenant_member_remove(acting_user=members["admin"], membership=Membership.objects.get(tenant=tenant, user=dev))
    dev = get_user_model().objects.get(pk=dev.pk)
    with pytest.raises(NotFound):
        tenant_for_user(dev, "acme")
    assert token_authenticate(plaintext) is None


def test_token_is_hashed_shown_once_and_revocable(members, tenant):
    token, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="ci",
                                    scopes=["read", "invoke"])
    assert plaintext.startswith(f"nmb_{token.prefix}_")
    assert plaintext not in {token.token_hash, token.prefix}
    assert not ApiToken.objects.filter(token_hash=plaintext).exists()
    assert token_authenticate(plaintext).pk == token.pk
    assert token_authenticate(plaintext + "x") is None
    # Another developer cannot revoke it; an admin can.
    with pytest.raises(NotFound):
        token_revoke(acting_user=members["viewer"], token=token)
    token_revoke(acting_user=members["admin"], token=token)
    assert token_authenticate(plaintext) is None
    assert not AuditEvent.objects.filter(details__icontains=plaintext).exists()


def test_token_scopes_validated(members, tenant):
    with pytest.raises(ValidationFailed):
        token_create(acting_user=members["developer"], tenant=tenant, name="x", scopes=["root"])
    with pytest.raises(ValidationFailed):
        token_create(acting_user=members["developer"], tenant=tenant, name="x", scopes=[])


def test_only_operators_suspend(members, tenant, operator):
    with pytest.raises(PermissionDenied):
        tenant_suspend(acting_user=members["owner"], tenant=tenant)
    tenant_suspend(acting_user=operator, tenant=tenant, reason="unpaid")
    tenant.refresh_from_db()
    assert tenant.status == "suspended"
