"""Through the real local engine and gateway: a call with a caller's traceparent leaves one trace
(gateway → queue wait → cold start → handler → the user's span), a rollup and Prometheus samples
labelled with tenant, function and revision."""

import json

import pytest

from functions.models import Invocation
from observability.metrics import exposition
from observability.models import MinuteRollup, Span
from tests.engines.local.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

CODE = ("def handle(event, context):\n"
        "    with context.span('lookup', table='users'):\n"
        "        pass\n"
        "    return {'ok': True}\n")


def test_invocation_leaves_trace_rollup_and_samples(engine, deploy, gateway, client, members, tenant):
    from tenancy.services import token_create

    function, revision = deploy("traced", {"handler.py": CODE})
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    # A caller of the tenant continues its trace (outside callers are linked: test_trace_links.py).
    _, token = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["invoke"])
    first = gateway.get("/fn/acme/traced/", headers={"traceparent": caller, "Authorization": f"Bearer {token}"})
    second = gateway.get("/fn/acme/traced/")
    assert first.status == 200 and second.status == 200
    assert first.headers["x-nimbus-cold-start"] == "yes"

    def stored():
        engine.records.flush()
        return Span.objects.filter(function=function, kind="user").count() >= 2

    assert wait_for(stored)
    record = Invocation.objects.get(pk=first.headers["x-nimbus-invocation-id"])
    assert record.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    spans = {s.kind: s for s in Span.objects.filter(invocation_id=record.id)}
    assert set(spans) == {"gateway", "queue", "cold_start", "handler", "user"}
    assert spans["gateway"].parent_id == "00f067aa0ba902b7"  # the caller's span
    assert spans["handler"].parent_id == spans["gateway"].span_id
    # The runtime saw the gateway's span as its parent and reported its own span id back.
    assert first.headers["traceparent"] == f"00-{record.trace_id}-{spans['handler'].span_id}-01"
    user = spans["user"]
    assert user.name == "lookup" and user.parent_id == spans["handler"].span_id
    assert user.attributes == {"table": "users"}
    assert json.loads(first.headers["x-nimbus-spans"])[0]["span_id"] == user.span_id
    assert spans["gateway"].duration_ms >= spans["handler"].duration_ms

    rollup = MinuteRollup.objects.get(function=function)
    assert rollup.invocations == 2 and rollup.cold_starts == 1 and rollup.errors == 0
    assert rollup.max_instances == 1  # the revision's pool, as the gateway reported it

    text = exposition().decode()
    sample = next(line for line in text.splitlines()
                  if line.startswith("nimbus_function_invocations_total{") and 'function="traced"' in line)
    assert 'tenant="acme"' in sample and f'revision="traced-{revision.number:05d}"' in sample
    assert 'status="success"' in sample and 'response_code_class="2xx"' in sample
    assert sample.endswith(" 2.0")

    client.force_login(members["viewer"])
    page = client.get(f"/t/acme/traces/{record.trace_id}/").content.decode()
    assert "lookup" in page and 'data-span-kind="cold_start"' in page
