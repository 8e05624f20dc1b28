"""Async delivery queue: throughput (items/s from a full queue to settled, through real function
instances) and delivery delay p50/p99 (stored → invocation started, and → settled) at a steady rate.

    .venv/bin/python -m bench.async_queue                      # SQLite (temporary)
    .venv/bin/python -m bench.async_queue --postgres postgres://postgres@127.0.0.1:5432/nimbus_bench_events

The PostgreSQL database named in the URL is dropped and created afresh.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ECHO = "def handle(event, context):\n    return {'n': event.json()['n']}\n"


def setup(postgres: str | None):
    sys.path.insert(0, str(ROOT))
    os.environ.pop("REDIS_URL", None)
    os.environ.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "LOG_LEVEL": "WARNING",
                       "NIMBUS_DATA_DIR": tempfile.mkdtemp(prefix="nimbus-bench-"), "NIMBUS_DEPLOY_INLINE": "1"})
    if postgres:
        import psycopg

        base, _, name = postgres.rpartition("/")
        with psycopg.connect(base + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        os.environ["DATABASE_URL"] = postgres
    else:
        os.environ.pop("DATABASE_URL", None)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    from django.contrib.auth import get_user_model

    from tenancy.services import tenant_create

    user = get_user_model().objects.create_user("bench", password="pw-bench-123456")
    return user, tenant_create(acting_user=user, slug="bench", name="Bench")


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def wait_settled(ids, timeout=300):
    from functions.models import Delivery

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Delivery.objects.filter(pk__in=ids, state__in=["succeeded", "dead"]).count() == len(ids):
            return True
        time.sleep(0.05)
    return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres", default=None)
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=20.0, help="items/s for the delay run")
    parser.add_argument("--delay-items", type=int, default=200)
    args = parser.parse_args()
    user, tenant = setup(args.postgres)

    from django.db import connection, transaction

    from functions.engines import set_engine
    from functions.engines.local.engine import LocalEngine
    from functions.models import Delivery, Invocation
    from functions.services import function_create, function_deploy
    from functions.services_triggers import async_invocation_accept
    from functions.triggers import queue, worker as worker_module
    from functions.triggers.worker import Worker

    engine = LocalEngine(idle_seconds=600)
    set_engine(engine)
    function = function_create(acting_user=user, tenant=tenant, name="echo", files={"handler.py": ECHO},
                               max_instances=args.concurrency, concurrency=1, min_instances=1)
    revision = function_deploy(acting_user=user, function=function)
    revision.refresh_from_db()
    assert revision.status == "ready", revision.status_message
    database = connection.vendor

    # Warm the instances: one round through the queue.
    with transaction.atomic():
        warm = [queue.enqueue(function=function, source="async", body=b'{"n": 0}').pk for _ in range(args.concurrency)]
    workers = [Worker(worker_id=f"bench-{i}", concurrency=args.concurrency, poll_seconds=0.05).start()
               for i in range(args.workers)]
    assert wait_settled(warm)

    # Throughput: a full queue drained by the workers.
    for w in workers:
        w.stop()
    with transaction.atomic():
        ids = [queue.enqueue(function=function, source="async", body=f'{{"n": {i}}}'.encode()).pk
               for i in range(args.items)]
    started = time.monotonic()
    workers = [Worker(worker_id=f"bench-t{i}", concurrency=args.concurrency, poll_seconds=0.05).start()
               for i in range(args.workers)]
    assert wait_settled(ids)
    elapsed = time.monotonic() - started
    rows = Delivery.objects.filter(pk__in=ids)
    attempts = sum(rows.values_list("attempts", flat=True))
    engine.records.flush()
    throughput = args.items / elapsed

    # Delay: items arriving at a steady rate while the workers idle; the first worker is this
    # process's "in-process" worker, so a stored item wakes it as the portal's would.
    worker_module._in_process = workers[0]
    delay_ids = []
    interval = 1.0 / args.rate
    next_at = time.monotonic()
    for i in range(args.delay_items):
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
        delay_ids.append(async_invocation_accept(function_id=function.pk, method="POST", path="/", headers=[
            ("content-type", "application/json")], body=f'{{"n": {i}}}'.encode()).pk)
    assert wait_settled(delay_ids)
    engine.records.flush()
    time.sleep(0.5)
    engine.records.flush()
    deliveries = {d.pk: d for d in Delivery.objects.filter(pk__in=delay_ids)}
    started_at = dict(Invocation.objects.filter(pk__in=[d.invocation_id for d in deliveries.values()])
                      .values_list("id", "started_at"))
    to_start = [(started_at[d.invocation_id] - d.created_at).total_seconds() * 1000
                for d in deliveries.values() if d.invocation_id in started_at]
    to_done = [(d.finished_at - d.created_at).total_seconds() * 1000 for d in deliveries.values()]
    for w in workers:
        w.stop()
    engine.shutdown()
    print(f"database: {database}  workers: {args.workers} × concurrency {args.concurrency}  "
          f"instances: {args.concurrency}")
    print(f"throughput: {args.items} items in {elapsed:.2f} s = {throughput:.0f} items/s "
          f"({attempts} attempts; {args.items - attempts if attempts < args.items else 0} lost)")
    print(f"delay at {args.rate:g} items/s over {len(to_done)} items: stored→invocation start "
          f"p50 {statistics.median(to_start):.1f} ms p99 {percentile(to_start, 0.99):.1f} ms; "
          f"stored→settled p50 {statistics.median(to_done):.1f} ms p99 {percentile(to_done, 0.99):.1f} ms")


if __name__ == "__main__":
    main()
