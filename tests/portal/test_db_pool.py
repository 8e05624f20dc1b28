"""Bounded database use: on PostgreSQL the portal holds its connections in psycopg's pool, sized by
settings; a request that gets none in time answers 503 with Retry-After in the API's error shape
(the API, pages, the event ingress, the gateway), and requests succeed again once connections are
given back. The live test drives 100 concurrent requests against a real daphne on PostgreSQL and
counts the server's connections in pg_stat_activity."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg_pool
import pytest
from django.db import connection
from django.test import Client
from rest_framework.test import APIClient

from portal.errors import DatabaseBusy
from tests.engines.local.conftest import (  # noqa: F401 - fixtures reused as they are
    _stop_engines,
    deploy,
    engine,
    gateway,
    make_engine,
    needs_bwrap,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
needs_postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="the connection pool is PostgreSQL's (psycopg_pool); SQLite has no server connections to bound "
           "(CI runs PostgreSQL)")

SETTINGS_OF = """
import json, portal.settings as s
print(json.dumps({"conn_max_age": s.DATABASES["default"].get("CONN_MAX_AGE"),
                  "pool": s.DATABASES["default"].get("OPTIONS", {}).get("pool")}))
"""


def settings_with(**env) -> dict:
    """The DATABASES the portal's settings make of an environment (read in a fresh interpreter)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_DB_POOL_") and k != "DATABASE_URL"}
    result = subprocess.run([sys.executable, "-c", SETTINGS_OF], env={**clean, **env}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- settings ----------------------------------------------------------------------------------------------

def test_postgresql_gets_a_pool_sized_by_settings():
    url = "postgres://nimbus@db.internal:5432/nimbus"
    assert settings_with(DATABASE_URL=url) == {
        "conn_max_age": 0, "pool": {"min_size": 2, "max_size": 20, "timeout": 10.0}}
    assert settings_with(DATABASE_URL=url, NIMBUS_DB_POOL_MIN_SIZE="1", NIMBUS_DB_POOL_MAX_SIZE="7",
                         NIMBUS_DB_POOL_TIMEOUT="2.5") == {
        "conn_max_age": 0, "pool": {"min_size": 1, "max_size": 7, "timeout": 2.5}}
    # A minimum above the maximum is held to it (psycopg refuses min > max).
    assert settings_with(DATABASE_URL=url, NIMBUS_DB_POOL_MIN_SIZE="9", NIMBUS_DB_POOL_MAX_SIZE="3")["pool"][
        "min_size"] == 3


def test_max_size_zero_turns_the_pool_off_and_sqlite_has_none():
    # No pool: a connection per request thread, closed when the request ends (never kept per thread).
    assert settings_with(DATABASE_URL="postgres://nimbus@db.internal:5432/nimbus", NIMBUS_DB_POOL_MAX_SIZE="0") == {
        "conn_max_age": 0, "pool": None}
    assert settings_with()["pool"] is None


@needs_postgresql
def test_the_running_connection_is_pooled(settings, db):
    assert connection.settings_dict["CONN_MAX_AGE"] == 0
    pool = connection.pool
    assert isinstance(pool, psycopg_pool.ConnectionPool)
    assert pool.max_size == settings.NIMBUS_DB_POOL_MAX_SIZE
    assert pool.timeout == settings.NIMBUS_DB_POOL_TIMEOUT


def test_busy_is_recognised_through_djangos_wrapping():
    from django.db.utils import OperationalError as DjangoOperationalError
    from psycopg import OperationalError

    def wrapped(cause):
        try:
            try:
                raise cause
            except Exception as exc:
                raise DjangoOperationalError(str(exc)) from exc
        except DjangoOperationalError as outer:
            return outer

    assert DatabaseBusy.caused(wrapped(psycopg_pool.PoolTimeout("couldn't get a connection after 10.00 sec")))
    assert DatabaseBusy.caused(wrapped(OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  sorry, too many '
        "clients already")))
    assert not DatabaseBusy.caused(wrapped(OperationalError("server closed the connection unexpectedly")))
    assert not DatabaseBusy.caused(ValueError("too many clients"))


# ---- a pool with no connection to give --------------------------------------------------------------------

@pytest.fixture
def tiny_pool(transactional_db):
    """The default database's pool replaced by one of two connections that gives up after 0.3 s, and
    ``hold()`` to take both in threads of their own until ``release()``."""
    saved = connection.settings_dict["OPTIONS"].get("pool")
    connection.close()
    connection.close_pool()
    connection.settings_dict["OPTIONS"]["pool"] = {"min_size": 1, "max_size": 2, "timeout": 0.3}
    held = threading.Event()
    let_go = threading.Event()
    threads = []

    def take(barrier):
        connection.ensure_connection()
        barrier.wait(timeout=30)
        let_go.wait(timeout=60)
        connection.close()  # back to the pool, as a request does when it ends

    class Holder:
        pool = connection.pool

        @staticmethod
        def hold():
            connection.close()  # the test's own thread holds none meanwhile
            barrier = threading.Barrier(3)
            threads[:] = [threading.Thread(target=take, args=(barrier,), daemon=True) for _ in range(2)]
            for thread in threads:
                thread.start()
            barrier.wait(timeout=30)
            held.set()

        @staticmethod
        def release():
            let_go.set()
            for thread in threads:
                thread.join(timeout=30)
            assert not any(thread.is_alive() for thread in threads)

    yield Holder
    if not let_go.is_set():
        Holder.release()
    connection.close()
    connection.close_pool()
    connection.settings_dict["OPTIONS"]["pool"] = saved


def assert_busy(response):
    assert response.status_code == 503
    assert response["Retry-After"] == "1"
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"code": "unavailable", "detail": "The service is busy; retry in a moment."}


@needs_postgresql
def test_api_pages_and_ingress_answer_503_while_no_connection_comes_free(tiny_pool, members, tenant, function):
    from tenancy.services import token_create

    _, read = token_create(acting_user=members["developer"], tenant=tenant, name="read", scopes=["read"])
    _, publish = token_create(acting_user=members["developer"], tenant=tenant, name="pub", scopes=["publish"])
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {read}")
    browser = Client()
    browser.force_login(members["developer"])
    event = {"HTTP_CE_SPECVERSION": "1.0", "HTTP_CE_TYPE": "com.example.ping", "HTTP_CE_SOURCE": "/test",
             "HTTP_CE_ID": "ping-1", "HTTP_AUTHORIZATION": f"Bearer {publish}"}
    session_api = APIClient()
    session_api.force_login(members["developer"])

    tiny_pool.hold()
    assert_busy(api.get("/api/v1/tenants/acme/functions/"))  # the token lookup (authentication)
    assert_busy(session_api.put("/api/v1/tenants/acme/functions/hello/files/handler.py",
                                {"content": "x = 1\n", "base_version": function.source_version}, format="json"))
    assert_busy(browser.get("/t/acme/"))  # a page (the session's user)
    assert_busy(Client().post("/events/acme/", data=b"{}", content_type="application/json", **event))
    assert_busy(Client().get("/healthz"))
    assert Client().get("/livez").json() == {"status": "ok"}  # liveness reads no database: no restart

    tiny_pool.release()
    assert api.get("/api/v1/tenants/acme/functions/").status_code == 200
    saved = session_api.put("/api/v1/tenants/acme/functions/hello/files/handler.py",
                            {"content": "x = 1\n", "base_version": function.source_version}, format="json")
    assert saved.status_code == 200, saved.content
    assert browser.get("/t/acme/").status_code == 200
    assert Client().post("/events/acme/", data=b"{}", content_type="application/json", **event).status_code == 202
    assert Client().get("/healthz").status_code == 200
    # Every connection went back (the test client leaves its thread's open: close it as a request's end does).
    connection.close()
    assert tiny_pool.pool.get_stats()["pool_available"] == 2


@needs_postgresql
@needs_bwrap
def test_gateway_answers_503_or_serves_what_it_knows(tiny_pool, engine, deploy, gateway, members, tenant):
    from tenancy.services import token_create

    deploy("hello", {"handler.py": "def handle(event, context):\n    return 'hi'\n"})
    deploy("private", {"handler.py": "def handle(event, context):\n    return 'secret'\n"}, invoke_auth="token")
    _, invoke = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["invoke"])
    assert gateway.get("/fn/acme/hello/").status == 200  # the route table is loaded, the instance warm

    tiny_pool.hold()
    engine.routes.invalidate()  # the next request wants a fresh table
    unknown = gateway.get("/fn/acme/nope/")
    # The table could not be read: a function it does not know may exist by now.
    assert unknown.status == 503 and unknown.headers["retry-after"] == "1"
    assert unknown.json() == {"code": "unavailable", "detail": "The service is busy; retry in a moment."}
    # A function it knows keeps answering from the table as it is.
    known = gateway.get("/fn/acme/hello/")
    assert known.status == 200 and known.body == b"hi"
    # A token has to be looked up.
    private = gateway.get("/fn/acme/private/", headers={"Authorization": f"Bearer {invoke}"})
    assert private.status == 503 and private.json()["code"] == "unavailable"

    tiny_pool.release()
    assert wait_for(lambda: gateway.get("/fn/acme/nope/").status == 404)
    assert gateway.get("/fn/acme/private/", headers={"Authorization": f"Bearer {invoke}"}).body == b"secret"


# ---- a real portal under 100 concurrent requests ----------------------------------------------------------

LIVE_POOL_MAX = 5
DRAFTS = 25

SEED = f"""
from django.contrib.auth import get_user_model
from functions.services import function_create, function_deploy
from tenancy.services import tenant_create, token_create

user = get_user_model().objects.create_user("live", password="pw-live-123456")
tenant = tenant_create(acting_user=user, slug="acme", name="Acme")
for n in range({DRAFTS}):
    function_create(acting_user=user, tenant=tenant, name=f"draft-{{n}}", starter="hello", max_instances=1)
revision = function_deploy(acting_user=user, function=function_create(acting_user=user, tenant=tenant, name="hello",
                                                                     starter="hello"))
revision.refresh_from_db()
print("STATUS", revision.status, revision.status_message)
print("TOKEN", token_create(acting_user=user, tenant=tenant, name="live", scopes=["read", "write", "publish"])[1])
"""


def fresh_database(url: str) -> tuple[str, str, callable]:
    """A new database beside the one ``url`` names: (its URL, its name, a function that drops it)."""
    name = f"nimbus_pool_{os.getpid()}_{secrets.token_hex(3)}"
    admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlunsplit(urlsplit(url)._replace(path="/" + name)), name, drop


class ConnectionSampler:
    """Counts the clients' connections to one database (not the autovacuum workers that visit it), over
    and over on a connection of its own (to another database, so it never counts itself), until
    stopped; keeps the peak."""

    def __init__(self, admin_url: str, database: str):
        self.admin_url, self.database = admin_url, database
        self.peak, self.samples = 0, 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def count(self, conn) -> int:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                            " AND backend_type = 'client backend'",
                            [self.database]).fetchone()[0]

    def run(self):
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            while not self.stopping.is_set():
                self.peak = max(self.peak, self.count(conn))
                self.samples += 1
                self.stopping.wait(0.005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(timeout=30)


def send(request: urllib.request.Request) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.slow
@needs_postgresql
@needs_bwrap
def test_a_real_portal_stays_within_its_pool_under_100_concurrent_requests(shared_tmp):
    url, database, drop = fresh_database(os.environ["DATABASE_URL"])
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SQLITE_PATH", "REDIS_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "NIMBUS_DATA_DIR": str(shared_tmp),
                "NIMBUS_DEPLOY_INLINE": "1", "NIMBUS_SOCKET_DIR": str(shared_tmp / "s"), "DATABASE_URL": url,
                "NIMBUS_DB_POOL_MIN_SIZE": "1", "NIMBUS_DB_POOL_MAX_SIZE": str(LIVE_POOL_MAX),
                "NIMBUS_DB_POOL_TIMEOUT": "5", "ALLOWED_HOSTS": "127.0.0.1", "LOG_LEVEL": "WARNING"})
    daphne = None
    try:
        manage = [sys.executable, str(ROOT / "manage.py")]
        for args in (["migrate", "--noinput"], ["shell", "-c", SEED]):
            result = subprocess.run(manage + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stdout + result.stderr
        assert "STATUS ready" in result.stdout, result.stdout
        token = result.stdout.split("TOKEN ", 1)[1].split()[0]

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        daphne = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                   "portal.asgi:application"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:  # or ended: the assertion below tells why
            return daphne.poll() is not None or (_listening(port)
                                                 and send(urllib.request.Request(base + "/healthz"))[0] == 200)

        assert wait_for(up, timeout=60)
        assert daphne.poll() is None, daphne.stdout.read().decode(errors="replace")[-3000:]

        auth = {"Authorization": f"Bearer {token}"}
        api = base + "/api/v1/tenants/acme/functions/"
        requests = (
            [urllib.request.Request(api, headers=auth) for _ in range(40)]
            + [urllib.request.Request(f"{api}draft-{n}/files/handler.py", method="PUT", headers={
                **auth, "Content-Type": "application/json"}, data=json.dumps(
                {"content": f"def handle(event, context):\n    return {n}\n", "base_version": 1}).encode())
               for n in range(DRAFTS)]
            + [urllib.request.Request(base + "/events/acme/", method="POST", data=b"{}", headers={
                **auth, "Content-Type": "application/json", "ce-specversion": "1.0", "ce-type": "com.example.ping",
                "ce-source": "/live", "ce-id": f"ping-{n}"}) for n in range(15)]
            + [urllib.request.Request(base + "/fn/acme/hello/?name=live") for _ in range(20)])
        assert len(requests) == 100
        admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))
        start = threading.Barrier(len(requests))

        def fire(request):
            start.wait(timeout=60)
            return send(request)

        with ConnectionSampler(admin, database) as sampler:
            with ThreadPoolExecutor(max_workers=len(requests)) as pool:
                answers = list(pool.map(fire, requests))
        statuses = [status for status, _, _ in answers]
        print(f"peak connections {sampler.peak} (pool {LIVE_POOL_MAX}), statuses",
              {code: statuses.count(code) for code in sorted(set(statuses))})
        failures = [(status, body[:300]) for status, _, body in answers if status >= 500 and status != 503]
        assert failures == []
        for status, headers, body in answers:
            if status == 503:
                assert headers.get("Retry-After") == "1", body
                assert json.loads(body)["code"] == "unavailable"
        assert set(statuses) <= {200, 202, 503}, sorted(set(statuses))
        # Every connection of the portal (requests, the gateway's lookups, the records writer, the
        # delivery worker) comes from the one pool of its one process: none beyond its size.
        assert sampler.samples > 0 and 0 < sampler.peak <= LIVE_POOL_MAX

        # The connections went back: rounds of more requests than the pool holds all succeed.
        with ThreadPoolExecutor(max_workers=LIVE_POOL_MAX + 3) as pool:
            for _ in range(3):
                again = list(pool.map(send, [urllib.request.Request(api, headers=auth)
                                             for _ in range(LIVE_POOL_MAX + 3)]))
                assert [status for status, _, _ in again] == [200] * (LIVE_POOL_MAX + 3)
    finally:
        if daphne is not None:
            os.killpg(daphne.pid, signal.SIGTERM)
            try:
                daphne.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(daphne.pid, signal.SIGKILL)
                daphne.wait()
        drop()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
