"""A settled delivery names its invocation record only once that record is in the database: the
records writer batches records in memory, and a delivery that named one still waiting there would
name a record a crash loses (the kill -9 of a real portal: tests/events/test_portal_shutdown.py)."""

import pytest

from functions.models import Delivery, Invocation
from functions.triggers import queue
from tests.events.conftest import ECHO, FAILING, handler, settled

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def idle_writer(engine):
    """The engine's records writer without its background thread: only an explicit write stores a
    record, so a record is in the database exactly when someone asked for it."""
    engine.records._ensure_thread = lambda: None
    return engine.records


def test_a_settled_delivery_names_a_stored_record(engine, idle_writer, deploy, start_worker):
    function, _ = deploy("echo", handler(ECHO))
    ids = [queue.enqueue(function=function, source="async", body=b"{}").pk for _ in range(5)]
    start_worker()
    rows = settled(*ids)
    assert all(row.state == "succeeded" and row.invocation_id for row in rows)
    named = {row.invocation_id for row in rows}
    assert set(Invocation.objects.filter(pk__in=named).values_list("pk", flat=True)) == named


def test_a_retried_delivery_names_a_stored_record_at_every_attempt(engine, idle_writer, deploy, start_worker,
                                                                 members):
    from functions.services_triggers import retry_policy_set

    function, _ = deploy("failing", handler(FAILING))
    retry_policy_set(acting_user=members["developer"], function=function, max_attempts=2, backoff_seconds=0.05)
    delivery = queue.enqueue(function=function, source="async", body=b"{}")
    start_worker()
    (row,) = settled(delivery.pk)
    assert row.state == "dead" and row.attempts == 2
    assert Invocation.objects.filter(pk=row.invocation_id, status="error").exists()
    assert Invocation.objects.filter(function=function, trigger="async").count() == 2


def test_persist_writes_a_waiting_record_and_says_when_it_cannot(engine, idle_writer, function):
    import uuid
    from datetime import UTC, datetime

    def record(function_id):
        return {"id": uuid.uuid4(), "function_id": function_id, "revision_id": None, "trigger": "async",
                "started_at": datetime.now(UTC), "status": "success", "http_status": 200}

    waiting, orphan = record(function.pk), record(function.pk + 1000)
    idle_writer.submit(dict(waiting))
    idle_writer.submit(dict(orphan))
    assert not Invocation.objects.filter(pk=waiting["id"]).exists()
    assert idle_writer.persist(str(waiting["id"])) is True
    assert Invocation.objects.filter(pk=waiting["id"]).exists()
    assert idle_writer.persist(str(waiting["id"])) is True  # already stored: no write needed
    assert idle_writer.persist(str(orphan["id"])) is False  # its function is gone: nothing to name
    assert Delivery.objects.count() == 0
