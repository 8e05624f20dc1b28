"""Turning an account off is announced however it is done: any save that takes ``is_active`` from True
to False (Django's admin, a script) raises the access generation and closes the user's IDE sockets in
every tenant they belong to, like tenancy.services.user_deactivate, which now relies on it. Other saves
announce nothing."""

import pytest

from tenancy import signals
from tenancy.services import user_deactivate

pytestmark = pytest.mark.django_db


@pytest.fixture
def announced(monkeypatch):
    calls = []
    monkeypatch.setattr(signals, "access_changed", lambda **kwargs: calls.append(kwargs))
    return calls


def test_saving_a_user_inactive_announces_it_in_each_of_their_tenants(members, tenant, announced):
    from tests.conftest import make_user
    from tenancy.services import tenant_create, tenant_member_add

    other_owner = make_user("initech-owner")
    other = tenant_create(acting_user=other_owner, slug="initech", name="Initech")
    tenant_member_add(acting_user=other_owner, tenant=other, username=members["developer"].username,
                      role="viewer")
    user = members["developer"]
    user.is_active = False
    user.save()
    (call,) = announced
    assert sorted(call["tenant_ids"]) == sorted([tenant.pk, other.pk])
    assert call["user_ids"] == [user.pk] and call["close_sockets"] is True
    assert "deactivated" in call["reason"]


def test_other_saves_announce_nothing(members, announced):
    user = members["developer"]
    user.first_name = "Dev"
    user.save()
    user.is_active = False
    user.save(update_fields=["first_name"])  # not the field: the database keeps it active
    assert announced == []
    user.save(update_fields=["is_active"])
    assert len(announced) == 1
    user.save()  # already inactive: nothing changes
    user.is_active = True
    user.save()  # turned back on: nothing to take away
    assert len(announced) == 1


def test_user_deactivate_announces_once(members, operator, announced):
    user_deactivate(acting_user=operator, user=members["developer"])
    assert len(announced) == 1


def test_an_operators_deactivation_closes_their_sockets_in_every_tenant(operator, tenant, announced):
    operator.is_active = False
    operator.save()
    (call,) = announced
    assert tenant.pk in call["tenant_ids"] and call["user_ids"] == [operator.pk]

