"""Every starter the function-create form offers deploys on the local engine and answers as shipped."""

import asyncio
import json
import shutil

import pytest

from functions.engines import set_engine
from functions.starters import starters_for

try:
    from functions.engines.local.engine import LocalEngine, stop_all_engines
    from functions.engines.local.gateway import gateway_app
except ImportError:  # pragma: no cover - only before the local engine lands
    LocalEngine = None

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(LocalEngine is None, reason="the local engine (functions.engines.local.engine) is not importable"),
]

CLOUDEVENT_HEADERS = {"ce-id": "evt-1", "ce-type": "com.example.order.created", "ce-source": "/orders",
                      "ce-specversion": "1.0", "content-type": "application/json"}

# (runtime, starter) → (method, path, query, headers, body, check(status, body))
CALLS = {
    ("python3.11", "hello"): ("GET", "", "name=Ada", {}, b"", lambda s, b: s == 200 and b == "Hello, Ada!\n"),
    ("python3.11", "http-json"): (
        "POST", "", "", {"content-type": "application/json"},
        json.dumps({"items": [{"price": 2.5, "quantity": 2}, {"price": 1}]}).encode(),
        lambda s, b: s == 200 and json.loads(b)["items"] == 2 and json.loads(b)["total"] == 6.0),
    ("python3.11", "cloudevent"): (
        "POST", "", "", CLOUDEVENT_HEADERS, b'{"order": 7}',
        lambda s, b: s == 200 and json.loads(b) == {"received": "evt-1", "type": "com.example.order.created",
                                                    "data": {"order": 7}}),
    ("python3.11", "cron"): ("POST", "", "", {}, b"", lambda s, b: s == 200 and "ran_at" in json.loads(b)),
    ("node20", "hello"): ("GET", "", "name=Ada", {}, b"", lambda s, b: s == 200 and b == "Hello, Ada!\n"),
    ("node20", "http-json"): (
        "POST", "", "", {"content-type": "application/json"},
        json.dumps({"items": [{"price": 2.5, "quantity": 2}, {"price": 1}]}).encode(),
        lambda s, b: s == 200 and json.loads(b)["items"] == 2 and json.loads(b)["total"] == 6),
}


def starter_cases():
    cases = []
    for runtime in ("python3.11", "node20"):
        for name, _title in starters_for(runtime):
            marks = []
            if runtime == "node20" and shutil.which("node") is None:
                marks.append(pytest.mark.skip(reason="node is not installed"))
            cases.append(pytest.param(runtime, name, id=f"{runtime}-{name}", marks=marks))
    return cases


async def call(method, path, query, headers, body):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]
             + [(b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    messages, delivered = [], False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()

    async def send(message):
        messages.append(message)

    await gateway_app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


@pytest.fixture
def local_engine():
    engine = LocalEngine(idle_seconds=60)
    set_engine(engine)
    yield engine
    engine.shutdown()
    stop_all_engines()
    set_engine(None)


def test_every_starter_has_a_call_here():
    offered = {(runtime, name) for runtime in ("python3.11", "node20") for name, _ in starters_for(runtime)}
    assert offered == set(CALLS)


@pytest.mark.slow
@pytest.mark.parametrize("runtime, starter", starter_cases())
def test_starter_deploys_and_answers(members, tenant, local_engine, runtime, starter):
    from functions.services import function_create, function_deploy

    name = f"s-{starter}"
    function = function_create(acting_user=members["developer"], tenant=tenant, name=name, runtime=runtime,
                               starter=starter)
    revision = function_deploy(acting_user=members["developer"], function=function, inline=True)
    revision.refresh_from_db()
    assert revision.status == "ready", revision.status_message
    method, path, query, headers, body, check = CALLS[(runtime, starter)]
    loop = asyncio.new_event_loop()
    try:
        status, answer = loop.run_until_complete(call(method, f"/fn/acme/{name}/{path}", query, headers, body))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    assert check(status, answer.decode()), (status, answer)
