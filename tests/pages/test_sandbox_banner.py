"""The "functions are not isolated" banner: on every portal page, the login page and the admin's,
while the local engine runs functions without a sandbox; nowhere otherwise."""

from html.parser import HTMLParser

import pytest
from django.test import Client
from django.urls import reverse

WARNING = "Functions are not isolated: the local engine runs them without a sandbox (NIMBUS_LOCAL_SANDBOX=none)."


class AlertFinder(HTMLParser):
    """The text of every role="alert" element, and whether one holds a close button."""

    def __init__(self):
        super().__init__()
        self.alerts: list[str] = []
        self.dismissable = False
        self.depth = 0  # inside an alert: how many elements deep

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth:
            self.depth += 1
            if "data-bs-dismiss" in attrs or "btn-close" in (attrs.get("class") or ""):
                self.dismissable = True
        elif attrs.get("role") == "alert":
            self.depth = 1
            self.alerts.append("")

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.alerts[-1] += data


def sandbox_alerts(response) -> AlertFinder:
    finder = AlertFinder()
    finder.feed(response.content.decode())
    finder.alerts = [" ".join(text.split()) for text in finder.alerts if WARNING in " ".join(text.split())]
    return finder


def pages(members, operator, deployed):
    """(what, response) for a spread of pages: anonymous, tenant member, staff, an error page."""
    member, staff, anonymous = Client(), Client(), Client()
    member.force_login(members["developer"])
    staff.force_login(operator)
    tenant_function = {"tenant": "acme", "function": "hello"}
    return [
        ("login", anonymous.get(reverse("login"))),
        ("dashboard", member.get(reverse("home"))),
        ("function page", member.get(reverse("function_detail", kwargs=tenant_function))),
        ("IDE", member.get(reverse("webide:editor", kwargs=tenant_function))),
        ("404 page", member.get("/no-such-page/")),
        ("admin login", anonymous.get(reverse("admin:login"))),
        ("admin index", staff.get(reverse("admin:index"))),
        ("admin change list", staff.get(reverse("admin:auth_user_changelist"))),
    ]


@pytest.fixture
def unsandboxed(settings):
    settings.NIMBUS_ENGINE = "local"
    settings.NIMBUS_LOCAL = {**settings.NIMBUS_LOCAL, "SANDBOX": "none"}


@pytest.mark.django_db
def test_every_page_warns_while_functions_run_unsandboxed(unsandboxed, members, operator, deployed):
    for what, response in pages(members, operator, deployed):
        assert response.status_code in (200, 404), what
        found = sandbox_alerts(response)
        assert found.alerts == [WARNING], what
        assert not found.dismissable, what


@pytest.mark.django_db
def test_the_mode_is_read_in_any_case_as_the_engine_reads_it(settings, members):
    settings.NIMBUS_ENGINE = "local"
    settings.NIMBUS_LOCAL = {**settings.NIMBUS_LOCAL, "SANDBOX": "None"}
    assert sandbox_alerts(Client().get(reverse("login"))).alerts == [WARNING]


@pytest.mark.django_db
def test_the_portal_banner_uses_bootstrap(unsandboxed, members):
    page = Client().get(reverse("login"))
    assert b'class="alert alert-danger' in page.content


@pytest.mark.django_db
@pytest.mark.parametrize(("engine_name", "sandbox"), [("local", "bwrap"), ("knative", "none")])
def test_no_banner_when_functions_are_isolated(engine_name, sandbox, settings, members, operator, deployed):
    settings.NIMBUS_ENGINE = engine_name
    settings.NIMBUS_LOCAL = {**settings.NIMBUS_LOCAL, "SANDBOX": sandbox}
    for what, response in pages(members, operator, deployed):
        assert response.status_code in (200, 404), what
        assert sandbox_alerts(response).alerts == [], what
        assert b"not isolated" not in response.content, what
