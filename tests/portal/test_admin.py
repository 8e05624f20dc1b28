"""The back office renders for operators, and its actions go through services (audited)."""

import pytest
from django.urls import reverse

from functions.models import Function, Invocation, Revision
from tenancy.models import ApiToken, AuditEvent, Membership, Quota, Tenant
from tenancy.services import token_create

pytestmark = pytest.mark.django_db

MODELS = [Tenant, Quota, Membership, ApiToken, AuditEvent, Function, Revision, Invocation]


@pytest.fixture
def admin_client(client, operator):
    client.force_login(operator)
    return client


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m._meta.model_name)
def test_changelists_render(admin_client, function, model):
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    response = admin_client.get(url, {"q": "a"})
    assert response.status_code == 200


def test_change_pages_render(admin_client, function, tenant):
    for obj in (tenant, function, tenant.quota):
        url = reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])
        assert admin_client.get(url).status_code == 200


def test_members_cannot_enter_the_back_office(client, members):
    client.force_login(members["owner"])
    response = client.get(reverse("admin:index"))
    assert response.status_code == 302 and "login" in response["Location"]


def test_suspend_action_is_audited(admin_client, tenant):
    response = admin_client.post(reverse("admin:tenancy_tenant_changelist"),
                                 {"action": "suspend", "_selected_action": [tenant.pk]}, follow=True)
    assert response.status_code == 200
    tenant.refresh_from_db()
    assert tenant.status == "suspended"
    assert AuditEvent.objects.filter(action="tenant.suspend", actor_name="operator").exists()


def test_take_offline_action_goes_through_service(admin_client, function):
    admin_client.post(reverse("admin:functions_function_changelist"),
                      {"action": "take_offline", "_selected_action": [function.pk]})
    function.refresh_from_db()
    assert function.state == "offline"
    assert AuditEvent.objects.filter(action="function.offline", target_id=str(function.pk)).exists()


def test_token_admin_never_shows_hash(admin_client, tenant, members):
    token, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["read"])
    page = admin_client.get(reverse("admin:tenancy_apitoken_change", args=[token.pk])).content.decode()
    assert token.token_hash not in page and plaintext not in page


def test_create_tenant_in_admin_uses_service(admin_client):
    response = admin_client.post(reverse("admin:tenancy_tenant_add"),
                                 {"slug": "initech", "name": "Initech", "isolation": "shared",
                                  "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0"})
    assert response.status_code == 302, response.content.decode()[:2000]
    tenant = Tenant.objects.get(slug="initech")
    assert Quota.objects.filter(tenant=tenant).exists()
    assert AuditEvent.objects.filter(action="tenant.create", tenant=tenant).exists()
