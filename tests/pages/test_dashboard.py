"""Login, logout and the dashboard: my tenants with my role, recent functions and deploys, new tenant."""

import pytest
from django.test import Client
from django.urls import reverse

from tenancy.models import Membership, Tenant


@pytest.mark.django_db
def test_login_then_dashboard_then_logout(members):
    client = Client()
    response = client.post(reverse("login"), {"username": "acme-viewer", "password": "pw-acme-viewer"})
    assert response.status_code == 302 and response["Location"] == reverse("home")
    page = client.get(reverse("home"))
    assert page.status_code == 200
    assert b"acme-viewer" in page.content
    response = client.post(reverse("logout"))
    assert response.status_code == 302
    assert client.get(reverse("home")).status_code == 302


@pytest.mark.django_db
def test_wrong_password_shows_an_error(members):
    page = Client().post(reverse("login"), {"username": "acme-viewer", "password": "nope"})
    assert page.status_code == 200
    assert b"did not match" in page.content


@pytest.mark.django_db
def test_dashboard_lists_my_tenants_role_and_recent_deploys(deployed, members, outsider, client_for):
    page = client_for(members["viewer"]).get(reverse("home"))
    rows = page.context["tenant_rows"]
    assert [(t.slug, role) for t, role in rows] == [("acme", "viewer")]
    assert [r.number for r in page.context["recent_deploys"]] == [2, 1]
    assert [f.name for f in page.context["recent_functions"]] == ["hello"]
    assert b"acme/hello" in page.content
    # The other tenant's owner sees only globex and none of acme's functions or deploys.
    other = client_for(outsider).get(reverse("home"))
    assert [t.slug for t, _ in other.context["tenant_rows"]] == ["globex"]
    assert other.context["recent_deploys"] == [] and b"acme/hello" not in other.content


@pytest.mark.django_db
def test_new_user_sees_what_to_do(db, client_for):
    from tests.conftest import make_user

    page = client_for(make_user("newcomer")).get(reverse("home"))
    assert b"You are not a member of any tenant yet" in page.content
    assert b'id="new-tenant"' in page.content


@pytest.mark.django_db
def test_create_tenant_from_the_dashboard(db, client_for):
    from tests.conftest import make_user

    user = make_user("founder")
    client = client_for(user)
    response = client.post(reverse("home"), {"slug": "initech", "name": "Initech"})
    assert response.status_code == 302 and response["Location"] == reverse("tenant_functions", args=["initech"])
    assert Membership.objects.get(tenant__slug="initech").role == "owner"
    # Refusals land on the field: a taken slug (service Conflict) and an invalid one (form validation).
    again = client.post(reverse("home"), {"slug": "initech", "name": "Again"})
    assert again.status_code == 200
    assert "already exists" in str(again.context["form"].errors["slug"])
    bad = client.post(reverse("home"), {"slug": "Not A Slug", "name": ""})
    assert "slug" in bad.context["form"].errors
    assert Tenant.objects.filter(slug__in=["Not A Slug"]).count() == 0


@pytest.mark.django_db
def test_no_tenant_form_when_self_service_is_off(db, client_for, settings):
    from tests.conftest import make_user

    settings.NIMBUS_SELF_SERVICE_TENANTS = False
    client = client_for(make_user("newcomer"))
    page = client.get(reverse("home"))
    assert b'id="new-tenant"' not in page.content and b"Ask a tenant" in page.content
    refused = client.post(reverse("home"), {"slug": "mine", "name": "Mine"})
    assert refused.status_code == 403 and "Only platform operators" in refused.content.decode()
    assert not Tenant.objects.filter(slug="mine").exists()
