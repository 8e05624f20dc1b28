"""What the gateway reads from a request before it stores anything (an async call's path, query
string and headers; a caller's traceparent) is checked first: a clear 4xx in the project's JSON
error shape, never a 500 from the database and never a call stored differently from how it came."""

import pytest

from functions.models import Delivery, Invocation
from tests.engines.local.conftest import needs_bwrap

pytestmark = [pytest.mark.django_db(transaction=True), needs_bwrap]

ECHO = {"handler.py": "def handle(event, context):\n    return {'path': event.path}\n"}
ASYNC = {"Prefer": "respond-async"}


def assert_refusal(response, status, code, *words):
    assert response.status == status, response
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == code
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


def test_an_async_call_with_a_3000_character_query_string_is_414(engine, deploy, gateway):
    deploy("echo", ECHO)
    response = gateway.post("/fn/acme/echo/", b"{}", headers=ASYNC, query="q=" + "x" * 3000)
    body = assert_refusal(response, 414, "uri_too_long", "2,000", "body")
    assert body["field"] == "path"
    assert not Delivery.objects.exists()
    # Up to the limit the call is stored exactly as it came.
    query = "q=" + "x" * 1900
    accepted = gateway.post("/fn/acme/echo/", b"{}", headers=ASYNC, query=query)
    assert accepted.status == 202, accepted
    assert Delivery.objects.get(pk=accepted.json()["id"]).path == "/?" + query


def test_an_async_call_to_a_nul_path_is_400(engine, deploy, gateway):
    deploy("echo", ECHO)
    # A server hands the gateway "%00" decoded, as a NUL in scope["path"].
    response = gateway.post("/fn/acme/echo/a\x00b", b"{}", headers=ASYNC)
    body = assert_refusal(response, 400, "invalid", "NUL")
    assert body["field"] == "path"
    response = gateway.post("/fn/acme/echo/", b"{}", headers=ASYNC, query="a=\x00")
    assert_refusal(response, 400, "invalid", "NUL")
    assert not Delivery.objects.exists()


def test_an_async_call_with_a_nul_in_a_header_or_a_long_method_is_400(engine, deploy, gateway):
    deploy("echo", ECHO)
    response = gateway.post("/fn/acme/echo/", b"{}", headers={**ASYNC, "X-Order": "a\x00b"})
    body = assert_refusal(response, 400, "invalid", "x-order", "NUL")
    assert body["field"] == "headers"
    response = gateway.request("PROPFINDXYZW", "/fn/acme/echo/", b"{}", headers=ASYNC)
    body = assert_refusal(response, 400, "invalid", "PROPFINDXYZW")
    assert body["field"] == "method"
    assert not Delivery.objects.exists()


def test_a_traceparent_that_is_not_hex_starts_a_new_trace(engine, deploy, gateway):
    """The trace id is stored with the invocation record, batched with other tenants' records."""
    function, _ = deploy("echo", ECHO)
    bad = "00-" + "0af7651916cd43dd\x008448eb211c80319" + "-b7ad6b7169203331-01"
    response = gateway.get("/fn/acme/echo/", headers={"traceparent": bad})
    assert response.status == 200, response
    engine.records.flush()
    (invocation,) = Invocation.objects.filter(function=function)
    assert len(invocation.trace_id) == 32 and set(invocation.trace_id) <= set("0123456789abcdef")
    