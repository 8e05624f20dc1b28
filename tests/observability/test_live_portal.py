"""The demo path on a real portal (daphne, the local engine, Chromium): after a few calls the
Monitor tab shows charts, the recent invocations and the latest trace's waterfall, and the Logs
tab's live tail (the IDE's consumer) shows a new call's line as it happens."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.observability.test_prometheus_scrape import ROOT, SETUP, free_port, stop, wait_for_port
from tests.pages.test_browser import CHROMIUM, pytestmark as browser_marks

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None

pytestmark = [*browser_marks, pytest.mark.slow]


def call(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/fn/acme/hello/?name={name}", timeout=60) as response:
        assert response.status == 200


def test_monitor_and_live_tail_on_a_running_portal(tmp_path, shared_tmp):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SQLITE_PATH", "REDIS_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "NIMBUS_DATA_DIR": str(shared_tmp),
                "NIMBUS_DEPLOY_INLINE": "1", "NIMBUS_SOCKET_DIR": str(tmp_path / "s")})
    manage = [sys.executable, str(ROOT / "manage.py")]
    for args in (["migrate", "--noinput"], ["shell", "-c", SETUP]):
        result = subprocess.run(manage + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    port = free_port()
    env["ALLOWED_HOSTS"] = "127.0.0.1,localhost"
    daphne = subprocess.Popen([str(Path(sys.executable).parent / "daphne"), "-b", "127.0.0.1", "-p", str(port),
                               "portal.asgi:application"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, daphne, time.monotonic() + 60)
        for name in ("Ada", "Grace"):
            call(port, name)
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                errors = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"{base}/login/?next=/t/acme/f/hello/monitor/")
                page.fill("#id_username", "prom")
                page.fill("#id_password", "pw-prom-123456")
                page.click("button[type=submit]")
                page.wait_for_url(f"{base}/t/acme/f/hello/monitor/")
                # The records writer works in batches: reload until both calls are rolled up.
                deadline = time.monotonic() + 20
                while page.locator("[data-metric='invocations']").inner_text() != "2" and time.monotonic() < deadline:
                    time.sleep(0.3)
                    page.reload()
                expect(page.locator("[data-metric='invocations']")).to_have_text("2")
                expect(page.locator("[data-metric='cold_starts']")).to_have_text("1")
                page.wait_for_selector("canvas[data-chart='latency'][data-drawn='yes']")
                expect(page.locator("#waterfall tr[data-span-kind='handler']")).to_have_count(1)
                expect(page.locator("#recent-logs")).to_contain_text("saying hello to")

                page.goto(f"{base}/t/acme/f/hello/logs/?q=hello")
                expect(page.locator("#log-results")).to_contain_text("saying hello to Grace")
                page.click("#live-tail")
                expect(page.locator("#tail-state")).to_have_text("following")
                call(port, "Hopper")
                expect(page.locator("#tail-lines")).to_contain_text("saying hello to Hopper", timeout=15_000)
                assert errors == []
            finally:
                browser.close()
    finally:
        stop(daphne)
