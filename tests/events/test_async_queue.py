"""Async invocation through the gateway and the durable queue: 202 → result, retries with backoff,
dead letters and replay, callbacks, lease expiry after a worker dies, concurrent workers."""

import json
import random
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from functions.models import Delivery, Invocation
from functions.services_triggers import retry_policy_set
from functions.triggers import queue
from tests.events.conftest import ECHO, FAILING, FLAKY, handler, settled

pytestmark = pytest.mark.django_db(transaction=True)


def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def invocations(engine, function, trigger):
    engine.records.flush()
    return Invocation.objects.filter(function=function, trigger=trigger)


def test_async_call_answers_202_and_the_status_url_shows_the_result(engine, deploy, gateway, members,
                                                                     start_worker):
    function, _ = deploy("echo", handler(ECHO))
    response = gateway.post("/fn/acme/echo/orders", b'{"x": 1}', headers={
        "Prefer": "respond-async", "Content-Type": "application/json"}, query="a=1")
    assert response.status == 202, response
    accepted = response.json()
    assert accepted["state"] == "pending"
    assert response.headers["location"] == accepted["status_url"]
    # Stored before the 202: visible in the database with nothing running yet.
    stored = Delivery.objects.get(pk=accepted["id"])
    assert (stored.source, stored.method, stored.path, bytes(stored.body)) == ("async", "POST", "/orders?a=1",
                                                                                b'{"x": 1}')
    start_worker()
    (delivery,) = settled(accepted["id"])
    assert delivery.state == "succeeded" and delivery.attempts == 1
    path = accepted["status_url"].split("127.0.0.1:8000", 1)[-1]
    status = api(members["viewer"]).get(path).json()
    assert status["state"] == "succeeded" and status["status"] == 200
    result = json.loads(status["body"])
    assert result["body"] == '{"x": 1}' and result["path"] == "/orders" and result["trigger"] == "async"
    assert invocations(engine, function, "async").count() == 1


def test_x_nimbus_async_header_and_other_tenants_do_not_see_the_status(engine, deploy, gateway, outsider):
    deploy("echo", handler(ECHO))
    response = gateway.post("/fn/acme/echo/", b"hi", headers={"X-Nimbus-Async": "1"})
    assert response.status == 202
    path = response.json()["status_url"].split("127.0.0.1:8000", 1)[-1]
    assert api(outsider).get(path).status_code == 404


def test_retries_with_backoff_until_success(engine, deploy, gateway, members, start_worker):
    function, _ = deploy("flaky", handler(FLAKY), max_instances=1)
    retry_policy_set(acting_user=members["developer"], function=function, max_attempts=5, backoff_seconds=0.05,
                     backoff_max_seconds=0.2)
    accepted = gateway.post("/fn/acme/flaky/", b"{}", headers={"Prefer": "respond-async",
                                                                "X-Nimbus-Attempt": "99"}).json()
    start_worker()
    (delivery,) = settled(accepted["id"])
    assert delivery.state == "succeeded" and delivery.attempts == 3
    # The handler can tell a retry from a new delivery (at-least-once: deduplicate on the id).
    assert json.loads(bytes(delivery.result_body)) == {"calls": 3, "delivery": accepted["id"], "attempt": "3"}
    records = invocations(engine, function, "async").order_by("started_at")
    assert [r.status for r in records] == ["error", "error", "success"]
    # Each retry waited its backoff: the next attempt started after the previous one had finished.
    gaps = [(b.started_at - a.started_at).total_seconds() for a, b in zip(records, records[1:])]
    assert all(gap > 0 for gap in gaps)


def test_backoff_is_exponential_with_jitter_and_capped():
    policy = queue.Policy(max_attempts=10, backoff_seconds=1.0, backoff_max_seconds=10.0)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (9, 10)]:
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len({round(d, 6) for d in delays}) > 100  # jittered, not one fixed value


def test_dead_letter_after_max_attempts_then_replay_after_a_fix(engine, deploy, gateway, members, tenant,
                                                              start_worker, callback_server, settings):
    function, _ = deploy("orders", handler(FAILING))
    retry_policy_set(acting_user=members["developer"], function=function, max_attempts=2, backoff_seconds=0.01,
                     backoff_max_seconds=0.02)
    # The callback server is on loopback, which callbacks reach only when allowed (tests/events/test_outbound.py);
    # naming a callback takes an invoke-scoped token.
    settings.NIMBUS_OUTBOUND_ALLOW_CIDRS = ["127.0.0.1/32"]
    from tenancy.services import token_create

    _, token = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["invoke"])
    accepted = gateway.post("/fn/acme/orders/", b'{"order": 9}', headers={
        "Prefer": "respond-async", "X-Nimbus-Callback-Url": callback_server.url,
        "Authorization": f"Bearer {token}"}).json()
    start_worker()
    (delivery,) = settled(accepted["id"])
    assert delivery.state == "dead" and delivery.attempts == 2
    assert "exception" in delivery.last_error and delivery.result_status == 500
    client = api(members["developer"])
    dead = client.get("/api/v1/tenants/acme/functions/orders/dead-letters/").json()
    assert [d["id"] for d in dead["results"]] == [accepted["id"]]
    # The callback heard about the dead letter.
    assert wait_for_callbacks(callback_server, 1)
    headers, payload = callback_server.received[0]
    assert json.loads(payload)["state"] == "dead" and headers["X-Nimbus-Delivery-State"] == "dead"

    # A viewer may look but not replay.
    assert api(members["viewer"]).post(
        f"/api/v1/tenants/acme/functions/orders/dead-letters/{accepted['id']}/replay").status_code == 403
    from functions.services import function_source_replace

    function.refresh_from_db()
    function_source_replace(acting_user=members["developer"], function=function, files=handler(ECHO),
                            base_version=function.source_version)
    deploy("orders", None)
    replay = client.post(f"/api/v1/tenants/acme/functions/orders/dead-letters/{accepted['id']}/replay")
    assert replay.status_code == 202, replay.content
    (delivery,) = settled(accepted["id"])
    assert delivery.state == "succeeded" and delivery.attempts == 1
    assert json.loads(json.loads(bytes(delivery.result_body))["body"]) == {"order": 9}
    assert wait_for_callbacks(callback_server, 2)
    assert json.loads(callback_server.received[1][1])["state"] == "succeeded"
    assert client.get("/api/v1/tenants/acme/functions/orders/dead-letters/").json()["results"] == []
    from tenancy.models import AuditEvent

    assert AuditEvent.objects.filter(action="dead_letter.replay", tenant__slug="acme").count() == 1


def test_discard_removes_a_dead_letter_and_only_dead_letters(engine, deploy, members):
    function, _ = deploy("echo", handler(ECHO))
    pending = queue.enqueue(function=function, source="async")
    dead = queue.enqueue(function=function, source="async")
    Delivery.objects.filter(pk=dead.pk).update(state="dead")
    client = api(members["developer"])
    base = "/api/v1/tenants/acme/functions/echo/dead-letters/"
    assert client.delete(f"{base}{pending.pk}/").status_code == 409
    assert client.delete(f"{base}{dead.pk}/").status_code == 204
    assert Delivery.objects.get(pk=dead.pk).state == "discarded"


def wait_for_callbacks(server, count):
    from tests.events.conftest import wait_for

    return wait_for(lambda: len(server.received) >= count, timeout=15)


def test_a_dead_workers_claims_are_delivered_once_after_the_lease_expires(engine, deploy, start_worker):
    function, _ = deploy("echo", handler(ECHO))
    ids = [queue.enqueue(function=function, source="async", body=f'{{"n": {i}}}'.encode()).pk for i in range(6)]
    # A worker claims everything and dies before delivering (it never settles, never renews).
    claimed = queue.claim("dead-worker", limit=10, lease_seconds=1.0)
    assert sorted(d.pk for d in claimed) == sorted(ids)
    assert Delivery.objects.filter(state="running", leased_by="dead-worker").count() == 6
    # While the lease holds, another worker leaves them alone.
    assert queue.claim("early-worker", limit=10) == []
    start_worker(worker_id="survivor")
    rows = settled(*ids)
    assert all(r.state == "succeeded" and r.attempts == 2 and r.leased_by == "survivor" for r in rows)
    # Nothing lost, nothing delivered twice: one invocation per delivery, each with its own payload.
    assert invocations(engine, function, "async").count() == 6
    bodies = sorted(json.loads(json.loads(bytes(r.result_body))["body"])["n"] for r in rows)
    assert bodies == list(range(6))


def test_a_worker_whose_lease_was_taken_over_cannot_settle(engine, deploy):
    function, _ = deploy("echo", handler(ECHO))
    delivery = queue.enqueue(function=function, source="async")
    (mine,) = queue.claim("slow", lease_seconds=0.0, now=timezone.now())
    (theirs,) = queue.claim("fast", now=timezone.now() + timedelta(seconds=1))
    assert theirs.attempts == mine.attempts + 1
    assert not queue.succeed(mine, "slow", status=200, headers=[], body=b"late", invocation_id="")
    assert queue.succeed(theirs, "fast", status=200, headers=[], body=b"ok", invocation_id="")
    assert bytes(Delivery.objects.get(pk=delivery.pk).result_body) == b"ok"


def test_max_event_age_turns_an_old_delivery_into_a_dead_letter(engine, deploy, members, start_worker):
    function, _ = deploy("echo", handler(ECHO))
    retry_policy_set(acting_user=members["developer"], function=function, max_event_age_seconds=60)
    old = queue.enqueue(function=function, source="async")
    Delivery.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(minutes=5))
    start_worker()
    (delivery,) = settled(old.pk)
    assert delivery.state == "dead" and "expired" in delivery.last_error
    assert invocations(engine, function, "async").count() == 0


@pytest.mark.skipif(connection.vendor != "postgresql",
                    reason="concurrent claims need PostgreSQL (SQLite serialises writers; CI runs PostgreSQL)")
def test_two_workers_on_postgresql_never_deliver_an_item_twice(engine, deploy, start_worker):
    function, _ = deploy("echo", handler(ECHO), max_instances=4, concurrency=4)
    ids = [queue.enqueue(function=function, source="async", body=f'{{"n": {i}}}'.encode()).pk for i in range(60)]
    first = start_worker(worker_id="w1", concurrency=4)
    second = start_worker(worker_id="w2", concurrency=4)
    rows = settled(*ids, timeout=60)
    assert all(r.state == "succeeded" and r.attempts == 1 for r in rows)
    assert {r.leased_by for r in rows} == {"w1", "w2"}
    assert invocations(engine, function, "async").count() == 60
    assert first.processed + second.processed == 60


def test_claims_race_without_double_claims(engine, deploy):
    """Many threads claiming at once (each its own connection) never get the same item."""
    function, _ = deploy("echo", handler(ECHO))
    ids = {queue.enqueue(function=function, source="async").pk for _ in range(40)}
    won: list = []
    errors: list = []

    def claimer(name):
        from django.db import connections

        try:
            for _ in range(20):
                won.extend(d.pk for d in queue.claim(name, limit=3))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=claimer, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not [e for e in errors if "locked" not in str(e)]
    assert len(won) == len(set(won))
    assert set(won) <= ids
