"""The Monitor tab in a real browser (Playwright + Debian's Chromium): Chart.js loads from the
portal's own static files and draws every chart, with no script errors under the page's CSP."""

from pathlib import Path

import pytest

from observability import ingest
from tests.pages.test_browser import CHROMIUM, browser_page, pytestmark as browser_marks  # noqa: F401

pytestmark = [*browser_marks, pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "static" / "vendor" / "chartjs").is_dir(),
    reason="run `make assets` first (static/vendor/ holds Chart.js)")]


@pytest.mark.django_db(transaction=True)
def test_monitor_tab_draws_its_charts(live_server, browser_page, members, function, record, minute):
    ingest.invocations_written([record(minute, 12, cold_start=True, instance="a"), record(minute, 250)])
    page = browser_page(members["viewer"])
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{live_server.url}/t/acme/f/hello/monitor/?range=15m")
    page.wait_for_selector("canvas[data-chart='usage'][data-drawn='yes']")
    assert page.locator("canvas[data-drawn='yes']").count() == 4
    assert page.evaluate("typeof window.Chart") == "function"
    assert page.evaluate("Chart.getChart(document.querySelector(\"canvas[data-chart='calls']\"))"
                         ".data.datasets[0].data.reduce((a, b) => a + b, 0)") == 2
    assert errors == []
