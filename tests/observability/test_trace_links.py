"""Whose trace a call continues. A caller of the function's tenant (its API token, its IDE's test
signature) continues the trace its traceparent names. Anyone else (anonymous, another tenant's
token) cannot add spans to a trace it merely names, perhaps another tenant's: the call starts a
trace of its own with an OpenTelemetry span link to the caller's span context, which the trace page
shows as "continues from trace X"."""

import json

import pytest

from functions.models import Delivery, Invocation
from functions.services import function_update
from functions import test_invoke
from observability.models import Span
from tenancy.models import Tenant
from tenancy.services import token_create
from tests.engines.local.conftest import wait_for
from tests.events.conftest import settled, start_worker  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db(transaction=True)

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
SEEN = ("def handle(event, context):\n"
        "    return {'traceparent': event.headers.get('traceparent'),\n"
        "            'link': event.headers.get('x-nimbus-trace-link')}\n")


@pytest.fixture
def seen(deploy):
    function, _ = deploy("seen", {"handler.py": SEEN})
    return function


@pytest.fixture
def tokens(members, tenant, outsider):
    _, own = token_create(acting_user=members["developer"], tenant=tenant, name="own", scopes=["invoke"])
    _, own_read = token_create(acting_user=members["viewer"], tenant=tenant, name="ro", scopes=["read"])
    _, foreign = token_create(acting_user=outsider, tenant=Tenant.objects.get(slug="globex"), name="x",
                              scopes=["invoke"])
    return {"own": own, "own_read": own_read, "foreign": foreign}


def spans_of(engine, response) -> tuple[Invocation, dict]:
    invocation_id = response.headers["x-nimbus-invocation-id"]

    def stored():
        engine.records.flush()
        return Span.objects.filter(invocation_id=invocation_id, kind="gateway").exists()

    assert wait_for(stored)
    return Invocation.objects.get(pk=invocation_id), {s.kind: s for s in Span.objects.filter(
        invocation_id=invocation_id)}


def assert_linked(engine, response):
    """A new trace of the function's own, linked to the caller's span, never joined to it."""
    assert response.status == 200, response
    answer = response.json()
    invocation, spans = spans_of(engine, response)
    assert invocation.trace_id != CALLER_TRACE
    assert answer["traceparent"].split("-")[1] == invocation.trace_id  # the handler is in the new trace
    assert answer["link"] is None  # the platform's bookkeeping is not the handler's
    gateway = spans["gateway"]
    assert (gateway.link_trace_id, gateway.link_span_id) == (CALLER_TRACE, CALLER_SPAN)
    assert gateway.parent_id == ""
    assert not Span.objects.filter(trace_id=CALLER_TRACE).exists()
    return invocation


def assert_continued(engine, response):
    assert response.status == 200, response
    invocation, spans = spans_of(engine, response)
    assert invocation.trace_id == CALLER_TRACE
    assert response.json()["traceparent"].split("-")[1] == CALLER_TRACE
    assert spans["gateway"].parent_id == CALLER_SPAN and spans["gateway"].link_trace_id == ""
    return invocation


def test_anonymous_and_other_tenants_start_a_linked_trace(engine, gateway, seen, tokens):
    assert_linked(engine, gateway.get("/fn/acme/seen/", headers={"traceparent": CALLER}))
    assert_linked(engine, gateway.get("/fn/acme/seen/", headers={
        "traceparent": CALLER, "Authorization": f"Bearer {tokens['foreign']}"}))
    assert_linked(engine, gateway.get("/fn/acme/seen/", headers={
        "traceparent": CALLER, "Authorization": "Bearer not-a-token"}))


def test_the_tenants_own_callers_continue_their_trace(engine, gateway, seen, tokens, members):
    # Any token of the tenant says whose trace it is (the function is public: no scope is needed to call).
    for token in (tokens["own"], tokens["own_read"]):
        Span.objects.all().delete()
        assert_continued(engine, gateway.get("/fn/acme/seen/", headers={
            "traceparent": CALLER, "Authorization": f"Bearer {token}"}))
    Span.objects.all().delete()
    signature = test_invoke.test_signature(user_id=members["developer"].pk, function_id=seen.pk)
    assert_continued(engine, gateway.get("/fn/acme/seen/", headers={"traceparent": CALLER,
                                                                     test_invoke.HEADER: signature}))


def test_a_token_function_continues_its_callers_trace(engine, gateway, seen, tokens, members):
    function_update(acting_user=members["developer"], function=seen, invoke_auth="token")
    engine.routes.invalidate()
    assert_continued(engine, gateway.get("/fn/acme/seen/", headers={
        "traceparent": CALLER, "Authorization": f"Bearer {tokens['own']}"}))


def test_a_caller_cannot_forge_the_link(engine, gateway, seen):
    forged = {"X-Nimbus-Trace-Link": f"{CALLER_TRACE}-{CALLER_SPAN}"}
    response = gateway.get("/fn/acme/seen/", headers=forged)
    assert response.status == 200 and response.json()["link"] is None
    _, spans = spans_of(engine, response)
    assert spans["gateway"].link_trace_id == ""


def test_an_anonymous_async_call_is_linked_too(engine, gateway, seen, start_worker):  # noqa: F811
    accepted = gateway.get("/fn/acme/seen/", headers={"traceparent": CALLER, "Prefer": "respond-async"})
    assert accepted.status == 202, accepted
    delivery = Delivery.objects.get(pk=accepted.json()["id"])
    assert not any(k.lower() == "traceparent" for k, _ in delivery.headers)
    start_worker()
    (delivery,) = settled(delivery.pk)
    answer = json.loads(bytes(delivery.result_body))
    assert answer["link"] is None and answer["traceparent"].split("-")[1] != CALLER_TRACE
    engine.records.flush()
    gateway_span = Span.objects.get(invocation_id=delivery.invocation_id, kind="gateway")
    assert (gateway_span.link_trace_id, gateway_span.link_span_id) == (CALLER_TRACE, CALLER_SPAN)
    assert not Span.objects.filter(trace_id=CALLER_TRACE).exists()


def test_the_trace_page_says_which_trace_it_continues_from(engine, gateway, seen, client, members):
    invocation = assert_linked(engine, gateway.get("/fn/acme/seen/", headers={"traceparent": CALLER}))
    client.force_login(members["viewer"])
    page = client.get(f"/t/acme/traces/{invocation.trace_id}/").content.decode()
    assert "continues from trace" in page and CALLER_TRACE in page
