"""The pages' htmx and script behaviour in a real browser (Playwright + Debian's Chromium) against
pytest-django's live server: the starter list follows the runtime, the revisions table polls while a
deploy is in progress and stops when it settles, and the theme choice is remembered."""

from pathlib import Path

import pytest
from django.db import connections
from django.test import Client

from functions.models import Revision

CHROMIUM = "/usr/bin/chromium"

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e .[test])"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's Chromium is missing (apt-get install chromium)"),
    pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "static" / "vendor" / "htmx").is_dir(),
                       reason="run `make assets` first (static/vendor/ holds htmx and Bootstrap)"),
]


@pytest.fixture
def browser_page(live_server, monkeypatch):
    # Playwright's sync API keeps an event loop running in this thread; the ORM calls the test makes
    # meanwhile are still plain synchronous calls, which is what this switch acknowledges.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})

            def login(user):
                client = Client()
                client.force_login(user)
                context.add_cookies([{"name": "sessionid", "value": client.cookies["sessionid"].value,
                                      "url": live_server.url}])
                return context.new_page()

            yield login
        finally:
            browser.close()
            # ORM calls made while Playwright's loop runs get their own connection (the
            # connection handler is context-local); close it, or PostgreSQL cannot drop the test
            # database at the end of the session.
            connections.close_all()


@pytest.mark.django_db(transaction=True)
def test_starter_options_follow_the_runtime(live_server, browser_page, tenant, members):
    page = browser_page(members["developer"])
    page.goto(f"{live_server.url}/t/acme/")
    starters = page.locator("#id_starter option")
    expect(starters).to_have_count(4)
    page.select_option("#id_runtime", "node20")
    expect(starters).to_have_count(2)
    assert starters.evaluate_all("options => options.map(o => o.value)") == ["hello", "http-json"]


@pytest.mark.django_db(transaction=True)
def test_revisions_table_polls_until_the_deploy_settles(live_server, browser_page, function, members):
    revision = Revision.objects.create(function=function, number=1, content_hash="0" * 64, files={}, config={},
                                       author=members["developer"], message="rolling out",
                                       status=Revision.Status.DEPLOYING)
    page = browser_page(members["viewer"])
    page.goto(f"{live_server.url}/t/acme/f/hello/revisions/")
    table = page.locator("#revisions-table")
    expect(table).to_contain_text("Deploying")
    expect(table).to_have_attribute("hx-trigger", "every 2s")
    navigations = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))

    Revision.objects.filter(pk=revision.pk).update(status=Revision.Status.READY)
    expect(table.locator("tbody tr").first).to_contain_text("Ready", timeout=10_000)
    # Swapped in place, and the settled table no longer polls.
    assert navigations == []
    assert page.locator("#revisions-table").get_attribute("hx-trigger") is None


@pytest.mark.django_db(transaction=True)
def test_theme_choice_is_remembered(live_server, browser_page, members):
    page = browser_page(members["viewer"])
    page.goto(live_server.url + "/")
    html = page.locator("html")
    start = html.get_attribute("data-bs-theme")
    page.click("[data-theme-toggle]")
    flipped = "dark" if start == "light" else "light"
    expect(html).to_have_attribute("data-bs-theme", flipped)
    page.goto(live_server.url + "/t/acme/")
    expect(html).to_have_attribute("data-bs-theme", flipped)
