"""The API against the real local engine: create and deploy a function with an API token, call it
through the gateway, and read its invocation back through the API."""

import asyncio
import time

import pytest

from functions.engines import set_engine
from functions.engines.local.engine import LocalEngine
from functions.engines.local.gateway import gateway_app

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

FNS = "/api/v1/tenants/acme/functions/"


async def _asgi_get(path: str) -> tuple[int, bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    messages = []
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()

    async def send(message):
        messages.append(message)

    await gateway_app(scope, receive, send)
    status = next(m for m in messages if m["type"] == "http.response.start")["status"]
    return status, b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def poll(predicate, attempts=300):
    """Invocation records are written in the background; look again until they show."""
    for _ in range(attempts):
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def local_engine():
    engine = LocalEngine(idle_seconds=60)
    set_engine(engine)
    yield engine
    engine.shutdown()
    set_engine(None)


def test_token_driven_deploy_invoke_and_invocations(client_for, members, tenant, make_token, local_engine):
    token = make_token(members["developer"], tenant, ["read", "write", "deploy"])
    api = client_for(token=token)
    files = {"handler.py": "def handle(event, context):\n    return {'hello': 'api'}\n"}
    assert api.post(FNS, {"name": "e2e", "files": files}, format="json").status_code == 201
    deployed = api.post(FNS + "e2e/deploy", {"message": "via API"}, format="json")
    assert deployed.status_code == 202
    # With NIMBUS_DEPLOY_INLINE the engine has finished when the response is back.
    revision = api.get(FNS + "e2e/revisions/1/").json()
    assert revision["status"] == "ready", revision["status_message"]
    detail = api.get(FNS + "e2e/").json()
    assert detail["state"] == "deployed"
    assert detail["traffic"] == [{"revision": 1, "percent": 100, "tag": ""}]

    loop = asyncio.new_event_loop()
    try:
        status, body = loop.run_until_complete(_asgi_get("/fn/acme/e2e/"))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    assert status == 200
    assert b'"hello"' in body and b'"api"' in body

    invocations = poll(lambda: api.get(FNS + "e2e/invocations/").json()["results"])
    assert len(invocations) == 1
    assert (invocations[0]["status"], invocations[0]["revision"], invocations[0]["http_status"]) == (
        "success", 1, 200)
