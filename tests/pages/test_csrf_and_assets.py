"""CSRF on page forms and htmx posts; the static assets are local (no CDN) and nimbus_assets
copies exactly the vendor files the pages reference."""

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from functions.models import Revision
from tenancy.models import Tenant


@pytest.mark.django_db
def test_post_without_csrf_token_is_refused(function, members):
    client = Client(enforce_csrf_checks=True)
    client.force_login(members["developer"])
    deploy = reverse("function_deploy", args=["acme", "hello"])
    assert client.post(deploy, {"message": "no token"}).status_code == 403
    assert client.post(reverse("home"), {"slug": "sneaky", "name": "x"}).status_code == 403
    assert not Revision.objects.exists() and not Tenant.objects.filter(slug="sneaky").exists()

    # The token every page carries (in forms, and in hx-headers for htmx) is accepted.
    page = client.get(reverse("function_revisions", args=["acme", "hello"]))
    token = re.search(rb'"X-CSRFToken": "([^"]+)"', page.content).group(1).decode()
    assert client.post(deploy, {"message": "with header"}, headers={"X-CSRFToken": token}).status_code == 302
    form_token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.content).group(1).decode()
    assert client.post(deploy, {"message": "with field", "csrfmiddlewaretoken": form_token}).status_code == 302
    assert Revision.objects.count() == 2


@pytest.mark.django_db
def test_pages_load_nothing_from_other_hosts(function, members, client_for):
    client = client_for(members["owner"])
    for path in ("/", "/t/acme/", "/t/acme/f/hello/", "/t/acme/f/hello/revisions/", "/login/"):
        content = client.get(path).content.decode()
        external = re.findall(r'(?:src|href)="(?:https?:)?//[^"]+"', content)
        assert external == [], (path, external)


def referenced_vendor_files() -> set[str]:
    base = (Path(settings.BASE_DIR) / "templates" / "base.html").read_text()
    return set(re.findall(r"\{% static '(vendor/[^']+)' %\}", base))


def test_nimbus_assets_copies_what_the_pages_reference(tmp_path):
    node_modules = Path(settings.BASE_DIR) / "node_modules"
    if not (node_modules / "bootstrap").is_dir():
        pytest.skip("run `npm ci` first (make assets does)")
    dest = tmp_path / "vendor"
    (dest / "stale").mkdir(parents=True)
    (dest / "stale" / "old.js").write_text("old")
    call_command("nimbus_assets", node_modules=str(node_modules), dest=str(dest), stdout=open("/dev/null", "w"))
    copied = {str(p.relative_to(dest.parent)) for p in dest.rglob("*") if p.is_file()}
    assert referenced_vendor_files() <= copied
    assert "vendor/stale/old.js" not in copied
    # The icon font the stylesheet points at is there too.
    css = (dest / "bootstrap-icons" / "bootstrap-icons.min.css").read_text()
    for font in re.findall(r'url\("(fonts/[^"?]+)', css):
        assert (dest / "bootstrap-icons" / font).is_file()


def test_nimbus_assets_fails_clearly_without_node_modules(tmp_path):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="npm ci"):
        call_command("nimbus_assets", node_modules=str(tmp_path / "none"), dest=str(tmp_path / "vendor"))


@pytest.mark.django_db
def test_element_ids_are_unique_on_every_page(deployed, members, client_for):
    """Labels, htmx targets and copy buttons find their element by id: a duplicate breaks them."""
    from collections import Counter

    client = client_for(members["owner"])
    paths = ["/", "/t/acme/", "/t/acme/members/", "/t/acme/tokens/", "/t/acme/quota/", "/t/acme/audit/"]
    paths += [f"/t/acme/f/hello/{tab}" for tab in ("", "config/", "files/", "files/handler.py", "revisions/",
                                                     "traffic/", "env/", "sharing/", "invocations/", "delete/")]
    for path in paths:
        page = client.get(path)
        assert page.status_code == 200, path
        ids = Counter(re.findall(r'\sid="([^"]+)"', page.content.decode()))
        assert [i for i, n in ids.items() if n > 1] == [], path
