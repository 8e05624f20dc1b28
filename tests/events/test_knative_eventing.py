"""Knative Eventing builders (PingSource, Broker, Trigger, Sequence): literal expected manifests,
each valid against the shared eventing CRDs, and the engine applying them to the API stand-in."""

import pytest

from functions.engines.base import FunctionRef, TenantSpec
from functions.engines.knative import manifests
from functions.triggers.queue import Policy
from tests.engines.knative import schemas
from tests.engines.knative.conftest import (  # noqa: F401 - fixtures reused as they are
    config,
    engine,
    engine_values,
    kube,
    stand_in,
)

needs_crds = pytest.mark.skipif(not schemas.crds_present(),
                                reason=f"the shared Knative CRDs are not at {schemas.CRD_DIR}")

REF = FunctionRef(tenant="acme", name="on-order", function_id=7)
LABELS = {"app.kubernetes.io/managed-by": "nimbus", "nimbus.dev/tenant": "acme", "nimbus.dev/function": "on-order",
          "nimbus.dev/function-id": "7"}
SERVICE = {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "on-order"}
CRON = {"name": "nightly", "kind": "cron", "schedule": "0 3 * * *", "time_zone": "Europe/Berlin", "filters": []}
EXACT = {"name": "created", "kind": "event", "schedule": "", "time_zone": "UTC",
         "filters": [{"attribute": "type", "value": "com.example.order.created", "match": "exact"}]}
PREFIX = {"name": "eu", "kind": "event", "schedule": "", "time_zone": "UTC",
          "filters": [{"attribute": "source", "value": "/shop/eu", "match": "prefix"},
                      {"attribute": "type", "value": "com.example.order.created", "match": "exact"}]}
POLICY = manifests.DeliveryPolicy(max_attempts=4, backoff_seconds=0.5)


def valid(manifest):
    assert schemas.schema_errors(manifest) == [], manifest
    return manifest


@needs_crds
def test_cron_trigger_is_a_ping_source_sinking_to_the_service(config):
    assert valid(manifests.ping_source(REF, CRON, config)) == {
        "apiVersion": "sources.knative.dev/v1", "kind": "PingSource",
        "metadata": {"name": "on-order-nightly", "namespace": "nimbus-acme",
                     "labels": {**LABELS, "nimbus.dev/trigger": "nightly"}},
        "spec": {"schedule": "0 3 * * *", "timezone": "Europe/Berlin", "contentType": "application/json",
                 "data": '{"trigger": "nightly", "schedule": "0 3 * * *"}', "sink": {"ref": SERVICE}},
    }


@needs_crds
def test_event_trigger_with_exact_filters_retry_and_dead_letter_sink(config):
    manifest = manifests.event_trigger(REF, EXACT, config, policy=POLICY,
                                       dead_letter_uri="https://portal.example.com/dead/acme/on-order")
    assert valid(manifest) == {
        "apiVersion": "eventing.knative.dev/v1", "kind": "Trigger",
        "metadata": {"name": "on-order-created", "namespace": "nimbus-acme",
                     "labels": {**LABELS, "nimbus.dev/trigger": "created"}},
        "spec": {"broker": "default", "subscriber": {"ref": SERVICE},
                 "filter": {"attributes": {"type": "com.example.order.created"}},
                 "delivery": {"retry": 3, "backoffPolicy": "exponential", "backoffDelay": "PT0.5S",
                              "deadLetterSink": {"uri": "https://portal.example.com/dead/acme/on-order"}}},
    }


@needs_crds
def test_prefix_filters_use_the_filters_dialects(config):
    spec = valid(manifests.event_trigger(REF, PREFIX, config, policy=manifests.DeliveryPolicy()))["spec"]
    assert spec["filters"] == [{"exact": {"type": "com.example.order.created"}}, {"prefix": {"source": "/shop/eu"}}]
    assert "filter" not in spec
    assert spec["delivery"] == {"retry": 2, "backoffPolicy": "exponential", "backoffDelay": "PT1S"}


@needs_crds
def test_trigger_manifests_put_the_broker_first_and_skip_http(config):
    http = {"name": "web", "kind": "http", "schedule": "", "time_zone": "UTC", "filters": []}
    built = manifests.trigger_manifests(REF, [CRON, EXACT, http], config, policy=POLICY)
    assert [(m["kind"], m["metadata"]["name"]) for m in built] == [
        ("Broker", "default"), ("PingSource", "on-order-nightly"), ("Trigger", "on-order-created")]
    assert valid(built[0]) == {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker",
                               "metadata": {"name": "default", "namespace": "nimbus-acme",
                                            "labels": {"app.kubernetes.io/managed-by": "nimbus",
                                                       "nimbus.dev/tenant": "acme"}},
                               "spec": {}}
    assert [m["kind"] for m in manifests.trigger_manifests(REF, [CRON], config, policy=POLICY)] == ["PingSource"]


@needs_crds
def test_sequence_is_a_flows_sequence_of_services(config):
    assert valid(manifests.sequence("acme", "math", ["double", "increment"], config, policy=POLICY)) == {
        "apiVersion": "flows.knative.dev/v1", "kind": "Sequence",
        "metadata": {"name": "math", "namespace": "nimbus-acme",
                     "labels": {"app.kubernetes.io/managed-by": "nimbus", "nimbus.dev/tenant": "acme",
                                "nimbus.dev/sequence": "math"}},
        "spec": {"channelTemplate": {"apiVersion": "messaging.knative.dev/v1", "kind": "InMemoryChannel"},
                 "steps": [
                     {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "double"},
                      "delivery": {"retry": 3, "backoffPolicy": "exponential", "backoffDelay": "PT0.5S"}},
                     {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "increment"},
                      "delivery": {"retry": 3, "backoffPolicy": "exponential", "backoffDelay": "PT0.5S"}}]},
    }


def test_the_schema_catches_a_broken_eventing_manifest(config):
    if not schemas.crds_present():
        pytest.skip("no CRDs")
    broken = manifests.ping_source(REF, CRON, config)
    broken["spec"]["schedule"] = 5
    assert schemas.schema_errors(broken)


def test_iso_durations():
    assert [manifests.iso_duration(s) for s in (1, 0.5, 0.25, 90, 0)] == ["PT1S", "PT0.5S", "PT0.25S", "PT90S",
                                                                          "PT0S"]


def test_engine_sync_applies_and_prunes_eventing_objects(engine, stand_in):
    engine.ensure_tenant(TenantSpec(slug="acme", quota={}))
    engine.sync_triggers(REF, [CRON, EXACT], policy=Policy(max_attempts=5, backoff_seconds=2.0))
    pings = "apis/sources.knative.dev/v1"
    eventing = "apis/eventing.knative.dev/v1"
    assert stand_in.get(pings, "pingsources", "nimbus-acme", "on-order-nightly")["spec"]["schedule"] == "0 3 * * *"
    trigger = stand_in.get(eventing, "triggers", "nimbus-acme", "on-order-created")
    assert trigger["spec"]["delivery"]["retry"] == 4 and trigger["spec"]["delivery"]["backoffDelay"] == "PT2S"
    assert stand_in.get(eventing, "brokers", "nimbus-acme", "default") is not None
    # The cron trigger goes away (disabled or deleted): its PingSource is deleted, the Trigger stays.
    engine.sync_triggers(REF, [EXACT], policy=Policy())
    assert stand_in.get(pings, "pingsources", "nimbus-acme", "on-order-nightly") is None
    assert stand_in.get(eventing, "triggers", "nimbus-acme", "on-order-created") is not None
    engine.sync_triggers(REF, [], policy=Policy())
    assert stand_in.get(eventing, "triggers", "nimbus-acme", "on-order-created") is None


def test_engine_applies_and_deletes_a_sequence(engine, stand_in):
    engine.ensure_tenant(TenantSpec(slug="acme", quota={}))
    engine.sync_sequence("acme", "math", ["double", "increment"], policy=Policy(max_attempts=2))
    flows = "apis/flows.knative.dev/v1"
    applied = stand_in.get(flows, "sequences", "nimbus-acme", "math")
    assert [s["ref"]["name"] for s in applied["spec"]["steps"]] == ["double", "increment"]
    assert applied["spec"]["steps"][0]["delivery"]["retry"] == 1
    engine.sync_sequence("acme", "math", None)
    assert stand_in.get(flows, "sequences", "nimbus-acme", "math") is None


@pytest.mark.django_db(transaction=True)
def test_services_sync_triggers_and_sequences_to_the_knative_engine(engine, stand_in, members, tenant, settings):
    """Trigger and sequence services reach the Knative engine after commit (a function that exists
    only in the database is enough: the Eventing objects reference its Service by name)."""
    from functions.engines import set_engine
    from functions.services import function_create
    from functions.services_triggers import sequence_create, trigger_create, trigger_update

    engine.ensure_tenant(TenantSpec(slug="acme", quota={}))
    settings.NIMBUS_ENGINE = "knative"
    set_engine(engine)
    try:
        function = function_create(acting_user=members["developer"], tenant=tenant, name="on-order")
        trigger = trigger_create(acting_user=members["developer"], function=function, name="nightly", kind="cron",
                                 schedule="0 3 * * *")
        pings = "apis/sources.knative.dev/v1"
        name = "on-order-nightly"
        assert stand_in.get(pings, "pingsources", "nimbus-acme", name)["spec"]["sink"]["ref"]["name"] == "on-order"
        trigger_update(acting_user=members["developer"], trigger=trigger, enabled=False)
        assert stand_in.get(pings, "pingsources", "nimbus-acme", name) is None
        sequence_create(acting_user=members["developer"], tenant=tenant, name="flow", functions=["on-order"])
        assert stand_in.get("apis/flows.knative.dev/v1", "sequences", "nimbus-acme", "flow") is not None
    finally:
        set_engine(None)
