"""Threads outside requests give their pooled connections back: the delivery worker's database thread
after every call, a deploy thread before the engine's long part and when it ends. A connection kept
by a thread that idles (or builds for minutes) is one less for the requests (tests/portal/test_db_pool.py)."""

import threading

import psycopg_pool
import pytest
from django.db import connection, connections

from functions.triggers import queue
from tests.engines.local.conftest import (  # noqa: F401 - fixtures reused as they are
    _stop_engines,
    deploy,
    engine,
    make_engine,
    needs_bwrap,
    wait_for,
)
from tests.events.conftest import ECHO, handler, settled, start_worker  # noqa: F401 - fixture reused

pytestmark = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="the connection pool is PostgreSQL's (psycopg_pool); SQLite has no pool to give back to "
           "(CI runs PostgreSQL)")

POOL_SIZE = 3


@pytest.fixture
def small_pool(transactional_db) -> psycopg_pool.ConnectionPool:
    """The default database's pool replaced by one of POOL_SIZE connections (as test_db_pool's
    ``tiny_pool``, without the holding): few enough that one kept by a thread shows."""
    saved = connection.settings_dict["OPTIONS"].get("pool")
    connection.close()
    connection.close_pool()
    connection.settings_dict["OPTIONS"]["pool"] = {"min_size": 1, "max_size": POOL_SIZE, "timeout": 10}
    yield connection.pool
    connection.close()
    connection.close_pool()
    connection.settings_dict["OPTIONS"]["pool"] = saved


def held_by_this_thread() -> bool:
    return connections["default"].connection is not None


def all_back(pool) -> bool:
    """Every connection the pool has made is in it again (none lent to a thread)."""
    stats = pool.get_stats()
    return stats["pool_available"] == stats["pool_size"]


@needs_bwrap
def test_the_worker_gives_its_connection_back_after_every_call(small_pool, engine, deploy, start_worker):
    function, _ = deploy("echo", handler(ECHO))
    ids = [queue.enqueue(function=function, source="async", body=b"{}").pk for _ in range(3)]
    worker = start_worker(cron_enabled=False)
    rows = settled(*ids)
    assert all(row.state == "succeeded" for row in rows)
    assert worker.processed == 3
    # Between two calls (its one thread runs this after the call in progress), the worker's database
    # thread holds none, though the worker keeps running and polling.
    assert worker.db.submit(held_by_this_thread).result(timeout=30) is False
    connection.close()  # the test's own, as a request's end does
    assert wait_for(lambda: all_back(small_pool))
    assert worker.thread.is_alive()


def test_a_deploy_thread_holds_no_connection_while_the_engine_builds_nor_when_it_ends(
        small_pool, members, function, monkeypatch):
    from functions import services

    seen = {}
    ended = threading.Event()

    class Building:
        """An engine whose deploy looks at the thread's connection and the pool mid-build."""

        def ensure_tenant(self, tenant):
            seen["tenant"] = held_by_this_thread()

        def deploy(self, spec, *, traffic, progress):
            seen["build"] = held_by_this_thread()

    deploy_thread = services._deploy_thread

    def watched(*args):
        try:
            deploy_thread(*args)
        finally:
            seen["ended"] = held_by_this_thread()
            seen["thread"] = threading.current_thread().name
            ended.set()

    monkeypatch.setattr(services, "get_engine", Building)
    monkeypatch.setattr(services, "_deploy_thread", watched)
    revision = services.function_deploy(acting_user=members["developer"], function=function, inline=False)
    assert ended.wait(timeout=30)
    revision.refresh_from_db()
    assert revision.status == "ready", revision.status_message
    assert seen == {"tenant": False, "build": False, "ended": False, "thread": f"deploy-{revision.pk}"}
    connection.close()
    assert wait_for(lambda: all_back(small_pool))
