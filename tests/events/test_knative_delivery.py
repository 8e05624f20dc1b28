"""The delivery queue on the Knative engine: async calls (``Prefer: respond-async``), CloudEvents
posted to the portal's ingress and sequence steps reach the function's Service (the real runtime
shim on a TCP port) through ``engine.invoke``, are recorded, retried and dead-lettered; cron
triggers are left to Knative's PingSources."""

import asyncio
import json
from datetime import timedelta

import pytest
from cloudevents.core.bindings.http import to_binary_event
from cloudevents.core.v1.event import CloudEvent
from django.test import Client
from django.utils import timezone

from functions.models import Delivery, Invocation, Trigger
from functions.services_triggers import retry_policy_set, sequence_create, sequence_start, trigger_create
from tenancy.services import token_create
from tests.engines.knative.conftest import (  # noqa: F401 - fixtures reused as they are
    config,
    engine,
    engine_values,
    kube,
    stand_in,
)
from tests.engines.knative.runtime_service import (  # noqa: F401 - fixtures
    deploy_on_knative,
    knative,
    runtime_service,
)
from tests.engines.knative.test_invoke import Portal
from tests.events.conftest import settled, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def service(knative, runtime_service):
    running = runtime_service()
    knative.values["INTERNAL_URL"] = running.url
    return running


@pytest.fixture
def portal():
    client = Portal()
    yield client
    client.close()


def test_async_call_is_accepted_then_delivered_over_http(knative, service, deploy_on_knative, portal,
                                                         start_worker):
    function, revision = deploy_on_knative("hello")
    accepted = portal.request("POST", "/fn/acme/hello/jobs", b'{"n": 1}',
                              headers={"Prefer": "respond-async", "Content-Type": "application/json"})
    assert accepted.status == 202, accepted
    delivery_id = accepted.json()["id"]
    assert accepted.headers["x-nimbus-delivery-id"] == delivery_id

    start_worker(engine=knative)
    (row,) = settled(delivery_id)
    assert (row.state, row.attempts, row.result_status) == ("succeeded", 1, 200)
    answer = json.loads(bytes(row.result_body))
    assert answer["path"] == "/jobs" and answer["body"] == '{"n": 1}' and answer["trigger"] == "async"
    assert (answer["delivery"], answer["attempt"]) == (delivery_id, "1")  # the worker's, passed through
    knative.records.flush()
    invocation = Invocation.objects.get(pk=row.invocation_id)
    assert (invocation.trigger, invocation.status, invocation.revision_id) == ("async", "success", revision.pk)


def test_failing_handler_is_retried_then_dead_lettered(knative, service, deploy_on_knative, portal, members,
                                                       start_worker):
    function, _ = deploy_on_knative("hello")
    retry_policy_set(acting_user=members["developer"], function=function, max_attempts=3, backoff_seconds=0.0,
                     backoff_max_seconds=0.0)
    accepted = portal.request("POST", "/fn/acme/hello/fail", b"{}", headers={"Prefer": "respond-async"})
    assert accepted.status == 202

    start_worker(engine=knative)
    (row,) = settled(accepted.json()["id"])
    assert (row.state, row.attempts, row.result_status) == ("dead", 3, 500)
    assert row.last_error == "the handler raised an exception (see the logs)"
    knative.records.flush()
    assert set(function.invocations.values_list("status", "trigger")) == {("error", "async")}
    assert function.invocations.count() == 3


def test_events_posted_to_the_portal_reach_the_function_once(knative, service, deploy_on_knative, members, tenant,
                                                             start_worker, stand_in):
    function, _ = deploy_on_knative("on-order")
    trigger_create(acting_user=members["developer"], function=function, name="created", kind="event",
                   filters=[{"attribute": "type", "value": "com.example.order.created"}])
    # The same trigger exists in the cluster for in-cluster sources (an Eventing Trigger on the Broker).
    assert stand_in.get("apis/eventing.knative.dev/v1", "triggers", "nimbus-acme", "on-order-created")
    _, token = token_create(acting_user=members["developer"], tenant=tenant, name="events", scopes=["publish"])
    message = to_binary_event(CloudEvent({"type": "com.example.order.created", "source": "/shop", "id": "order-1",
                                          "datacontenttype": "application/json"}, {"order": 1}))
    headers = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in message.headers.items()
               if k.lower() != "content-type"}
    response = Client().post("/events/acme/", data=message.body, content_type=message.headers["content-type"],
                             HTTP_AUTHORIZATION=f"Bearer {token}", **headers)
    assert response.status_code == 202, response.content
    (delivery,) = response.json()["events"][0]["deliveries"]

    start_worker(engine=knative)
    (row,) = settled(delivery["id"])
    assert row.state == "succeeded"
    event = json.loads(bytes(row.result_body))["cloudevent"]
    assert event["id"] == "order-1" and event["data"] == {"order": 1}
    knative.records.flush()
    assert list(function.invocations.values_list("trigger", "status")) == [("event", "success")]


def test_sequence_steps_run_on_knative(knative, service, deploy_on_knative, members, tenant, start_worker):
    deploy_on_knative("first")
    deploy_on_knative("second")
    sequence = sequence_create(acting_user=members["developer"], tenant=tenant, name="pipeline",
                               functions=["first", "second"])
    start = sequence_start(acting_user=members["developer"], sequence=sequence, body=b'{"n": 1}')
    start_worker(engine=knative)

    def finished():
        rows = list(Delivery.objects.filter(run_id=start.run_id).order_by("step"))
        return rows if len(rows) == 2 and all(r.state == "succeeded" for r in rows) else None

    rows = wait_for(finished, timeout=30)
    assert rows, list(Delivery.objects.filter(run_id=start.run_id).values("step", "state", "last_error"))
    # The second step got the first one's answer as its body.
    assert json.loads(json.loads(bytes(rows[1].result_body))["body"])["body"] == '{"n": 1}'
    knative.records.flush()
    assert Invocation.objects.filter(trigger="sequence", status="success").count() == 2


def _due_cron_trigger(members, function) -> Trigger:
    trigger = trigger_create(acting_user=members["developer"], function=function, name="every-minute",
                             kind="cron", schedule="* * * * *")
    Trigger.objects.filter(pk=trigger.pk).update(next_run_at=timezone.now() - timedelta(minutes=5))
    return trigger


def test_worker_leaves_cron_to_knative(knative, service, deploy_on_knative, members, portal, start_worker,
                                       stand_in):
    function, _ = deploy_on_knative("hello")
    _due_cron_trigger(members, function)
    assert stand_in.get("apis/sources.knative.dev/v1", "pingsources", "nimbus-acme", "hello-every-minute")
    accepted = portal.request("POST", "/fn/acme/hello/", b"{}", headers={"Prefer": "respond-async"})
    start_worker(engine=knative)
    # The worker fires due cron triggers before it claims deliveries, in every round: once the
    # async call is done, it has had its chance to fire the trigger.
    settled(accepted.json()["id"])
    assert not Delivery.objects.filter(source=Delivery.Source.CRON).exists()


def test_worker_fires_cron_on_the_local_engine(make_engine, members, tenant, start_worker):
    from functions.services import function_create

    engine = make_engine()
    assert engine.runs_cron is False
    function = function_create(acting_user=members["developer"], tenant=tenant, name="nightly")
    _due_cron_trigger(members, function)
    start_worker(engine=engine)
    assert wait_for(lambda: Delivery.objects.filter(function=function, source=Delivery.Source.CRON).exists())


def test_recording_double_and_engines_share_the_protocol(knative):
    from functions.engines.base import Engine
    from functions.engines.local.engine import LocalEngine
    from tests.doubles import RecordingEngine

    for candidate in (knative, LocalEngine(), RecordingEngine()):
        assert isinstance(candidate, Engine), type(candidate)
        assert asyncio.iscoroutinefunction(candidate.invoke)
