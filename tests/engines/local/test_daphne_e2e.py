"""End to end through a real daphne process: a function deployed by another process (as
``manage.py nimbus_demo`` does) answers at its gateway URL, is recorded with its logs, and the
portal leaves no instance processes behind when it stops."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

SETUP = """
from django.contrib.auth import get_user_model
from functions.services import function_create, function_deploy
from tenancy.services import tenant_create

user = get_user_model().objects.create_user("e2e", password="pw-e2e-123456")
tenant = tenant_create(acting_user=user, slug="acme", name="Acme")
function = function_create(acting_user=user, tenant=tenant, name="hello", starter="hello")
revision = function_deploy(acting_user=user, function=function)
revision.refresh_from_db()
print("STATUS", revision.status, revision.status_message)
"""

CHECK = """
from functions.models import Invocation
record = Invocation.objects.get(pk="{invocation_id}")
print("RECORD", record.status, record.cold_start, "|".join(record.logs.values_list("message", flat=True)))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if text in cmdline or cwd.startswith(text):
            found.append((pid, cmdline))
    return found


@pytest.mark.slow
def test_daphne_serves_a_function_deployed_by_another_process(shared_tmp):
    tmp_path = shared_tmp  # the tenants' sandbox uids must reach the data folder
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SQLITE_PATH", "REDIS_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "NIMBUS_DATA_DIR": str(tmp_path),
                "NIMBUS_DEPLOY_INLINE": "1", "NIMBUS_SOCKET_DIR": str(tmp_path / "s"),
                "NIMBUS_LOCAL_IDLE_SECONDS": "60"})
    manage = [sys.executable, str(ROOT / "manage.py")]

    def run(*args):
        result = subprocess.run(manage + list(args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    run("migrate", "--noinput")
    assert "STATUS ready" in run("shell", "-c", SETUP)

    port = free_port()
    daphne = subprocess.Popen([str(Path(sys.executable).parent / "daphne"), "-b", "127.0.0.1", "-p", str(port),
                               "portal.asgi:application"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert daphne.poll() is None, daphne.stdout.read().decode()
                assert time.monotonic() < deadline, "daphne did not start"
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fn/acme/hello/?name=E2E", timeout=60) as response:
            body = response.read().decode()
            headers = dict(response.headers)
        assert body == "Hello, E2E!\n"
        assert headers["X-Nimbus-Cold-Start"] == "yes"
        invocation_id = headers["X-Nimbus-Invocation-Id"]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/fn/acme/missing/", timeout=30)
            raise AssertionError("expected a 404")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
            assert json.loads(exc.read())["code"] == "not_found"
        deadline = time.monotonic() + 20
        while True:
            output = subprocess.run(manage + ["shell", "-c", CHECK.format(invocation_id=invocation_id)], env=env,
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
            if "RECORD" in output.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "RECORD success True" in output.stdout, output.stdout + output.stderr
        assert "saying hello to E2E" in output.stdout
        assert processes_mentioning(str(tmp_path / "revisions"))  # the revision's runtime is running
    finally:
        os.killpg(daphne.pid, signal.SIGTERM)
        try:
            daphne.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(daphne.pid, signal.SIGKILL)
            daphne.wait()
    # The portal stopped: its fork servers and instances went with it.
    deadline = time.monotonic() + 10
    while processes_mentioning(str(tmp_path / "revisions")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(tmp_path / "revisions")) == []
