"""The body limit under ASGI, where Django's handler reads a whole body before any middleware runs
(the test client skips that layer: tests/portal/test_body_limits.py cannot see it). Driven through
the portal's real ASGI application: a declared length over the limit answers 413 before anything
reads the body; a streamed body (no Content-Length) answers 413 once past the limit, read no
further; a body under it reaches the view. Then once over a socket to a real daphne."""

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from portal.asgi import application, django_http_app
from tests.observability.test_prometheus_scrape import free_port, stop, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 64_000
CHUNK = 4096
FILE = "/api/v1/tenants/acme/functions/hello/files/handler.py"
# Over the limit, each refused as a whole: the API, the event ingress and a page's form.
REQUESTS = [("PUT", FILE, b"application/json"), ("POST", "/events/acme/", b"application/cloudevents+json"),
            ("POST", "/t/acme/tokens/", b"application/x-www-form-urlencoded")]


def too_large(limit: int) -> dict:
    return {"code": "too_large", "detail": f"The body exceeds {limit:,} bytes.", "limit": limit}


class Exchange:
    """What the application sent back, and how many of the body's messages it took."""

    def __init__(self, sent: list[dict], taken: int):
        starts = [m for m in sent if m["type"] == "http.response.start"]
        assert len(starts) == 1, sent  # exactly one response
        self.status = starts[0]["status"]
        self.headers = {name.decode().lower(): value.decode() for name, value in starts[0]["headers"]}
        self.body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        self.taken = taken

    def json(self):
        return json.loads(self.body)


async def exchange(method: str, path: str, chunks: list[bytes], headers=()) -> Exchange:
    """``chunks`` sent as one http.request message each, as a server passes a body on; a disconnect
    only once the response is complete (Django listens for one while its view runs)."""
    messages = [{"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1}
                for n, chunk in enumerate(chunks)] or [{"type": "http.request", "body": b"", "more_body": False}]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 40000),
             "server": ("testserver", 80)}
    sent, taken, answered = [], 0, asyncio.Event()

    async def receive():
        nonlocal taken
        if taken < len(messages):
            taken += 1
            return messages[taken - 1]
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    await asyncio.wait_for(application(scope, receive, send), timeout=60)
    return Exchange(sent, taken)


@pytest.fixture
def limit(settings):
    settings.NIMBUS_MAX_BODY_BYTES = LIMIT
    return LIMIT


@pytest.fixture
def errors(caplog):
    """Records at ERROR and above (a traceback, a 500's log line)."""
    caplog.set_level(logging.ERROR)
    return lambda: [record for record in caplog.records if record.levelno >= logging.ERROR]


# ---- a declared length -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, content_type", REQUESTS)
async def test_a_declared_length_over_the_limit_is_413_before_django_or_the_body(
        limit, errors, monkeypatch, method, path, content_type):
    called = []

    async def django_app(scope, receive, send):  # pragma: no cover - must not run
        called.append(scope["path"])

    monkeypatch.setattr(django_http_app, "app", django_app)
    answer = await exchange(method, path, [b"x" * CHUNK] * 40, headers=[
        (b"content-type", content_type), (b"content-length", str(10 * 1024**3).encode())])
    assert answer.taken == 0  # not a byte of the body was read
    assert called == []
    assert answer.status == 413
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    assert answer.json() == too_large(limit)
    assert errors() == []


async def test_a_declared_length_at_the_limit_goes_on(limit, monkeypatch):
    async def django_app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    monkeypatch.setattr(django_http_app, "app", django_app)
    answer = await exchange("PUT", FILE, [b"x" * limit], headers=[(b"content-length", str(limit).encode())])
    assert answer.status == 204


# ---- a streamed body ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, content_type", REQUESTS)
async def test_a_streamed_body_over_the_limit_is_413_and_read_no_further(limit, errors, method, path, content_type):
    chunks = [b"x" * CHUNK] * (4 * limit // CHUNK)  # no Content-Length: four times the limit in 4 KiB messages
    answer = await exchange(method, path, chunks, headers=[(b"content-type", content_type),
                                                           (b"transfer-encoding", b"chunked")])
    # Read up to the message that went past the limit, and not one more.
    assert answer.taken == limit // CHUNK + 1
    assert answer.status == 413
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    assert answer.json() == too_large(limit)
    assert errors() == []


async def test_the_limit_is_read_per_request(settings):
    settings.NIMBUS_MAX_BODY_BYTES = 10_000
    answer = await exchange("PUT", FILE, [b"x" * CHUNK] * 10)
    assert answer.status == 413 and answer.json() == too_large(10_000)
    assert answer.taken == 3


# ---- under the limit -----------------------------------------------------------------------------------------

@pytest.fixture
def write_token(members, tenant):
    from tenancy.services import token_create

    return token_create(acting_user=members["developer"], tenant=tenant, name="ci",
                        scopes=["read", "write", "publish"])[1]


def in_chunks(body: bytes) -> list[bytes]:
    return [body[n:n + CHUNK] for n in range(0, len(body), CHUNK)]


@pytest.mark.django_db(transaction=True)
async def test_a_body_at_the_limit_reaches_the_api_and_the_ingress(limit, errors, function, write_token):
    from asgiref.sync import sync_to_async

    auth = (b"authorization", f"Bearer {write_token}".encode())
    content = "def handle(event, context):\n    return 'saved'\n"
    body = json.dumps({"content": content, "base_version": function.source_version, "pad": ""})
    body = body.replace('"pad": ""', '"pad": "' + " " * (limit - len(body)) + '"').encode()
    assert len(body) == limit
    # The API reads a body by its Content-Length; the server passes it on in messages all the same.
    saved = await exchange("PUT", FILE, in_chunks(body), headers=[
        auth, (b"content-type", b"application/json"), (b"content-length", str(limit).encode())])
    assert saved.status == 200, saved.body[:500]
    assert saved.taken == len(in_chunks(body))

    @sync_to_async
    def stored():
        from functions.models import Function

        return Function.objects.get(pk=function.pk).files.get(path="handler.py").content

    assert await stored() == content

    envelope = {"specversion": "1.0", "type": "com.example.big", "source": "/test", "id": "big-1", "data": ""}
    envelope["data"] = "x" * (limit - len(json.dumps(envelope)))
    event = json.dumps(envelope).encode()
    assert len(event) == limit
    accepted = await exchange("POST", "/events/acme/", in_chunks(event), headers=[
        auth, (b"content-type", b"application/cloudevents+json"), (b"transfer-encoding", b"chunked")])
    assert accepted.status == 202, accepted.body[:500]
    assert accepted.json()["accepted"] == 1
    assert errors() == []


# ---- a real daphne -------------------------------------------------------------------------------------------

def chunked_request(method: str, path: str, content_type: str, size: int) -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in in_chunks(b"x" * size))
    return head + body + b"0\r\n\r\n"


def ask(port: int, request: bytes) -> tuple[int, dict, bytes]:
    """Send ``request`` whole and read the answer (its Content-Length, or to the end of the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            assert more, data
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        length = int(headers.get("content-length", -1))
        while length < 0 or len(body) < length:
            more = conn.recv(65536)
            if not more:
                break
            body += more
    return int(status_line.split()[1]), headers, body


@pytest.mark.slow
def test_a_real_daphne_refuses_a_chunked_body_over_the_limit(tmp_path):
    limit = 64 * 1024
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SQLITE_PATH", "REDIS_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "NIMBUS_DATA_DIR": str(tmp_path),
                "NIMBUS_SOCKET_DIR": str(tmp_path / "s"), "ALLOWED_HOSTS": "127.0.0.1", "NIMBUS_WORKER": "external",
                "NIMBUS_MAX_BODY_BYTES": str(limit), "NIMBUS_MAX_SOURCE_BYTES": str(limit // 2)})
    port = free_port()
    daphne = subprocess.Popen([str(Path(sys.executable).parent / "daphne"), "-b", "127.0.0.1", "-p", str(port),
                               "portal.asgi:application"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, daphne, time.monotonic() + 60)
        for method, path, content_type in REQUESTS:
            status, headers, body = ask(port, chunked_request(method, path, content_type.decode(), 3 * limit))
            assert status == 413, (path, status, body[:500])
            assert headers["content-type"] == "application/json"
            assert json.loads(body) == too_large(limit)
        # Under the limit the body reaches Django: the API asks who is calling.
        status, _, body = ask(port, chunked_request("PUT", FILE, "application/json", limit))
        assert status in (401, 403), (status, body[:500])
    finally:
        stop(daphne)
    log = daphne.stdout.read().decode(errors="replace")
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_the_portal_server_refuses_a_body_over_the_limit_before_it_is_stored(tmp_path):
    """Daphne itself stores a whole body (in a temporary file) before the application runs, so the
    portal's server (portal/serve.py) counts it as it arrives: a declared length over the limit is
    answered at once, without waiting for (or keeping) the body; a streamed one as it crosses it."""
    limit = 64 * 1024
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SQLITE_PATH", "REDIS_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "NIMBUS_DATA_DIR": str(tmp_path),
                "NIMBUS_SOCKET_DIR": str(tmp_path / "s"), "ALLOWED_HOSTS": "127.0.0.1", "NIMBUS_WORKER": "external",
                "NIMBUS_MAX_BODY_BYTES": str(limit), "NIMBUS_MAX_SOURCE_BYTES": str(limit // 2)})
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "portal.serve", "-b", "127.0.0.1", "-p", str(port),
                               "portal.asgi:application"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, server, time.monotonic() + 60)
        for method, path, content_type in [*REQUESTS, ("POST", "/fn/acme/hello/", b"application/json")]:
            # 10 GB declared, 128 KiB sent, the connection left open: the answer comes without the rest.
            head = (f"{method} {path} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1\r\nContent-Type: {content_type.decode()}\r\n"
                    "Content-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n").encode()
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(head + b"x" * (2 * limit))
                answer = b""
                while True:
                    more = conn.recv(65536)
                    if not more:
                        break
                    answer += more
            head_part, _, body = answer.partition(b"\r\n\r\n")
            assert head_part.startswith(b"HTTP/1.1 413"), (path, answer[:300])
            assert json.loads(body) == too_large(limit)  # and nothing after it (no "100 Continue")
            # Streamed without a length, past the limit: the same answer.
            status, headers, body = ask(port, chunked_request(method, path, content_type.decode(), 3 * limit))
            assert status == 413 and json.loads(body) == too_large(limit), (path, status, body[:300])
        # Under the limit, requests are served as ever (and on a kept-alive connection).
        status, _, body = ask(port, b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        status, _, body = ask(port, chunked_request("PUT", FILE, "application/json", limit // 2))
        assert status in (401, 403), (status, body[:500])
    finally:
        stop(server)
    log = server.stdout.read().decode(errors="replace")
    assert "Traceback" not in log, log[-3000:]
