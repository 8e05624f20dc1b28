"""The IDE in a real browser: Playwright drives Debian's Chromium against daphne serving the portal
(HTTP, WebSocket and the /fn/ gateway) on a free port, with its own database.

Screenshots land in test-results/webide/. The time from clicking Deploy to the first successful test
call is printed (a figure for the record, never asserted).
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "test-results" / "webide"

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None

try:
    import functions.engines.local.engine  # noqa: F401
    HAVE_LOCAL_ENGINE = True
except ImportError:  # pragma: no cover - only before the local engine lands
    HAVE_LOCAL_ENGINE = False

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install -e .[test])"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's Chromium is missing (apt-get install chromium)"),
]

SEED = """
from django.contrib.auth import get_user_model
from tenancy.services import tenant_create, tenant_member_add
User = get_user_model()
users = {r: User.objects.create_user("acme-" + r, password="pw-acme-" + r) for r in ("owner", "admin", "developer", "viewer")}
tenant = tenant_create(acting_user=users["owner"], slug="acme", name="Acme")
for role in ("admin", "developer", "viewer"):
    tenant_member_add(acting_user=users["owner"], tenant=tenant, username="acme-" + role, role=role)
"""

NEW_FUNCTION = """
from tenancy.models import Tenant
from django.contrib.auth import get_user_model
from functions.services import function_create
function_create(acting_user=get_user_model().objects.get(username="acme-developer"),
                tenant=Tenant.objects.get(slug="acme"), name="{name}", starter="hello")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_database(url: str):
    """A fresh database next to the one DATABASE_URL names; returns (its URL, a function that drops it)."""
    import psycopg

    name = f"nimbus_ide_browser_{os.getpid()}_{secrets.token_hex(3)}"
    parts = urlsplit(url)
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlunsplit(parts._replace(path="/" + name)), drop


class Portal:
    """The portal's database plus the daphne processes serving it."""

    def __init__(self, env: dict, workdir: Path):
        self.env = env
        self.workdir = workdir
        self.servers: list[subprocess.Popen] = []
        self.logs = []
        self.url = ""

    def manage(self, *args, code: str | None = None):
        command = [sys.executable, "manage.py", *args]
        if code is not None:
            command += ["-c", code]
        subprocess.run(command, cwd=ROOT, env=self.env, check=True, capture_output=True, timeout=120)

    def new_function(self, name: str, base: str | None = None) -> str:
        self.manage("shell", code=NEW_FUNCTION.format(name=name))
        return f"{base or self.url}/ide/acme/{name}/"

    def start_server(self) -> str:
        """One more daphne process on the same database (and channel layer); returns its base URL."""
        port, index = free_port(), len(self.servers)
        data = self.workdir / f"p{index}"
        env = {**self.env, "NIMBUS_DATA_DIR": str(data), "NIMBUS_SOCKET_DIR": str(data / "s"),
               "NIMBUS_PUBLIC_URL": f"http://127.0.0.1:{port}"}
        log_path = self.workdir / f"daphne-{index}.log"
        log = open(log_path, "wb")
        self.logs.append(log)
        # A session of its own so the engine's instances (its children) stop with it.
        server = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                   "portal.asgi:application"], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append(server)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2):
                    return url
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("daphne did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.2)

    def stop(self):
        for server in self.servers:
            try:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(server.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                server.wait(timeout=5)
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def portal():
    if not (ROOT / "static" / "vendor" / "monaco" / "vs" / "loader.js").exists():
        subprocess.run([sys.executable, "manage.py", "nimbus_assets"], cwd=ROOT, check=True, timeout=300,
                       env={**os.environ, "DEBUG": "1"})
    workdir = Path(tempfile.mkdtemp(prefix="nide-"))  # short: unix socket paths are limited to 108 bytes
    workdir.chmod(0o711)  # the tenants' sandbox uids reach their code through it
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "NIMBUS_TESTING": "1",
           # DEBUG serves static files through the finders (no collectstatic of Monaco's 14 MiB per run).
           "DEBUG": "1", "NIMBUS_DATA_DIR": str(workdir), "NIMBUS_REDIS_PREFIX": f"nide-{secrets.token_hex(4)}",
           "PYTHONUNBUFFERED": "1"}
    drop = None
    if os.environ.get("DATABASE_URL"):
        env["DATABASE_URL"], drop = postgres_database(os.environ["DATABASE_URL"])
    else:
        env["SQLITE_PATH"] = str(workdir / "portal.sqlite3")
    portal = Portal(env, workdir)
    try:
        portal.manage("migrate", "--noinput")
        portal.manage("shell", code=SEED)
        portal.url = portal.start_server()
        yield portal
    finally:
        portal.stop()
        if drop is not None:
            drop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"])
        yield chromium
        chromium.close()


@pytest.fixture
def login(browser, portal):
    contexts = []

    def _login(username: str, ide_url: str):
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        contexts.append(context)
        page = context.new_page()
        # Shown by pytest when a test fails: what the page logged and said over the socket.
        page.on("console", lambda message: print(f"[{username} console] {message.type}: {message.text}"))
        page.on("websocket", lambda ws: (
            ws.on("framesent", lambda frame: print(f"[{username} ->] {str(frame)[:300]}")),
            ws.on("framereceived", lambda frame: print(f"[{username} <-] {str(frame)[:300]}"))))
        parts = urlsplit(ide_url)
        page.goto(f"{parts.scheme}://{parts.netloc}/login/?next={parts.path}")
        page.fill("#id_username", username)
        page.fill("#id_password", "pw-" + username)
        page.click("button[type=submit]")
        page.wait_for_url(ide_url)
        # Monaco loaded, the socket open and the draft received.
        page.wait_for_function("window.nimbusIde && window.nimbusIde.state.version !== null", timeout=30000)
        expect(page.locator("#ide-connection")).to_have_text("Connected")
        return page

    yield _login
    for context in contexts:
        context.close()


def editor_value(page) -> str:
    return page.evaluate("window.nimbusIde.editor.getValue()")


def type_into_editor(page, text: str, replace: bool = True):
    page.click("#ide-editor .view-lines")
    if replace:
        page.keyboard.press("Control+A")
        page.keyboard.press("Delete")
    page.keyboard.type(text)


NEW_HANDLER = ('def handle(event, context):\ncontext.logger.warning("answering %s", event.query.get("name"))\n'
               'return {"answer": "v2 from the browser"}')
EXPECTED_HANDLER = ('def handle(event, context):\n    context.logger.warning("answering %s", event.query.get("name"))\n'
                    '    return {"answer": "v2 from the browser"}')


@pytest.mark.skipif(not HAVE_LOCAL_ENGINE, reason="deploy and invoke need the local engine "
                                                   "(functions.engines.local.engine is not importable)")
def test_edit_save_deploy_and_call_the_new_code(portal, login, capsys):
    page = login("acme-developer", portal.new_function("browser-deploy"))
    expect(page.locator("#ide-tabs .nav-link.active")).to_contain_text("handler.py")
    type_into_editor(page, NEW_HANDLER)
    assert editor_value(page) == EXPECTED_HANDLER
    expect(page.locator("#ide-tabs .nav-link.active")).to_have_class("nav-link active dirty")
    page.keyboard.press("Control+s")
    expect(page.locator("#ide-version")).to_have_text("2")
    expect(page.locator("#ide-tabs .nav-link.active")).to_have_class("nav-link active")

    clicked = time.monotonic()
    page.click("#ide-deploy")
    expect(page.locator("#deploy-summary")).to_contain_text("Revision 1 is ready", timeout=90000)
    steps = page.locator("#deploy-steps li strong").all_inner_texts()
    assert steps[0] == "frozen" and steps[-1] == "done"
    page.screenshot(path=str(SHOTS / "deploy-progress.png"))

    page.click("#tab-test")
    page.fill("#test-query", "name=Ada")
    page.click("#test-send")
    expect(page.locator("#test-body-out")).to_contain_text("v2 from the browser", timeout=30000)
    answered = time.monotonic()
    expect(page.locator("#test-status")).to_contain_text("200")
    page.screenshot(path=str(SHOTS / "test-panel.png"))
    with capsys.disabled():
        print(f"\n[webide] Deploy click to first successful test call: {answered - clicked:.2f} s")

    # The invocation id opens that invocation's record and logs.
    page.click("#test-invocation")
    expect(page.locator("#test-invocation-lines")).to_contain_text("status success", timeout=15000)
    # Log lines land in the batch after their record: the panel keeps looking until they are in.
    expect(page.locator("#test-invocation-lines")).to_contain_text("answering Ada", timeout=15000)
    expect(page.locator("#ide-error")).to_be_hidden()
    # ... and its trace: the link opens the trace page with the call's spans.
    trace = page.locator("#test-trace")
    expect(trace).to_be_visible()
    with page.context.expect_page() as opened:
        trace.click()
    trace_page = opened.value
    trace_page.wait_for_load_state()
    expect(trace_page.locator("body")).to_contain_text("handler")
    expect(trace_page.locator("body")).to_contain_text("browser-deploy")
    trace_page.close()

    # The live log tail shows the handler's line; the level filter keeps it (WARNING >= WARNING).
    page.click("#tab-logs")
    page.select_option("#logs-level", "WARNING")
    expect(page.locator("#logs-lines")).to_contain_text("answering Ada", timeout=15000)
    page.screenshot(path=str(SHOTS / "logs.png"))

    # The revisions panel lists the deploy with its author; its diff against the draft opens.
    page.click("#tab-revisions")
    expect(page.locator("#revisions-body tr").first).to_contain_text("acme-developer")
    page.locator("#revisions-body tr").first.get_by_role("button", name="vs draft").click()
    expect(page.locator("#ide-diff")).to_be_visible()
    expect(page.locator("#diff-title")).to_contain_text("revision 1 → draft: handler.py")
    page.click("#diff-close")
    expect(page.locator("#ide-diff")).to_be_hidden()


def test_a_stale_save_shows_the_conflict_and_lets_me_overwrite(portal, login):
    url = portal.new_function("browser-conflict")
    mine = login("acme-developer", url)
    theirs = login("acme-admin", url)
    expect(mine.locator("#ide-presence")).to_contain_text("acme-admin")
    expect(theirs.locator("#ide-presence")).to_contain_text("acme-developer")

    type_into_editor(mine, "# mine\n", replace=False)
    type_into_editor(theirs, "# theirs\n", replace=False)
    theirs.keyboard.press("Control+s")
    expect(theirs.locator("#ide-version")).to_have_text("2")
    expect(mine.locator("#ide-notice")).to_contain_text("acme-admin saved handler.py")

    mine.keyboard.press("Control+s")
    expect(mine.locator("#ide-diff")).to_be_visible()
    expect(mine.locator("#diff-title")).to_contain_text("Conflict in handler.py")
    their_text = mine.evaluate("window.nimbusIde.diffEditor.getOriginalEditor().getValue()")
    my_text = mine.evaluate("window.nimbusIde.diffEditor.getModifiedEditor().getValue()")
    assert "# theirs" in their_text and "# mine" not in their_text
    assert "# mine" in my_text and "# theirs" not in my_text
    mine.screenshot(path=str(SHOTS / "conflict-diff.png"))

    mine.click("#conflict-mine")
    expect(mine.locator("#ide-diff")).to_be_hidden()
    expect(mine.locator("#ide-version")).to_have_text("3")
    # The other editor had nothing unsaved, so it follows the save it was told about.
    expect(theirs.locator("#ide-version")).to_have_text("3")
    theirs.wait_for_function("window.nimbusIde.editor.getValue().includes('# mine')")


def test_viewer_gets_a_read_only_editor(portal, login):
    page = login("acme-viewer", portal.new_function("browser-viewer"))
    expect(page.locator("#ide-readonly")).to_be_visible()
    expect(page.locator("#ide-deploy")).to_be_disabled()
    expect(page.locator("#file-new")).to_be_hidden()
    before = editor_value(page)
    type_into_editor(page, "# not allowed\n", replace=False)
    assert editor_value(page) == before


ADD_TRIGGERS = """
from django.contrib.auth import get_user_model
from functions.models import Function
from functions.services_triggers import trigger_create, trigger_update
user = get_user_model().objects.get(username="acme-developer")
function = Function.objects.get(tenant__slug="acme", name="{name}")
trigger_create(acting_user=user, function=function, name="nightly", kind="cron", schedule="0 3 * * *",
               time_zone="Europe/Paris")
orders = trigger_create(acting_user=user, function=function, name="orders", kind="event",
                        filters=[{{"attribute": "type", "value": "com.example.order.", "match": "prefix"}}])
trigger_update(acting_user=user, trigger=orders, enabled=False)
"""


def test_the_triggers_tab_lists_what_starts_the_function(portal, login):
    url = portal.new_function("browser-triggers")
    page = login("acme-viewer", url)
    page.click("#tab-triggers")
    expect(page.locator("#triggers-body")).to_contain_text("No cron or event triggers.")
    expect(page.locator("#triggers-http")).to_have_text("/fn/acme/browser-triggers/")
    portal.manage("shell", code=ADD_TRIGGERS.format(name="browser-triggers"))
    page.reload()
    page.wait_for_function("window.nimbusIde && window.nimbusIde.state.version !== null", timeout=30000)
    page.click("#tab-triggers")
    rows = page.locator("#triggers-body tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("nightly")
    expect(rows.nth(0)).to_contain_text("0 3 * * * (Europe/Paris)")
    expect(rows.nth(0).locator(".badge")).to_have_text("on")
    expect(rows.nth(1)).to_contain_text("orders")
    expect(rows.nth(1)).to_contain_text("CloudEvent")
    expect(rows.nth(1)).to_contain_text("type starts with com.example.order.")
    expect(rows.nth(1).locator(".badge")).to_have_text("off")
    expect(page.locator("#panel-triggers a")).to_have_attribute("href", "/t/acme/f/browser-triggers/triggers/")


def test_syntax_errors_become_markers_and_theme_is_remembered(portal, login):
    page = login("acme-developer", portal.new_function("browser-markers"))
    type_into_editor(page, "def handle(event, context):\nreturn 1 +")
    expect(page.locator("#ide-problems li.text-danger")).to_contain_text("handler.py:", timeout=10000)
    page.keyboard.press("Control+Shift+D")  # the deploy shortcut: saves, then the deploy is refused
    expect(page.locator("#deploy-summary")).to_contain_text("Deploy refused", timeout=15000)
    page.select_option("#ide-theme", "vs-dark")
    page.reload()
    page.wait_for_function("window.nimbusIde && window.nimbusIde.state.version !== null", timeout=30000)
    assert page.input_value("#ide-theme") == "vs-dark"
    assert page.locator(".monaco-editor.vs-dark").count() > 0


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="presence across processes needs the Redis channel layer "
                                                            "(set REDIS_URL)")
@pytest.mark.skipif(not HAVE_LOCAL_ENGINE, reason="deploy needs the local engine")
def test_presence_saves_and_deploy_progress_cross_processes(portal, login):
    """Two daphne processes share Redis: each editor sees the other, their saves and their deploys."""
    other = portal.start_server()
    here = login("acme-developer", portal.new_function("browser-processes"))
    there = login("acme-admin", f"{other}/ide/acme/browser-processes/")
    expect(here.locator("#ide-presence")).to_contain_text("acme-admin")
    expect(there.locator("#ide-presence")).to_contain_text("acme-developer")

    type_into_editor(there, "# from the other process\n", replace=False)
    there.keyboard.press("Control+s")
    expect(here.locator("#ide-notice")).to_contain_text("acme-admin saved handler.py")
    expect(here.locator("#ide-version")).to_have_text("2")

    there.click("#ide-deploy")
    expect(here.locator("#deploy-summary")).to_contain_text("Revision 1: done ok", timeout=90000)
    there.close()
    expect(here.locator("#ide-presence")).not_to_contain_text("acme-admin")
