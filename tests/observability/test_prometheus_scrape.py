"""A real Prometheus (Debian's /usr/bin/prometheus) scrapes a running portal (daphne on loopback)
with the bearer token, and the function's request count comes back through its HTTP API."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = Path("/usr/bin/prometheus")
TOKEN = "scrape-token-for-the-test"

SETUP = """
from django.contrib.auth import get_user_model
from functions.services import function_create, function_deploy
from tenancy.services import tenant_create

user = get_user_model().objects.create_user("prom", password="pw-prom-123456")
tenant = tenant_create(acting_user=user, slug="acme", name="Acme")
function = function_create(acting_user=user, tenant=tenant, name="hello", starter="hello")
revision = function_deploy(acting_user=user, function=function)
revision.refresh_from_db()
print("STATUS", revision.status, revision.status_message)
"""

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PROMETHEUS.exists(), reason="Debian's prometheus is not installed "
                                                                  "(apt-get install prometheus; `make test` does)")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, process, deadline):
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            assert process.poll() is None, process.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.1)


def stop(process):
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_prometheus_reads_the_function_request_count(tmp_path, shared_tmp):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SQLITE_PATH", "REDIS_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "NIMBUS_DATA_DIR": str(shared_tmp),
                "NIMBUS_DEPLOY_INLINE": "1", "NIMBUS_SOCKET_DIR": str(tmp_path / "s"),
                "NIMBUS_METRICS_TOKEN": TOKEN})
    manage = [sys.executable, str(ROOT / "manage.py")]
    for args in (["migrate", "--noinput"], ["shell", "-c", SETUP]):
        result = subprocess.run(manage + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "STATUS ready" in result.stdout, result.stdout

    portal_port, prom_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "nimbus-portal", "metrics_path": "/metrics",
                            "authorization": {"type": "Bearer", "credentials": TOKEN},
                            "static_configs": [{"targets": [f"127.0.0.1:{portal_port}"]}]}]}))
    daphne = subprocess.Popen([str(Path(sys.executable).parent / "daphne"), "-b", "127.0.0.1", "-p", str(portal_port),
                               "portal.asgi:application"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    prometheus = None
    try:
        wait_for_port(portal_port, daphne, time.monotonic() + 60)
        # The token guards /metrics: without it, 401.
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{portal_port}/metrics", timeout=10)
            raise AssertionError("expected a 401")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        prometheus = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(prom_port, prometheus, time.monotonic() + 60)
        for name in ("Prometheus", "Grafana"):
            with urllib.request.urlopen(f"http://127.0.0.1:{portal_port}/fn/acme/hello/?name={name}",
                                        timeout=60) as response:
                assert response.status == 200
        query = urllib.parse.urlencode(
            {"query": 'sum(nimbus_function_invocations_total{tenant="acme", function="hello", status="success"})'})
        deadline = time.monotonic() + 60
        value = None
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/query?{query}", timeout=10) as response:
                answer = json.load(response)
            assert answer["status"] == "success"
            results = answer["data"]["result"]
            value = float(results[0]["value"][1]) if results else None
            if value == 2:
                break
            time.sleep(0.5)
        assert value == 2, f"Prometheus answered {value}"
        targets = urllib.parse.urlencode({"state": "active"})
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/targets?{targets}", timeout=10) as response:
            active = json.load(response)["data"]["activeTargets"]
        assert [t["health"] for t in active] == ["up"]
    finally:
        if prometheus is not None:
            stop(prometheus)
        stop(daphne)
