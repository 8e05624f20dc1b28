"""Fixtures for the local engine: a real engine (processes, sockets) installed for the test and
stopped afterwards, functions deployed through the services, and an in-process gateway client."""

import asyncio
import json
import socket
import threading
import time

import pytest

from functions.engines import set_engine
from functions.engines.local.engine import LocalEngine, stop_all_engines
from functions.engines.local.gateway import gateway_app
from functions.engines.local.sandbox import bwrap_problem

needs_bwrap = pytest.mark.skipif(bwrap_problem() is not None, reason=f"the sandbox is not usable here: {bwrap_problem()}")


@pytest.fixture(autouse=True)
def _stop_engines():
    """No test leaves instances or fork servers running."""
    yield
    stop_all_engines()
    set_engine(None)


@pytest.fixture
def make_engine():
    engines = []

    def make(**options):
        options.setdefault("idle_seconds", 60)
        engine = LocalEngine(**options)
        engines.append(engine)
        set_engine(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


@pytest.fixture
def engine(make_engine):
    return make_engine()


@pytest.fixture
def deploy(members, tenant):
    """deploy(name, files, **config) → the function, created by the developer and deployed inline."""
    from functions.models import Function
    from functions.services import function_create, function_deploy

    def deploy_(name, files, *, promote=True, expect_ready=True, **config):
        function = Function.objects.filter(tenant=tenant, name=name).first()
        if function is None:
            function = function_create(acting_user=members["developer"], tenant=tenant, name=name, files=files,
                                       **config)
        revision = function_deploy(acting_user=members["developer"], function=function, promote=promote)
        revision.refresh_from_db()
        if expect_ready:
            assert revision.status == "ready", revision.status_message
        function.refresh_from_db()
        return function, revision

    return deploy_


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self):
        return self.body.decode()

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Response({self.status}, {self.body[:200]!r})"


async def asgi_request(app, method, path, body=b"", headers=None, query=""):
    """One HTTP request through an ASGI app, as a server would make it."""
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if body and not any(k == b"content-length" for k, _ in raw_headers):
        raw_headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "headers": raw_headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    sent = False
    messages = []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()

    async def send(message):
        messages.append(message)

    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return Response(start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, payload)


class Gateway:
    """Drives gateway_app on one event loop for the whole test (keep-alive connections stay valid)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()

    def request(self, method, path, body=b"", headers=None, query=""):
        return self.loop.run_until_complete(asgi_request(gateway_app, method, path, body, headers, query))

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, body=b"", **kwargs):
        return self.request("POST", path, body, **kwargs)

    def many(self, requests):
        """Send several requests at once: [(method, path, body, headers)] → responses in order."""
        async def run():
            return await asyncio.gather(*(asgi_request(gateway_app, m, p, b, h) for m, p, b, h in requests))
        return self.loop.run_until_complete(run())

    def close(self):
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


@pytest.fixture
def gateway():
    client = Gateway()
    yield client
    client.close()


def wait_for(predicate, timeout=15.0, interval=0.05):
    """Poll until ``predicate()`` is truthy (processes change state asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def host_listener(host="127.0.0.1"):
    """A TCP listener on the host that accepts and closes: (port, stop event). What the sandbox tests try
    to reach from inside."""
    server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, 0))
    server.listen(16)
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                pass
        server.close()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1], stop
