"""A delivery whose invocation record could not be stored is settled all the same, as the call went:
the function ran, and running it again because its record failed would deliver twice. It then names
no invocation (a delivery never names a record that lives only in memory), and the record stays in
the writer's batch for a later flush."""

import logging

import pytest
from django.db import OperationalError

from functions.models import Delivery, Invocation
from functions.triggers import queue
from portal.errors import DatabaseBusy
from tests.events.conftest import ECHO, FAILING, handler, settled

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def idle_writer(engine):
    """The engine's records writer without its background thread: a record is stored only when asked."""
    engine.records._ensure_thread = lambda: None
    return engine.records


def refuse_persist(writer, monkeypatch, how: str) -> None:
    """Make storing a record for a delivery fail: the pool gives no connection (DatabaseBusy from
    persist itself), or the database refuses the write (OperationalError from the insert)."""
    if how == "busy":
        def persist(invocation_id):
            raise DatabaseBusy()

        monkeypatch.setattr(writer, "persist", persist)
    else:
        def write_records(records):
            raise OperationalError("database is locked")

        monkeypatch.setattr(writer, "_write_records", write_records)


@pytest.mark.parametrize("how", ["busy", "refused"])
def test_a_delivery_is_settled_once_when_its_record_cannot_be_stored(engine, idle_writer, deploy, start_worker,
                                                                     monkeypatch, caplog, how):
    function, _ = deploy("echo", handler(ECHO))
    refuse_persist(idle_writer, monkeypatch, how)
    delivery = queue.enqueue(function=function, source="async", body=b"{}")
    with caplog.at_level(logging.WARNING, logger="functions.triggers.worker"):
        start_worker()
        (row,) = settled(delivery.pk)
    assert row.state == Delivery.State.SUCCEEDED and row.attempts == 1
    assert row.invocation_id is None and row.result_status == 200
    assert any("its delivery will not name it" in r.getMessage() for r in caplog.records)
    # The record was not lost: it waits in the batch, and the writer's next flush stores it. One
    # record: the function ran once.
    monkeypatch.undo()
    assert not Invocation.objects.filter(function=function).exists()
    idle_writer.flush()
    assert Invocation.objects.filter(function=function, trigger="async").count() == 1


def test_a_failed_call_is_retried_as_it_went_when_its_records_cannot_be_stored(engine, idle_writer, deploy,
                                                                             start_worker, members, monkeypatch):
    from functions.services_triggers import retry_policy_set

    function, _ = deploy("failing", handler(FAILING))
    retry_policy_set(acting_user=members["developer"], function=function, max_attempts=2, backoff_seconds=0.05)
    refuse_persist(idle_writer, monkeypatch, "busy")
    delivery = queue.enqueue(function=function, source="async", body=b"{}")
    start_worker()
    (row,) = settled(delivery.pk)
    # Each attempt settled as the call went (failed, then dead), none by a lapsed lease.
    assert row.state == Delivery.State.DEAD and row.attempts == 2
    assert row.invocation_id is None
    monkeypatch.undo()
    idle_writer.flush()
    assert Invocation.objects.filter(function=function, status="error").count() == 2


def test_persist_puts_the_record_back_when_the_database_refuses_it(engine, idle_writer, function, monkeypatch):
    import uuid
    from datetime import UTC, datetime

    record = {"id": uuid.uuid4(), "function_id": function.pk, "revision_id": None, "trigger": "async",
              "started_at": datetime.now(UTC), "status": "success", "http_status": 200}
    other = dict(record, id=uuid.uuid4())
    idle_writer.submit(dict(record))
    idle_writer.submit(dict(other))
    written = []

    def refused(records):
        written.append(records)
        raise OperationalError("database is locked")

    monkeypatch.setattr(idle_writer, "_write_records", refused)
    with pytest.raises(OperationalError):
        idle_writer.persist(str(record["id"]))
    # Only that one record was tried, not the whole batch.
    assert [[r["id"] for r in records] for records in written] == [[record["id"]]]
    monkeypatch.undo()
    assert not Invocation.objects.filter(pk__in=[record["id"], other["id"]]).exists()
    assert idle_writer.persist(str(record["id"])) is True
    assert Invocation.objects.filter(pk=record["id"]).exists()
    # The rest of the batch is the writer's, at its next flush.
    assert not Invocation.objects.filter(pk=other["id"]).exists()
    idle_writer.flush()
    assert Invocation.objects.filter(pk=other["id"]).exists()
