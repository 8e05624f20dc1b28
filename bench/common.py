"""Shared set-up for the benchmarks: a throw-away portal (temporary SQLite database and data
dir), a tenant with a developer, the local engine, and an in-process gateway client."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_portal():
    """Configure Django on a fresh temporary database; returns (developer, tenant)."""
    sys.path.insert(0, str(ROOT))
    data_dir = tempfile.mkdtemp(prefix="nimbus-bench-")
    os.chmod(data_dir, 0o711)  # the tenants' sandbox uids reach their code through it
    for name in ("DATABASE_URL", "SQLITE_PATH", "REDIS_URL"):
        os.environ.pop(name, None)
    os.environ.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "NIMBUS_DATA_DIR": data_dir,
                       "NIMBUS_DEPLOY_INLINE": "1", "LOG_LEVEL": "WARNING"})
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    from django.contrib.auth import get_user_model

    from tenancy.services import quota_update, tenant_create

    operator = get_user_model().objects.create_superuser("bench-operator", "op@example.com", "pw-bench-operator")
    user = get_user_model().objects.create_user("bench", password="pw-bench-123456")
    tenant = tenant_create(acting_user=user, slug="bench", name="Bench")
    quota_update(acting_user=operator, tenant=tenant, max_functions=1000, max_total_memory_mb=10_000_000,
                 max_instances_per_function=100)
    tenant.refresh_from_db()
    return user, tenant


def use_engine(**options):
    from functions.engines import set_engine
    from functions.engines.local.engine import LocalEngine

    engine = LocalEngine(**options)
    set_engine(engine)
    return engine


def create_and_deploy(user, tenant, name, files, **config):
    from functions.services import function_create, function_deploy

    function = function_create(acting_user=user, tenant=tenant, name=name, files=files, **config)
    revision = function_deploy(acting_user=user, function=function)
    revision.refresh_from_db()
    if revision.status != "ready":
        raise RuntimeError(f"deploy of {name} failed: {revision.status_message}")
    return function, revision


async def gateway_request(path: str, query: str = "", method: str = "GET", body: bytes = b""):
    """One request through the gateway's ASGI app in this process: (status, headers, body)."""
    from functions.engines.local.gateway import gateway_app

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "headers": [(b"host", b"bench")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    done = False
    start, chunks = {}, []

    async def receive():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()

    async def send(message):
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            chunks.append(message.get("body", b""))

    await gateway_app(scope, receive, send)
    return start["status"], dict((k.decode(), v.decode()) for k, v in start["headers"]), b"".join(chunks)


def percentile(values, p):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def summary(values) -> str:
    return (f"p50 {percentile(values, 50):7.2f} ms  p99 {percentile(values, 99):7.2f} ms  "
            f"mean {statistics.fmean(values):7.2f} ms  (n={len(values)})")


def timed_ms(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return (time.perf_counter() - started) * 1000, result
