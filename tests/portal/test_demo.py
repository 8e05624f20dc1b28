import pytest
from django.core.management import call_command

from functions.models import Function, Sequence
from tenancy.models import Membership, Tenant

pytestmark = pytest.mark.django_db


def test_demo_is_created_once(capsys):
    call_command("nimbus_demo", "--no-deploy", "--admin-password", "demo-pass-1")
    out = capsys.readouterr().out
    assert "admin" in out and "demo-pass-1" in out
    tenant = Tenant.objects.get(slug="demo")
    assert set(Membership.objects.filter(tenant=tenant).values_list("role", flat=True)) == {
        "owner", "admin", "developer", "viewer"}
    assert Function.objects.filter(tenant=tenant).count() == 6
    checkout = Sequence.objects.get(tenant=tenant, name="checkout")
    assert [s.function.name for s in checkout.steps.order_by("position")] == ["prices", "receipt"]
    call_command("nimbus_demo", "--no-deploy")
    assert Function.objects.filter(tenant=tenant).count() == 6
    assert Sequence.objects.filter(tenant=tenant).count() == 1
    assert Membership.objects.filter(tenant=tenant).count() == 4
