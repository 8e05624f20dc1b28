"""Fixtures for event-driven functions: the real local engine (from the engine tests), a worker
thread draining the queue, and a few handlers that echo, fail, or record what they got."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import OperationalError

from tests.engines.local.conftest import (  # noqa: F401 - fixtures reused as they are
    _stop_engines,
    deploy,
    engine,
    gateway,
    make_engine,
    wait_for,
)

ECHO = '''
import json

def handle(event, context):
    return {"cloudevent": event.cloudevent, "body": event.text, "path": event.path,
            "trigger": event.headers.get("x-nimbus-trigger"), "method": event.method}
'''

FAILING = '''
def handle(event, context):
    raise RuntimeError("always fails")
'''

# Fails the first two calls an instance gets, then succeeds (one warm instance keeps the count).
FLAKY = '''
calls = 0

def handle(event, context):
    global calls
    calls += 1
    if calls <= 2:
        raise RuntimeError(f"failure {calls}")
    return {"calls": calls, "delivery": event.headers.get("x-nimbus-delivery-id"),
            "attempt": event.headers.get("x-nimbus-attempt")}
'''

DOUBLE = '''
def handle(event, context):
    return {"n": event.json()["n"] * 2}
'''

INCREMENT = '''
def handle(event, context):
    return {"n": event.json()["n"] + 1}
'''


@pytest.fixture(autouse=True)
def _shared_cache_reads_do_not_lock():
    """The SQLite test database is in memory with a shared cache, where a reader meets a table lock
    as an immediate "database table is locked" instead of waiting (a file database waits). Let this
    test's connections read without table locks while worker threads write."""
    from django.db.backends.signals import connection_created

    def relax(sender, connection, **kwargs):
        if connection.vendor == "sqlite":
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA read_uncommitted = 1")

    connection_created.connect(relax, weak=False, dispatch_uid="events-read-uncommitted")
    from django.db import connections

    for conn in connections.all():
        if conn.vendor == "sqlite" and conn.connection is not None:
            conn.connection.execute("PRAGMA read_uncommitted = 1")
    yield
    connection_created.disconnect(dispatch_uid="events-read-uncommitted")


def handler(source: str) -> dict:
    return {"handler.py": source}


@pytest.fixture
def start_worker():
    """start_worker(**options) → a running Worker; every one is stopped after the test."""
    from functions.triggers.worker import Worker

    workers = []

    def start(**options):
        options.setdefault("poll_seconds", 0.05)
        options.setdefault("lease_seconds", 5.0)
        worker = Worker(**options).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def settled(*delivery_ids, timeout=30.0):
    """Wait until the deliveries reach a final state; returns them."""
    from functions.models import Delivery

    final = (Delivery.State.SUCCEEDED, Delivery.State.DEAD, Delivery.State.DISCARDED)

    def check():
        try:
            rows = list(Delivery.objects.filter(pk__in=delivery_ids))
        except OperationalError:  # a worker thread holds the table for a moment; look again
            return None
        return rows if len(rows) == len(delivery_ids) and all(r.state in final for r in rows) else None

    rows = wait_for(check, timeout=timeout)
    assert rows, list(Delivery.objects.filter(pk__in=delivery_ids).values("state", "attempts", "last_error"))
    order = {str(pk): i for i, pk in enumerate(delivery_ids)}
    return sorted(rows, key=lambda r: order[str(r.pk)])


class _Recorder(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True

    def do_POST(self):  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        self.server.received.append((dict(self.headers), self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def callback_server():
    """A local HTTP server recording the callbacks it receives (``.received``, ``.url``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.received = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/done"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
