"""A real portal (daphne, the local engine, the in-process delivery worker) on the test database,
serving synchronous and async calls: it stops cleanly on SIGTERM or SIGINT (exit code 0, no
traceback, well before a kill deadline), and a kill -9 never leaves a delivery naming an invocation
record that was only in memory."""

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from functions.models import Delivery, Invocation
from tests.events.conftest import handler, wait_for
from tests.events.test_worker_process import database_env
from tests.observability.test_prometheus_scrape import free_port, wait_for_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ECHO = "def handle(event, context):\n    return {'name': event.query.get('name', '')}\n"
STOP_DEADLINE = 10.0  # a kill deadline, far above the ~1 s a portal takes (bench/shutdown.py prints it)


def start_portal(data_dir: Path, port: int, log):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NIMBUS_TESTING", "DJANGO_SETTINGS_MODULE", "DATABASE_URL", "SQLITE_PATH", "REDIS_URL")}
    env.update({**database_env(), "DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1",
                "NIMBUS_DATA_DIR": str(data_dir), "NIMBUS_SOCKET_DIR": str(data_dir / "sockets"),
                "ALLOWED_HOSTS": "127.0.0.1", "NIMBUS_WORKER": "inprocess"})
    daphne = Path(sys.executable).parent / "daphne"
    process = subprocess.Popen([str(daphne), "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
                               env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port(port, process, time.monotonic() + 60)
    return process


class Traffic:
    """Threads calling the function, every other call async (``Prefer: respond-async``)."""

    def __init__(self, port: int, threads: int = 4):
        self.url = f"http://127.0.0.1:{port}/fn/acme/echo/"
        self.stopping = threading.Event()
        self.answers: list[int] = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def run(self, index: int) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            headers = {"Prefer": "respond-async"} if n % 2 else {}
            request = urllib.request.Request(f"{self.url}?name=t{index}-{n}", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    self.answers.append(response.status)
            except urllib.error.HTTPError as exc:
                self.answers.append(exc.code)
            except OSError:
                self.answers.append(0)  # the portal is gone (the kill -9 test)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.fixture
def portal_dir(shared_tmp):
    return shared_tmp


@pytest.fixture
def echo(engine, deploy):
    function, _ = deploy("echo", handler(ECHO), max_instances=3)
    return function


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_portal_stops_cleanly_after_traffic(echo, portal_dir, signum):
    log_path = portal_dir / "portal.log"
    port = free_port()
    with open(log_path, "wb") as log:
        portal = start_portal(portal_dir, port, log)
        try:
            traffic = Traffic(port)
            # Enough for the worker to be busy: deliveries in flight and queued when the signal comes.
            assert wait_for(lambda: Delivery.objects.filter(function=echo, state="succeeded").count() >= 50,
                            timeout=60)
            time.sleep(2)
            traffic.stop()
            signalled = time.monotonic()
            portal.send_signal(signum)
            code = portal.wait(timeout=STOP_DEADLINE)
            stopped_in = time.monotonic() - signalled
        finally:
            if portal.poll() is None:
                os.killpg(portal.pid, signal.SIGKILL)
                portal.wait()
    output = log_path.read_text(errors="replace")
    assert code == 0, output[-5000:]
    assert "Traceback" not in output, output[-5000:]
    assert "cannot schedule new futures" not in output
    assert stopped_in < STOP_DEADLINE
    assert traffic.answers.count(200) > 0 and traffic.answers.count(202) > 0
    # Nothing the worker held is stuck: what it did not finish is due again at once, not a lease later.
    stuck = Delivery.objects.filter(function=echo, state="running", lease_until__gt=time_now())
    assert not stuck.exists()


def time_now():
    from django.utils import timezone

    return timezone.now()


def test_a_kill_9_never_loses_a_record_a_delivery_names(echo, portal_dir):
    log_path = portal_dir / "portal.log"
    port = free_port()
    with open(log_path, "wb") as log:
        portal = start_portal(portal_dir, port, log)
        try:
            traffic = Traffic(port, threads=6)
            assert wait_for(lambda: Delivery.objects.filter(function=echo, state="succeeded").count() >= 200,
                            timeout=90)
            # In the middle of the traffic: deliveries being settled, records being batched.
            os.killpg(portal.pid, signal.SIGKILL)
            portal.wait(timeout=30)
        finally:
            if portal.poll() is None:
                os.killpg(portal.pid, signal.SIGKILL)
                portal.wait()
            traffic.stop()
    named = set(Delivery.objects.filter(function=echo, state__in=["succeeded", "dead", "pending"])
                .exclude(invocation_id=None).values_list("invocation_id", flat=True))
    assert len(named) >= 200
    stored = set(Invocation.objects.filter(pk__in=named).values_list("pk", flat=True))
    assert named - stored == set()
