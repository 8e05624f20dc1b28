"""Calls through the portal on the Knative engine: ``/fn/`` (the portal's ASGI app) and
``engine.invoke`` reach the function's cluster-local Service, here the real Python runtime shim on
a TCP port, with the gateway's auth rules, errors and headers, and leave invocation records."""

import asyncio
import json

import pytest

from functions.engines.knative.invoke import service_url
from functions.models import Invocation
from functions.services import function_traffic_set
from tenancy.services import token_create
from tests.engines.local.conftest import asgi_request

from .runtime_service import deploy_on_knative, knative, runtime_service  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db(transaction=True)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Portal:
    """Requests through the portal's ASGI HTTP app (the same entry daphne serves)."""

    def __init__(self):
        from portal.asgi import http_app

        self.app = http_app
        self.loop = asyncio.new_event_loop()

    def request(self, method, path, body=b"", headers=None, query=""):
        return self.loop.run_until_complete(asgi_request(self.app, method, path, body, headers, query))

    def close(self):
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


@pytest.fixture
def portal():
    client = Portal()
    yield client
    client.close()


@pytest.fixture
def service(knative, runtime_service):
    running = runtime_service()
    knative.values["INTERNAL_URL"] = running.url
    return running


def record(engine, invocation_id) -> Invocation:
    engine.records.flush()
    return Invocation.objects.select_related("revision").get(pk=invocation_id)


def test_public_function_answers_through_the_portal_and_is_recorded(knative, service, deploy_on_knative, portal):
    function, revision = deploy_on_knative("hello")
    response = portal.request("POST", "/fn/acme/hello/orders/7", b"payload", query="limit=2",
                              headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
                                       "Content-Type": "text/plain"})
    assert response.status == 200, response
    answer = response.json()
    assert answer["path"] == "/orders/7" and answer["query"] == {"limit": "2"} and answer["body"] == "payload"
    assert answer["method"] == "POST" and answer["trigger"] == "http" and answer["revision"] == "1"
    # An anonymous caller's trace is linked to, not joined (tests/observability/test_trace_links.py):
    # a trace of the function's own, with the portal's span as the handler's parent.
    assert answer["traceparent"].split("-")[1] != TRACE_ID
    assert answer["traceparent"].split("-")[2] != "00f067aa0ba902b7"
    invocation_id = response.headers["x-nimbus-invocation-id"]
    assert answer["invocation"] == invocation_id
    assert response.headers["x-nimbus-revision"] == "1"
    assert response.headers["x-nimbus-cold-start"] == "yes"  # the instance's first invocation
    assert float(response.headers["x-nimbus-duration-ms"]) >= 0

    row = record(knative, invocation_id)
    assert (row.function_id, row.revision_id, row.status, row.http_status) == (function.pk, revision.pk, "success", 200)
    assert (row.trigger, row.trace_id, row.cold_start, row.error) == ("http", answer["traceparent"].split("-")[1],
                                                                       True, "")
    from observability.models import Span

    gateway_span = Span.objects.get(invocation_id=invocation_id, kind="gateway")
    assert (gateway_span.link_trace_id, gateway_span.link_span_id) == (TRACE_ID, "00f067aa0ba902b7")


def test_cold_start_and_handler_time_come_from_the_instance(knative, service, deploy_on_knative, portal):
    from observability.models import Span

    deploy_on_knative("hello")
    cold = portal.request("GET", "/fn/acme/hello/")
    warm = portal.request("GET", "/fn/acme/hello/")
    assert (cold.status, warm.status) == (200, 200)
    assert cold.headers["x-nimbus-cold-start"] == "yes" and warm.headers["x-nimbus-cold-start"] == "no"
    for response in (cold, warm):
        # The shim's report is the portal's to read, not the caller's.
        assert not {"x-nimbus-init-ms", "x-nimbus-handler-ms"} & set(response.headers)

    first = record(knative, cold.headers["x-nimbus-invocation-id"])
    assert first.cold_start is True and first.init_ms > 0
    assert first.queue_ms >= 0 and first.duration_ms >= 0
    second = record(knative, warm.headers["x-nimbus-invocation-id"])
    assert second.cold_start is False and second.init_ms == 0
    assert second.queue_ms >= 0 and second.duration_ms >= 0
    # The waterfall: the cold start inside the queue wait, then the handler the shim timed.
    spans = {s.kind: s for s in Span.objects.filter(invocation_id=first.pk)}
    assert {"gateway", "queue", "cold_start", "handler"} <= set(spans)
    assert spans["cold_start"].parent_id == spans["queue"].span_id
    assert spans["cold_start"].duration_ms <= spans["queue"].duration_ms
    assert spans["handler"].duration_ms == first.duration_ms
    assert Span.objects.filter(invocation_id=second.pk, kind="cold_start").count() == 0


def test_token_auth_unknown_functions_and_tags(knative, service, deploy_on_knative, portal, members, tenant,
                                               outsider):
    from tenancy.models import Tenant

    deploy_on_knative("private", invoke_auth="token")
    _, invoke = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["invoke"])
    _, read_only = token_create(acting_user=members["developer"], tenant=tenant, name="ro", scopes=["read"])
    _, foreign = token_create(acting_user=outsider, tenant=Tenant.objects.get(slug="globex"), name="x",
                              scopes=["invoke"])

    missing = portal.request("GET", "/fn/acme/private/")
    assert missing.status == 401 and missing.json()["code"] == "unauthenticated"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert portal.request("GET", "/fn/acme/private/", headers={"Authorization": "Bearer nope"}).status == 401
    assert portal.request("GET", "/fn/acme/private/", headers={"Authorization": f"Bearer {foreign}"}).status == 404
    assert portal.request("GET", "/fn/acme/private/", headers={"Authorization": f"Bearer {read_only}"}).status == 403
    ok = portal.request("GET", "/fn/acme/private/", headers={"Authorization": f"Bearer {invoke}"})
    assert ok.status == 200
    assert ok.json()["authorization"] is None  # the token stays with the portal

    assert portal.request("GET", "/fn/acme/nope/").json()["code"] == "not_found"
    assert portal.request("GET", "/fn/globex/private/").status == 404
    assert portal.request("GET", "/fn/acme/private@nosuchtag/",
                          headers={"Authorization": f"Bearer {invoke}"}).status == 404
    knative.records.flush()
    assert Invocation.objects.count() == 1  # only the call that reached the function


def test_signed_ide_test_call_opens_a_private_function(knative, service, deploy_on_knative, portal, members):
    from functions.test_invoke import test_signature

    private, _ = deploy_on_knative("private", invoke_auth="token")
    signature = test_signature(user_id=members["developer"].pk, function_id=private.pk)
    assert portal.request("GET", "/fn/acme/private/", headers={"X-Nimbus-Test-Signature": signature}).status == 200
    assert portal.request("GET", "/fn/acme/private/",
                          headers={"X-Nimbus-Test-Signature": signature + "x"}).status == 401


def test_body_over_the_limit_is_413(knative, service, deploy_on_knative, portal):
    deploy_on_knative("hello")
    knative.max_body_bytes = 1024
    assert portal.request("POST", "/fn/acme/hello/", b"x" * 1000).status == 200
    too_big = portal.request("POST", "/fn/acme/hello/", b"x" * 2048)
    assert too_big.status == 413 and too_big.json()["code"] == "too_large"


def test_unreachable_service_is_502_and_recorded(knative, deploy_on_knative, portal, runtime_service):
    function, revision = deploy_on_knative("hello")
    stopped = runtime_service()
    stopped.stop()  # nothing listens on its port any more
    knative.values["INTERNAL_URL"] = stopped.url
    response = portal.request("GET", "/fn/acme/hello/")
    assert response.status == 502
    assert response.json() == {"code": "unreachable", "detail": "The function's Knative Service could not be "
                                                                "reached; retry, or check the function's status."}
    row = record(knative, response.headers["x-nimbus-invocation-id"])
    assert (row.status, row.http_status, row.revision_id) == ("error", 502, revision.pk)
    assert "could not be reached" in row.error


def test_handler_slower_than_the_timeout_is_504(knative, service, deploy_on_knative, portal):
    deploy_on_knative("slow", timeout_seconds=1)
    response = portal.request("GET", "/fn/acme/slow/slow")
    assert response.status == 504
    assert response.json() == {"code": "timeout", "detail": "The function did not answer within 1 s."}
    row = record(knative, response.headers["x-nimbus-invocation-id"])
    assert (row.status, row.http_status) == ("timeout", 504)


def test_handler_error_is_passed_on_and_recorded(knative, service, deploy_on_knative, portal):
    deploy_on_knative("hello")
    response = portal.request("GET", "/fn/acme/hello/fail")
    assert response.status == 500
    assert response.json()["error"] == "The function failed."
    assert "x-nimbus-error" in response.headers
    row = record(knative, response.headers["x-nimbus-invocation-id"])
    assert (row.status, row.http_status) == ("error", 500)
    assert row.error == "the handler raised an exception (see the logs)"


def test_tagged_call_goes_to_the_tags_route(knative, service, deploy_on_knative, portal, members):
    function, first = deploy_on_knative("hello")
    function, second = deploy_on_knative("hello")
    function_traffic_set(acting_user=members["developer"], function=function, targets=[
        {"revision": 2, "percent": 100}, {"revision": 1, "percent": 0, "tag": "previous"}])
    knative.values["INTERNAL_URL"] = service.url + "/{service}"
    # The shim stands in for both routes; the path shows which Service address the portal used.
    tagged = portal.request("GET", "/fn/acme/hello@previous/x")
    assert tagged.status == 200 and tagged.json()["path"] == "/previous-hello/x"
    plain = portal.request("GET", "/fn/acme/hello/x")
    assert plain.json()["path"] == "/hello/x"
    # The shim says revision 1 answered both; the record believes the instance, not the route.
    row = record(knative, plain.headers["x-nimbus-invocation-id"])
    assert row.revision_id == first.pk


def test_service_url_follows_knative_naming():
    assert service_url({}, "nimbus-acme", "hello", None) == "http://hello.nimbus-acme.svc.cluster.local"
    assert service_url({}, "nimbus-acme", "hello", "canary") == "http://canary-hello.nimbus-acme.svc.cluster.local"
    assert service_url({"INTERNAL_URL": "http://{service}.{namespace}.svc:8080/"}, "nimbus-acme", "Hello World",
                       None) == "http://hello-world.nimbus-acme.svc:8080"


def test_engine_invoke_records_its_trigger(knative, service, deploy_on_knative):
    function, revision = deploy_on_knative("hello")
    result = asyncio.run(knative.invoke(tenant="acme", name="hello", path="/from-queue", body=b"{}",
                                        headers=[("Content-Type", "application/json"), ("Authorization", "x")],
                                        trigger="event"))
    assert (result.status, result.outcome, result.retryable) == (200, "success", False)
    answer = json.loads(result.body)
    assert answer["trigger"] == "event" and answer["path"] == "/from-queue" and answer["authorization"] is None
    assert not any(k.lower() in ("connection", "transfer-encoding", "x-nimbus-cold-start", "x-nimbus-init-ms",
                                 "x-nimbus-handler-ms") for k, _ in result.headers)
    row = record(knative, result.invocation_id)
    assert (row.trigger, row.status, row.revision_id, row.cold_start) == ("event", "success", revision.pk, True)
    assert row.init_ms > 0 and row.queue_ms >= 0

    missing = asyncio.run(knative.invoke(tenant="acme", name="nope"))
    assert (missing.status, missing.outcome, missing.retryable) == (404, "unavailable", True)


def test_the_tenant_concurrency_quota_holds_on_knative_too(knative, service, deploy_on_knative, portal, tenant):
    from functions.engines.concurrency import tenant_slots

    deploy_on_knative("hello")
    tenant.quota.max_concurrent_invocations = 1
    tenant.quota.save()
    knative.routes.invalidate()
    assert tenant_slots.take(tenant.pk, 1)  # another call of the tenant is running
    try:
        refused = portal.request("GET", "/fn/acme/hello/")
        queued = portal.loop.run_until_complete(knative.invoke(tenant="acme", name="hello"))
    finally:
        tenant_slots.give_back(tenant.pk)
    assert refused.status == 429 and refused.json()["code"] == "tenant_concurrency"
    assert (queued.status, queued.outcome, queued.retryable) == (429, "rejected", True)
    assert portal.request("GET", "/fn/acme/hello/").status == 200


def test_callers_cannot_speak_for_the_platform_on_knative(knative, service, deploy_on_knative, portal):
    deploy_on_knative("hello")
    response = portal.request("GET", "/fn/acme/hello/", headers={
        "X-Nimbus-Trigger": "cron", "X-Nimbus-Delivery-Id": "6d0c3f0e-0000-4000-8000-000000000000",
        "X-Nimbus-Attempt": "9", "X-Nimbus-Invocation-Id": "forged"})
    assert response.status == 200
    seen = response.json()
    assert seen["trigger"] == "http"
    assert seen["delivery"] is None and seen["attempt"] is None
    assert seen["invocation"] == response.headers["x-nimbus-invocation-id"] != "forged"
