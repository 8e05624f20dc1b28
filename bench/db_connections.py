"""Database connections under a burst: a real portal (daphne) on PostgreSQL takes concurrent API
reads and draft saves while the server's connections to its database are counted in
pg_stat_activity; the peak, the status counts and the throughput, with the connection pool
(NIMBUS_DB_POOL_MAX_SIZE, default 20) and without it (0: a connection per request thread), in the
same run on the same database.

    .venv/bin/python -m bench.db_connections --postgres postgres://postgres@127.0.0.1:55432/nimbus_bench_connections

The database named in the URL is dropped and created afresh. Without the pool the portal may take as
many connections as requests run at once: point it at a server of its own, not one that tests or
other portals share (its max_connections is what the baseline runs into).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parent.parent

SEED = """
from django.contrib.auth import get_user_model
from functions.services import function_create
from tenancy.services import tenant_create, token_create

user = get_user_model().objects.create_user("bench", password="pw-bench-123456")
tenant = tenant_create(acting_user=user, slug="bench", name="Bench")
for n in range({drafts}):
    function_create(acting_user=user, tenant=tenant, name=f"draft-{{n}}", starter="hello", max_instances=1)
print("TOKEN", token_create(acting_user=user, tenant=tenant, name="bench", scopes=["read", "write"])[1])
"""


def recreate(url: str) -> tuple[str, str]:
    """Drop and create the database ``url`` names: (the URL of its server's postgres database, its name)."""
    name = urlsplit(url).path.lstrip("/")
    admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin, name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code
    except OSError:
        return 0  # no HTTP answer at all (connection reset or refused)


class Sampler:
    """The clients' connections to one database (not the autovacuum workers that visit it), counted
    every few milliseconds from a connection to another database (so it never counts itself); keeps
    the peak."""

    def __init__(self, admin_url: str, database: str):
        self.admin_url, self.database = admin_url, database
        self.peak = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            while not self.stopping.is_set():
                count = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                                     " AND backend_type = 'client backend'",
                                     [self.database]).fetchone()[0]
                self.peak = max(self.peak, count)
                self.stopping.wait(0.005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(timeout=30)


class Portal:
    """daphne serving the portal on the bench database, with the pool settings given."""

    def __init__(self, env: dict, pool_max: int):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="nimbus-bench-daphne-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "portal.asgi:application"],
            cwd=ROOT, env={**env, "NIMBUS_DB_POOL_MAX_SIZE": str(pool_max)}, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while send(urllib.request.Request(self.base + "/healthz")) != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daphne did not start; see {self.log.name}")
            time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def burst(portal: Portal, token: str, requests: int, drafts: int, admin: str, database: str):
    """``requests`` requests at once, a third of them draft saves: (peak connections, statuses, seconds)."""
    auth = {"Authorization": f"Bearer {token}"}
    api = f"{portal.base}/api/v1/tenants/bench/functions/"
    saves = min(requests // 3, drafts)
    versions = []
    for n in range(saves):  # each save names the draft's current version (read before, not timed)
        with urllib.request.urlopen(urllib.request.Request(f"{api}draft-{n}/files/", headers=auth)) as response:
            versions.append(json.load(response)["version"])
    batch = [urllib.request.Request(f"{api}draft-{n}/files/handler.py", method="PUT",
                                    headers={**auth, "Content-Type": "application/json"},
                                    data=json.dumps({"content": f"def handle(event, context):\n    return {v}\n",
                                                     "base_version": v}).encode())
             for n, v in enumerate(versions)]
    batch += [urllib.request.Request(api, headers=auth) for _ in range(requests - saves)]
    start = threading.Barrier(len(batch) + 1)

    def fire(request):
        start.wait(timeout=60)
        return send(request)

    with Sampler(admin, database) as sampler, ThreadPoolExecutor(max_workers=len(batch)) as pool:
        answers = [pool.submit(fire, request) for request in batch]
        start.wait(timeout=60)
        began = time.perf_counter()
        statuses = [answer.result() for answer in answers]
        seconds = time.perf_counter() - began
    return sampler.peak, Counter(statuses), seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/nimbus_bench_connections")
    parser.add_argument("--requests", type=int, default=100, help="requests at once in each burst")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per configuration")
    parser.add_argument("--pool-max", type=int, default=20, help="the pooled portal's NIMBUS_DB_POOL_MAX_SIZE")
    args = parser.parse_args()
    admin, database = recreate(args.postgres)
    with psycopg.connect(admin) as conn:
        max_connections = conn.execute("SHOW max_connections").fetchone()[0]
    data_dir = tempfile.mkdtemp(prefix="nimbus-bench-")
    env = {k: v for k, v in os.environ.items() if k not in ("SQLITE_PATH", "REDIS_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "LOG_LEVEL": "ERROR",
                "NIMBUS_DATA_DIR": data_dir, "DATABASE_URL": args.postgres, "ALLOWED_HOSTS": "127.0.0.1"})
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run(manage + ["migrate", "--noinput"], env=env, cwd=ROOT, check=True, capture_output=True)
    drafts = args.requests // 3
    seeded = subprocess.run(manage + ["shell", "-c", SEED.format(drafts=drafts)], env=env, cwd=ROOT, check=True,
                            capture_output=True, text=True)
    token = seeded.stdout.split("TOKEN ", 1)[1].split()[0]

    print(f"{args.requests} concurrent requests (a third draft saves, the rest API reads), {args.rounds} bursts "
          f"each; PostgreSQL max_connections {max_connections}")
    for label, pool_max in ((f"pool (max {args.pool_max})", args.pool_max), ("no pool (baseline)", 0)):
        portal = Portal(env, pool_max)
        try:
            peaks, statuses, seconds = [], Counter(), 0.0
            for _ in range(args.rounds):
                peak, counts, took = burst(portal, token, args.requests, drafts, admin, database)
                peaks.append(peak)
                statuses.update(counts)
                seconds += took
        finally:
            portal.stop()
        shown = ", ".join(f"{code or 'no answer'}: {count}" for code, count in sorted(statuses.items()))
        print(f"  {label:<20} peak connections {max(peaks):3d} (per burst {peaks})  statuses {shown}  "
              f"throughput {args.requests * args.rounds / seconds:6.1f} req/s")


if __name__ == "__main__":
    main()
