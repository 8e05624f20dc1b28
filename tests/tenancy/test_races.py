"""A tenant always keeps an owner, however its owners race each other: role changes, removals and
leaving run under the tenant's row lock and re-read the memberships there. Races run on PostgreSQL
in real threads; the refusals and the lock discipline are checked on every database."""

import pytest
from django.contrib.auth import get_user_model

from portal.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from tenancy.models import AuditEvent, Membership, Role, Tenant
from tenancy.selectors import user_can_tenant
from tenancy.services import (
    quota_update,
    require_tenant_locked,
    tenant_locked,
    tenant_member_add,
    tenant_member_change_role,
    tenant_member_leave,
    tenant_member_remove,
    token_create,
)
from tests.conftest import make_user
from tests.races import race, run_together, unexpected

pytestmark = pytest.mark.django_db

User = get_user_model()
ROUNDS = 10


@pytest.fixture
def owners(members, tenant):
    """Two owners of acme: the fixture's owner and a second one."""
    second = make_user("acme-owner2")
    tenant_member_add(acting_user=members["owner"], tenant=tenant, username=second.username, role=Role.OWNER)
    return members["owner"], second


def owner_count(tenant) -> int:
    return Membership.objects.filter(tenant=tenant, role=Role.OWNER).count()


def restore_owners(operator, tenant, *users) -> None:
    """Between rounds: every user back as an owner (added again if they were removed or left)."""
    for user in users:
        membership = Membership.objects.filter(tenant=tenant, user=user).first()
        if membership is None:
            tenant_member_add(acting_user=operator, tenant=tenant, username=user.username, role=Role.OWNER)
        elif membership.role != Role.OWNER:
            tenant_member_change_role(acting_user=operator, membership=membership, role=Role.OWNER)
    assert Membership.objects.filter(tenant=tenant, user__in=users, role=Role.OWNER).count() == len(users)


def as_request(user, tenant):
    """What a request in another thread loads: the user, and their membership of the tenant."""
    return User.objects.get(pk=user.pk), Tenant.objects.get(pk=tenant.pk)


def loaded_membership(tenant, user) -> Membership:
    """The membership as a page or API view loads it, before the service runs (a 404 if gone)."""
    membership = Membership.objects.select_related("tenant", "user").filter(tenant=tenant, user=user).first()
    if membership is None:
        raise NotFound(f"{user.username} is not a member of {tenant.slug}.")
    return membership


def set_role(actor, target, tenant, role=Role.ADMIN):
    def call():
        user, _ = as_request(actor, tenant)
        return tenant_member_change_role(acting_user=user, membership=loaded_membership(tenant, target), role=role)
    return call


def remove(actor, target, tenant):
    def call():
        user, _ = as_request(actor, tenant)
        return tenant_member_remove(acting_user=user, membership=loaded_membership(tenant, target))
    return call


def leave(actor, tenant):
    def call():
        user, fresh_tenant = as_request(actor, tenant)
        return tenant_member_leave(acting_user=user, tenant=fresh_tenant)
    return call


# ---- races (PostgreSQL, real threads) -------------------------------------------------------

@race
def test_two_owners_demoting_each_other_always_leave_an_owner(owners, tenant, operator):
    a, b = owners
    for _ in range(ROUNDS):
        restore_owners(operator, tenant, a, b)
        outcomes = run_together(set_role(a, b, tenant), set_role(b, a, tenant))
        # The loser is no longer an owner when its turn comes: it may not touch the owner role.
        assert not unexpected(outcomes, PermissionDenied, Conflict)
        assert [o.ok for o in outcomes].count(True) == 1
        assert owner_count(tenant) == 1


@race
def test_owner_removing_the_other_while_being_demoted_leaves_an_owner(owners, tenant, operator):
    a, b = owners
    for _ in range(ROUNDS):
        restore_owners(operator, tenant, a, b)
        outcomes = run_together(remove(a, b, tenant), set_role(b, a, tenant, role=Role.VIEWER))
        assert not unexpected(outcomes, PermissionDenied, Conflict, NotFound)
        assert [o.ok for o in outcomes].count(True) == 1
        assert owner_count(tenant) == 1


@race
def test_two_owners_removing_each_other_leave_an_owner(owners, tenant, operator):
    a, b = owners
    for _ in range(ROUNDS):
        restore_owners(operator, tenant, a, b)
        outcomes = run_together(remove(a, b, tenant), remove(b, a, tenant))
        assert not unexpected(outcomes, PermissionDenied, Conflict, NotFound)
        assert [o.ok for o in outcomes].count(True) == 1
        assert owner_count(tenant) == 1


@race
def test_every_owner_leaving_at_once_leaves_the_last_one(owners, tenant, operator):
    third = make_user("acme-owner3")
    users = (*owners, third)
    for _ in range(ROUNDS):
        restore_owners(operator, tenant, *users)
        outcomes = run_together(*(leave(user, tenant) for user in users))
        assert not unexpected(outcomes, Conflict)
        assert [o.ok for o in outcomes].count(True) == 2
        (refused,) = [o.error for o in outcomes if not o.ok]
        assert "you are the last owner of acme" in refused.message
        assert owner_count(tenant) == 1


@race
def test_owner_stepping_down_while_the_other_leaves_leaves_an_owner(owners, tenant, operator):
    a, b = owners
    for _ in range(ROUNDS):
        restore_owners(operator, tenant, a, b)
        outcomes = run_together(set_role(a, a, tenant, role=Role.DEVELOPER), leave(b, tenant))
        assert not unexpected(outcomes, Conflict)
        assert [o.ok for o in outcomes].count(True) == 1
        assert owner_count(tenant) == 1


@race
def test_promoting_and_demoting_at_once_never_leaves_the_tenant_ownerless(owners, tenant, operator, members):
    a, b = owners
    admin = members["admin"]
    for _ in range(ROUNDS):
        restore_owners(operator, tenant, a, b)
        membership = Membership.objects.get(tenant=tenant, user=admin)
        if membership.role != Role.ADMIN:
            tenant_member_change_role(acting_user=operator, membership=membership, role=Role.ADMIN)
        assert owner_count(tenant) == 2
        # a promotes the admin while each owner steps down: at most the promotion and one step-down
        # can be accepted without leaving the tenant ownerless.
        outcomes = run_together(set_role(a, admin, tenant, role=Role.OWNER), set_role(a, a, tenant),
                                set_role(b, b, tenant))
        assert not unexpected(outcomes, PermissionDenied, Conflict)
        assert owner_count(tenant) >= 1


# ---- refusals, one by one (every database) --------------------------------------------------

def test_the_last_owner_is_refused_with_a_message_for_each_way_out(members, tenant):
    owner = members["owner"]
    membership = Membership.objects.get(tenant=tenant, user=owner)
    with pytest.raises(Conflict) as err:
        tenant_member_change_role(acting_user=owner, membership=membership, role=Role.ADMIN)
    assert err.value.message == ("A tenant needs at least one owner: acme-owner is the last owner of acme; "
                                 "make someone else owner before changing their role.")
    with pytest.raises(Conflict) as err:
        tenant_member_remove(acting_user=owner, membership=membership)
    assert err.value.message == ("A tenant needs at least one owner: acme-owner is the last owner of acme; "
                                 "make someone else owner before removing them.")
    with pytest.raises(Conflict) as err:
        tenant_member_leave(acting_user=owner, tenant=tenant)
    assert err.value.message == ("A tenant needs at least one owner: you are the last owner of acme; "
                                 "make someone else owner before leaving.")
    assert Membership.objects.get(tenant=tenant, user=owner).role == Role.OWNER
    assert not AuditEvent.objects.filter(action__in=["member.change_role", "member.remove", "member.leave"]).exists()


def test_an_operator_cannot_take_the_last_owner_away_either(members, tenant, operator):
    membership = Membership.objects.get(tenant=tenant, user=members["owner"])
    with pytest.raises(Conflict, match="at least one owner"):
        tenant_member_remove(acting_user=operator, membership=membership)
    with pytest.raises(Conflict, match="at least one owner"):
        tenant_member_change_role(acting_user=operator, membership=membership, role=Role.VIEWER)


def test_a_member_leaves_and_loses_access_and_tokens(members, tenant):
    dev = members["developer"]
    token, _ = token_create(acting_user=dev, tenant=tenant, name="ci", scopes=["read"])
    tenant_member_leave(acting_user=dev, tenant=tenant)
    assert not Membership.objects.filter(tenant=tenant, user=dev).exists()
    assert not user_can_tenant(User.objects.get(pk=dev.pk), tenant, "view_tenant")
    token.refresh_from_db()
    assert token.revoked_at is not None
    event = AuditEvent.objects.get(action="member.leave")
    assert (event.actor, event.details) == (dev, {"user": dev.username, "role": Role.DEVELOPER})
    with pytest.raises(NotFound, match="You are not a member of acme."):
        tenant_member_leave(acting_user=dev, tenant=tenant)


def test_one_of_two_owners_may_step_down_then_the_other_may_not(owners, tenant):
    a, b = owners
    tenant_member_change_role(acting_user=a, membership=Membership.objects.get(tenant=tenant, user=a),
                              role=Role.ADMIN)
    with pytest.raises(Conflict, match="acme-owner2 is the last owner of acme"):
        tenant_member_change_role(acting_user=b, membership=Membership.objects.get(tenant=tenant, user=b),
                                  role=Role.ADMIN)


def test_changes_are_decided_on_the_memberships_as_they_are_under_the_lock(owners, tenant, operator):
    a, b = owners
    # b's page loaded a's membership while a was an owner; meanwhile an operator demoted b.
    a_as_loaded = Membership.objects.get(tenant=tenant, user=a)
    b_membership = Membership.objects.get(tenant=tenant, user=b)
    tenant_member_change_role(acting_user=operator, membership=b_membership, role=Role.ADMIN)
    with pytest.raises(PermissionDenied, match="Only an owner can grant or take away the owner role."):
        tenant_member_change_role(acting_user=User.objects.get(pk=b.pk), membership=a_as_loaded, role=Role.ADMIN)
    with pytest.raises(PermissionDenied, match="Only an owner can remove an owner."):
        tenant_member_remove(acting_user=User.objects.get(pk=b.pk), membership=a_as_loaded)
    # A membership removed since it was loaded is gone, whatever the stale copy says.
    tenant_member_remove(acting_user=a, membership=b_membership)
    with pytest.raises(NotFound, match="acme-owner2 is no longer a member of acme."):
        tenant_member_change_role(acting_user=a, membership=b_membership, role=Role.VIEWER)
    assert owner_count(tenant) == 1


def test_owner_checks_outside_the_tenant_lock_are_a_programming_error(tenant):
    with pytest.raises(RuntimeError, match="tenant_locked"):
        require_tenant_locked(tenant)
    with tenant_locked(tenant) as locked:
        require_tenant_locked(locked)
        require_tenant_locked(tenant.pk)
        assert locked.quota.max_functions == 50  # the quota comes with the lock, read under it
    with pytest.raises(RuntimeError):
        require_tenant_locked(tenant)


def test_tenant_lock_of_a_missing_tenant_is_not_found(db):
    with pytest.raises(NotFound), tenant_locked(999_999):
        pass


def test_quota_update_refuses_unknown_limits_and_records_the_change(tenant, operator):
    with pytest.raises(ValidationFailed, match="Unknown quota 'id'."):
        quota_update(acting_user=operator, tenant=tenant, id=1)
    quota_update(acting_user=operator, tenant=tenant, max_functions=7)
    assert Tenant.objects.get(pk=tenant.pk).quota.max_functions == 7
    assert tenant.quota.max_functions == 7
    assert AuditEvent.objects.get(action="quota.update").details == {"max_functions": [50, 7]}
