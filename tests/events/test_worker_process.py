"""``manage.py nimbus_worker`` as a separate process on the same database as the test: it
delivers, stops gracefully in the middle of a queue (SIGTERM), and another worker finishes the
rest with nothing lost and nothing delivered twice."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

from functions.models import Delivery, Invocation
from functions.triggers import queue
from tests.events.conftest import handler, settled, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SLOW_ECHO = '''
import time

def handle(event, context):
    time.sleep(0.2)
    return {"n": event.json()["n"]}
'''


def database_env() -> dict:
    """The test database, for another process: PostgreSQL's URL, or SQLite's file (tests/settings.py
    keeps the SQLite test database in a file for this)."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return {"SQLITE_PATH": s["NAME"]}
    return {"DATABASE_URL": f"postgres://{s['USER']}:{s.get('PASSWORD') or ''}@{s['HOST'] or '127.0.0.1'}:"
                            f"{s['PORT'] or 5432}/{s['NAME']}"}


def test_a_separate_worker_process_stops_gracefully_mid_queue(engine, deploy, start_worker, shared_tmp):
    function, _ = deploy("slow", handler(SLOW_ECHO), max_instances=2)
    ids = [queue.enqueue(function=function, source="async", body=f'{{"n": {i}}}'.encode()).pk for i in range(16)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("NIMBUS_TESTING", "DJANGO_SETTINGS_MODULE", "DATABASE_URL", "SQLITE_PATH")}
    env.update({**database_env(), "DEBUG": "1", "NIMBUS_DATA_DIR": str(shared_tmp),
                "DJANGO_SETTINGS_MODULE": "portal.settings", "NIMBUS_WORKER": "external"})
    process = subprocess.Popen([sys.executable, "manage.py", "nimbus_worker", "--concurrency", "2", "--poll", "0.05",
                                "--lease", "5", "--id", "process-worker", "--no-cron"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: Delivery.objects.filter(pk__in=ids, state="succeeded").count() >= 4, timeout=60)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "stopped after" in output
    by_process = Delivery.objects.filter(pk__in=ids, leased_by="process-worker", state="succeeded").count()
    assert 4 <= by_process < len(ids)
    start_worker(worker_id="in-process")
    rows = settled(*ids)
    assert all(r.state == "succeeded" and r.attempts == 1 for r in rows)
    assert {r.leased_by for r in rows} == {"process-worker", "in-process"}
    engine.records.flush()
    # The process wrote its own invocation records before exiting: one per delivery, none twice.
    assert wait_for(lambda: Invocation.objects.filter(function=function, trigger="async").count() == len(ids),
                    timeout=10)
