"""Cron triggers with a controllable clock, CloudEvents ingress (binary, structured, batched,
through the cloudevents SDK) with filters, triggers through the API, and sequences."""

import json
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent
from django.test import Client
from rest_framework.test import APIClient

from functions.models import Delivery, Invocation, Trigger
from functions.services_triggers import sequence_create, sequence_start, trigger_create, trigger_update
from functions.triggers import cron
from portal.errors import ValidationFailed
from tenancy.models import AuditEvent
from tenancy.services import token_create
from tests.events.conftest import DOUBLE, ECHO, INCREMENT, handler, settled

pytestmark = pytest.mark.django_db(transaction=True)


def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


# ---- cron ---------------------------------------------------------------------------------------------

def test_schedule_validation_says_what_is_wrong():
    with pytest.raises(ValidationFailed, match="has 3 fields; a schedule has five"):
        cron.validate_schedule("* * *")
    with pytest.raises(ValidationFailed, match="not a valid cron schedule"):
        cron.validate_schedule("61 * * * *")
    with pytest.raises(ValidationFailed, match="not a known time zone"):
        cron.validate_schedule("* * * * *", "Mars/Olympus")
    assert cron.validate_schedule("  */5   * * * * ") == "*/5 * * * *"


def test_next_five_runs_follow_the_time_zone():
    after = datetime(2026, 3, 28, 12, 0, tzinfo=dt_timezone.utc)  # the day before Berlin moves to summer time
    runs = cron.next_runs("30 2 * * *", "Europe/Berlin", after=after)
    assert len(runs) == 5
    assert [r.astimezone(dt_timezone.utc).strftime("%m-%d %H:%M") for r in runs[1:3]] == ["03-30 00:30",
                                                                                         "03-31 00:30"]
    assert runs[0].astimezone(dt_timezone.utc) < runs[1].astimezone(dt_timezone.utc)


def test_cron_fires_once_per_slot_with_a_controllable_clock(engine, deploy, members, start_worker):
    function, _ = deploy("nightly", handler(ECHO))
    trigger = trigger_create(acting_user=members["developer"], function=function, name="every-5", kind="cron",
                             schedule="*/5 * * * *", time_zone="UTC")
    now = datetime(2030, 1, 1, 10, 2, tzinfo=dt_timezone.utc)
    Trigger.objects.filter(pk=trigger.pk).update(next_run_at=datetime(2030, 1, 1, 10, 0, tzinfo=dt_timezone.utc))
    assert cron.fire_due(now=now) == 1
    assert cron.fire_due(now=now) == 0  # the slot moved on: firing again enqueues nothing
    trigger.refresh_from_db()
    assert trigger.next_run_at == datetime(2030, 1, 1, 10, 5, tzinfo=dt_timezone.utc)
    assert cron.fire_due(now=now + timedelta(minutes=2)) == 0
    # A worker that was away for many slots fires once on return, then waits for the next slot.
    assert cron.fire_due(now=now + timedelta(hours=3)) == 1
    trigger.refresh_from_db()
    assert trigger.next_run_at == datetime(2030, 1, 1, 13, 5, tzinfo=dt_timezone.utc)
    trigger_update(acting_user=members["developer"], trigger=trigger, enabled=False)
    assert cron.fire_due(now=now + timedelta(days=1)) == 0

    ids = list(Delivery.objects.filter(function=function, source="cron").values_list("pk", flat=True))
    assert len(ids) == 2
    start_worker(cron_enabled=False)
    rows = settled(*ids)
    event = json.loads(bytes(rows[0].result_body))["cloudevent"]
    assert event["type"] == "dev.nimbus.cron" and event["source"] == "/nimbus/acme/nightly/triggers/every-5"
    assert event["data"]["schedule"] == "*/5 * * * *"
    engine.records.flush()
    assert function.invocations.filter(trigger="cron").count() == 2


def test_trigger_api_shows_next_runs_and_leaves_an_audit_trail(engine, deploy, members, outsider):
    deploy("nightly", handler(ECHO))
    client = api(members["developer"])
    base = "/api/v1/tenants/acme/functions/nightly/triggers/"
    bad = client.post(base, {"name": "bad", "kind": "cron", "schedule": "every minute"}, format="json")
    assert bad.status_code == 400 and "five" in bad.json()["detail"]
    created = client.post(base, {"name": "hourly", "kind": "cron", "schedule": "0 * * * *",
                                 "time_zone": "Asia/Tokyo"}, format="json")
    assert created.status_code == 201, created.content
    assert len(created.json()["next_runs"]) == 5 and created.json()["next_runs"][0].endswith("+09:00")
    event = client.post(base, {"name": "orders", "kind": "event", "filters": [
        {"attribute": "type", "value": "com.example.order.", "match": "prefix"}]}, format="json")
    assert event.status_code == 201 and event.json()["filters"][0]["match"] == "prefix"
    assert client.post(base, {"name": "orders", "kind": "event"}, format="json").status_code == 409
    assert api(members["viewer"]).post(base, {"name": "v", "kind": "event"}, format="json").status_code == 403
    assert api(outsider).get(base).status_code == 404
    disabled = client.patch(base + "hourly/", {"enabled": False}, format="json")
    assert disabled.status_code == 200 and disabled.json()["next_runs"] == []
    assert [t["name"] for t in client.get(base).json()] == ["hourly", "orders"]
    assert client.delete(base + "orders/").status_code == 204
    actions = list(AuditEvent.objects.filter(tenant__slug="acme", action__startswith="trigger.")
                   .order_by("created_at", "id").values_list("action", flat=True))
    assert actions == ["trigger.create", "trigger.create", "trigger.disable", "trigger.delete"]


# ---- CloudEvents ingress ------------------------------------------------------------------------------

@pytest.fixture
def publish_token(members, tenant):
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="events", scopes=["publish"])
    return plaintext


def post_event(message, token, tenant="acme"):
    headers = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in message.headers.items()
               if k.lower() != "content-type"}
    return Client().post(f"/events/{tenant}/", data=message.body,
                         content_type=message.headers.get("content-type", "application/octet-stream"),
                         HTTP_AUTHORIZATION=f"Bearer {token}", **headers)


def order_event(**attributes):
    base = {"type": "com.example.order.created", "source": "/shop/eu", "id": "order-1", "subject": "orders/1",
            "datacontenttype": "application/json"}
    base.update(attributes)
    return CloudEvent(base, {"order": 1, "total": 9.5})


def test_binary_and_structured_events_reach_matching_functions(engine, deploy, members, publish_token,
                                                                start_worker):
    on_order, _ = deploy("on-order", handler(ECHO))
    on_eu, _ = deploy("on-eu", handler(ECHO))
    deploy("on-refund", handler(ECHO))
    dev = members["developer"]
    trigger_create(acting_user=dev, function=on_order, name="created", kind="event",
                   filters=[{"attribute": "type", "value": "com.example.order.created"}])
    trigger_create(acting_user=dev, function=on_eu, name="eu", kind="event",
                   filters=[{"attribute": "source", "value": "/shop/eu", "match": "prefix"},
                            {"attribute": "region", "value": "eu"}])
    from functions.models import Function

    trigger_create(acting_user=dev, function=Function.objects.get(name="on-refund"), name="refunds", kind="event",
                   filters=[{"attribute": "type", "value": "com.example.refund", "match": "prefix"}])

    binary = post_event(to_binary_event(order_event(region="eu")), publish_token)
    assert binary.status_code == 202, binary.content
    routed = sorted(d["function"] for d in binary.json()["events"][0]["deliveries"])
    assert routed == ["on-eu", "on-order"]
    structured = post_event(to_structured_event(order_event(id="order-2", region="us")), publish_token)
    assert structured.status_code == 202
    assert [d["function"] for d in structured.json()["events"][0]["deliveries"]] == ["on-order"]

    start_worker()
    ids = [d["id"] for r in (binary, structured) for d in r.json()["events"][0]["deliveries"]]
    rows = settled(*ids)
    assert all(r.state == "succeeded" for r in rows)
    received = {(r.function.name, json.loads(bytes(r.result_body))["cloudevent"]["id"]): json.loads(
        bytes(r.result_body))["cloudevent"] for r in rows}
    event = received[("on-order", "order-1")]
    assert event["type"] == "com.example.order.created" and event["subject"] == "orders/1"
    assert event["region"] == "eu" and event["data"] == {"order": 1, "total": 9.5}
    assert ("on-order", "order-2") in received and ("on-eu", "order-1") in received
    engine.records.flush()
    assert on_order.invocations.filter(trigger="event").count() == 2


def test_batched_events(engine, deploy, members, publish_token):
    function, _ = deploy("on-order", handler(ECHO))
    trigger_create(acting_user=members["developer"], function=function, name="all", kind="event")
    batch = [json.loads(to_structured_event(order_event(id=f"b{i}")).body) for i in range(3)]
    response = Client().post("/events/acme/", data=json.dumps(batch),
                             content_type="application/cloudevents-batch+json",
                             HTTP_AUTHORIZATION=f"Bearer {publish_token}")
    assert response.status_code == 202 and response.json()["accepted"] == 3
    assert Delivery.objects.filter(function=function, source="event").count() == 3


def test_ingress_refuses_incomplete_events_and_wrong_tokens(engine, deploy, members, tenant, outsider,
                                                           publish_token):
    message = to_binary_event(order_event())
    headers = {k: v for k, v in message.headers.items() if k != "ce-source"}
    response = Client().post("/events/acme/", data=message.body, content_type="application/json",
                             HTTP_AUTHORIZATION=f"Bearer {publish_token}",
                             **{f"HTTP_{k.upper().replace('-', '_')}": v for k, v in headers.items()})
    assert response.status_code == 400 and "source" in response.json()["detail"]
    structured = Client().post("/events/acme/", data=json.dumps({"specversion": "1.0", "type": "t", "source": "s"}),
                               content_type="application/cloudevents+json",
                               HTTP_AUTHORIZATION=f"Bearer {publish_token}")
    assert structured.status_code == 400 and "id" in structured.json()["detail"]
    plain = Client().post("/events/acme/", data="{}", content_type="application/json",
                          HTTP_AUTHORIZATION=f"Bearer {publish_token}")
    assert plain.status_code == 400 and "binary mode" in plain.json()["detail"]
    assert post_event(message, "nope").status_code == 401
    assert Client().post("/events/acme/", data=b"", content_type="application/json").status_code == 401
    _, invoke_only = token_create(acting_user=members["developer"], tenant=tenant, name="inv", scopes=["invoke"])
    assert post_event(message, invoke_only).status_code == 403
    assert post_event(message, publish_token, tenant="globex").status_code == 404


# ---- sequences ------------------------------------------------------------------------------------------

def test_sequence_passes_each_output_to_the_next_step(engine, deploy, members, tenant, start_worker):
    deploy("double", handler(DOUBLE))
    deploy("increment", handler(INCREMENT))
    client = api(members["developer"])
    created = client.post("/api/v1/tenants/acme/sequences/", {"name": "math", "functions": [
        "double", "increment", "double"]}, format="json")
    assert created.status_code == 201 and created.json()["functions"] == ["double", "increment", "double"]
    started = client.post("/api/v1/tenants/acme/sequences/math/start", {"input": {"n": 3}}, format="json")
    assert started.status_code == 202, started.content
    start_worker()
    first = settled(started.json()["id"])[0]
    from tests.events.conftest import wait_for

    last = wait_for(lambda: Delivery.objects.filter(run_id=first.run_id, step=2, state="succeeded").first())
    assert last is not None
    assert json.loads(bytes(last.result_body)) == {"n": 14}  # (3·2 + 1)·2
    steps = list(Delivery.objects.filter(run_id=first.run_id).order_by("step").values_list("step", "source"))
    assert steps == [(0, "sequence"), (1, "sequence"), (2, "sequence")]

    # The run is one trace: each step's invocation continues the traceparent the run started with,
    # and the tenant's trace page shows the steps of both functions together.
    trace_id = started.json()["trace_id"]
    assert len(trace_id) == 32
    invocation_ids = list(Delivery.objects.filter(run_id=first.run_id).values_list("invocation_id", flat=True))
    engine.records.flush()
    traced = wait_for(lambda: list(Invocation.objects.filter(pk__in=invocation_ids).values_list("trace_id", flat=True))
                      if Invocation.objects.filter(pk__in=invocation_ids).count() == 3 else None)
    assert traced == [trace_id] * 3
    from observability.models import Span

    assert wait_for(lambda: Span.objects.filter(trace_id=trace_id, kind=Span.Kind.GATEWAY).count() == 3)
    page = Client()
    page.force_login(members["developer"])
    shown = page.get(f"/t/acme/traces/{trace_id}/")
    assert shown.status_code == 200
    html = shown.content.decode()
    assert "sequence double" in html and "sequence increment" in html
    assert client.post("/api/v1/tenants/acme/sequences/", {"name": "bad", "functions": ["nope"]},
                       format="json").status_code == 400


def test_sequence_services_check_permissions(engine, deploy, members, tenant):
    deploy("double", handler(DOUBLE))
    from portal.errors import PermissionDenied

    with pytest.raises(PermissionDenied):
        sequence_create(acting_user=members["viewer"], tenant=tenant, name="s", functions=["double"])
    sequence = sequence_create(acting_user=members["developer"], tenant=tenant, name="s", functions=["double"])
    delivery = sequence_start(acting_user=members["developer"], sequence=sequence, body=b'{"n": 1}')
    assert delivery.run_id is not None and delivery.step == 0
