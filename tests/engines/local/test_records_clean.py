"""The records writer keeps every tenant's log lines: a line PostgreSQL cannot store as it is (NUL,
lone surrogates) is stored cleaned, and a batch the database refuses is written again row by row,
so one invocation's bad line never costs another invocation (or tenant) its lines."""

import uuid
from datetime import UTC, datetime

import pytest
from django.db import DataError

from functions.engines.local.records import RecordsWriter
from functions.models import Invocation, InvocationLog
from functions.services import function_create

# Real commits: PostgreSQL checks the log lines' foreign keys when the batch commits.
pytestmark = pytest.mark.django_db(transaction=True)

NUL_LINE = "before\x00after"
SURROGATE_LINE = "broken \ud83d emoji"


@pytest.fixture
def functions(tenant, members, outsider):
    """One function in acme, one in globex (another tenant)."""
    from tenancy.models import Tenant

    acme = function_create(acting_user=members["developer"], tenant=tenant, name="noisy", starter="hello")
    globex = function_create(acting_user=outsider, tenant=Tenant.objects.get(slug="globex"), name="quiet",
                             starter="hello")
    return acme, globex


def quiet_writer() -> RecordsWriter:
    """A writer without its background thread: the test's own flush() writes each batch."""
    writer = RecordsWriter()
    writer._ensure_thread = lambda: None
    return writer


def record(function, **extra) -> dict:
    return {"id": uuid.uuid4(), "function_id": function.pk, "revision_id": None, "started_at": datetime.now(UTC),
            "status": "success", "http_status": 200, **extra}


def messages_of(invocation_id) -> list[str]:
    return list(InvocationLog.objects.filter(invocation_id=invocation_id).order_by("id")
                .values_list("message", flat=True))


def test_a_nul_line_does_not_cost_other_tenants_their_lines(functions):
    acme, globex = functions
    writer = quiet_writer()
    noisy = record(acme)
    others = [record(globex) for _ in range(40)]
    for item in (noisy, *others):
        writer.submit(dict(item))
    # One batch: the noisy call's bad lines and the forty other calls' lines together.
    writer.add_log(str(noisy["id"]), datetime.now(UTC), "INFO", NUL_LINE)
    writer.add_log(str(noisy["id"]), datetime.now(UTC), "WARN\x00", SURROGATE_LINE)
    for index, item in enumerate(others):
        writer.add_log(str(item["id"]), datetime.now(UTC), "INFO", f"line {index}")
    assert writer.flush() == 41
    for index, item in enumerate(others):
        assert messages_of(item["id"]) == [f"line {index}"]
    # Nothing dropped: the bad characters became U+FFFD, the rest of each line is kept.
    assert messages_of(noisy["id"]) == ["before\ufffdafter", "broken \ufffd emoji"]
    assert InvocationLog.objects.get(message="broken \ufffd emoji").level == "WARN\ufffd"
    assert InvocationLog.objects.count() == 42


def test_a_refused_batch_is_written_row_by_row(functions):
    acme, globex = functions
    writer = quiet_writer()
    gone, kept = record(acme), [record(globex) for _ in range(5)]
    for item in (gone, *kept):
        writer.submit(dict(item))
    writer.flush()
    # Deleted after its record was written (a prune, the function deleted): its lines cannot be
    # stored, and the batch that holds them fails when it commits.
    Invocation.objects.filter(pk=gone["id"]).delete()
    writer.add_log(str(gone["id"]), datetime.now(UTC), "INFO", "orphan")
    for item in kept:
        writer.add_log(str(item["id"]), datetime.now(UTC), "INFO", "kept")
    writer.flush()
    assert all(messages_of(item["id"]) == ["kept"] for item in kept)
    assert InvocationLog.objects.count() == 5


def test_the_row_by_row_fallback_when_the_whole_batch_fails(functions, monkeypatch):
    acme, _ = functions
    writer = quiet_writer()
    calls = [record(acme) for _ in range(3)]
    for item in calls:
        writer.submit(dict(item))
    writer.flush()
    original = InvocationLog.objects.bulk_create
    batches = []

    def refuse_batches(rows, *args, **kwargs):
        batches.append(len(rows))
        if len(rows) > 1:
            raise DataError("forced: the database refused the batch")
        return original(rows, *args, **kwargs)

    monkeypatch.setattr(InvocationLog.objects, "bulk_create", refuse_batches)
    for item in calls:
        writer.add_log(str(item["id"]), datetime.now(UTC), "INFO", "one")
        writer.add_log(str(item["id"]), datetime.now(UTC), "INFO", "two")
    writer.flush()
    assert batches[0] == 6  # the batch was tried first
    assert all(messages_of(item["id"]) == ["one", "two"] for item in calls)


def test_records_the_database_refuses_do_not_cost_the_others(functions):
    """Invocation records are batched too: one that cannot be stored as it is (here a NUL in its
    error text, from an instance's exit reason) is stored cleaned, the others as they are."""
    acme, globex = functions
    writer = quiet_writer()
    bad = record(acme, status="crashed", http_status=502, error="the instance died: \x00", instance="i\x00")
    good = [record(globex) for _ in range(10)]
    for item in (bad, *good):
        writer.submit(dict(item))
    writer.add_log(str(good[0]["id"]), datetime.now(UTC), "INFO", "fine")
    assert writer.flush() == 11
    assert Invocation.objects.filter(pk__in=[g["id"] for g in good]).count() == 10
    stored = Invocation.objects.get(pk=bad["id"])
    assert stored.error == "the instance died: \ufffd" and stored.instance == "i\ufffd"
    assert messages_of(good[0]["id"]) == ["fine"]


def test_a_batch_the_database_cannot_take_waits_for_the_next_flush(functions, monkeypatch):
    """The database down, or no pooled connection free: the batch goes back to the queue, records and
    lines alike, and the next flush stores it (before, it was dropped)."""
    from django.db import OperationalError

    from functions.engines.local import records as records_module

    acme, globex = functions
    writer = quiet_writer()
    calls = [record(acme, trace={"caller_span": "", "gateway_span": "00f067aa0ba902b7", "link": ("", "")}),
             record(globex)]
    for item in calls:
        writer.submit(dict(item))
        writer.add_log(str(item["id"]), datetime.now(UTC), "INFO", f"line of {item['id']}")
    real = records_module._insert_batch

    def unavailable(model, rows, **options):
        raise OperationalError("the connection pool timed out")

    monkeypatch.setattr(records_module, "_insert_batch", unavailable)
    with pytest.raises(OperationalError):
        writer.flush()
    assert not Invocation.objects.exists()
    monkeypatch.setattr(records_module, "_insert_batch", real)
    assert writer.flush() == 2
    for item in calls:
        assert Invocation.objects.filter(id=item["id"]).exists()
        assert messages_of(item["id"]) == [f"line of {item['id']}"]
    assert writer.flush() == 0  # nothing left, nothing twice


def test_lines_whose_insert_failed_are_stored_by_the_next_flush(functions, monkeypatch):
    from django.db import OperationalError

    from functions.engines.local import records as records_module

    acme, _ = functions
    writer = quiet_writer()
    call = record(acme)
    writer.submit(dict(call))
    writer.add_log(str(call["id"]), datetime.now(UTC), "INFO", "kept")
    real = records_module._insert_batch

    def lines_unavailable(model, rows, **options):
        if model is InvocationLog:
            raise OperationalError("the connection pool timed out")
        return real(model, rows, **options)

    monkeypatch.setattr(records_module, "_insert_batch", lines_unavailable)
    with pytest.raises(OperationalError):
        writer.flush()
    assert Invocation.objects.filter(id=call["id"]).exists() and messages_of(call["id"]) == []
    monkeypatch.setattr(records_module, "_insert_batch", real)
    writer.flush()
    assert messages_of(call["id"]) == ["kept"]


def test_a_backlog_larger_than_the_ids_kept_keeps_every_line(functions, monkeypatch):
    """After an outage many records are written at once: each keeps its lines, even when more records
    are stored in one go than the writer remembers ids of, and the backlog goes in bounded batches."""
    from functions.engines.local import records as records_module

    monkeypatch.setattr(records_module, "KNOWN_IDS", 5)
    monkeypatch.setattr(records_module, "BATCH_ITEMS", 8)
    acme, _ = functions
    writer = quiet_writer()
    calls = [record(acme) for _ in range(10)]
    for item in calls:
        writer.submit(dict(item))
        writer.add_log(str(item["id"]), datetime.now(UTC), "INFO", "kept")
    writer.flush()
    assert writer.backlogged
    while writer.backlogged:
        writer.flush()
    writer.flush()  # lines whose records came in a later batch
    assert [messages_of(item["id"]) for item in calls] == [["kept"]] * 10


def test_lines_waiting_on_a_database_that_takes_nothing_are_bounded(functions, monkeypatch):
    from django.db import OperationalError

    from functions.engines.local import records as records_module

    monkeypatch.setattr(records_module, "WAITING_LINES_LIMIT", 50)
    monkeypatch.setattr(records_module, "_insert_batch", lambda *a, **k: (_ for _ in ()).throw(OperationalError("down")))
    acme, _ = functions
    writer = quiet_writer()
    for _ in range(20):
        call = record(acme)
        writer.submit(dict(call))
        for index in range(10):
            writer.add_log(str(call["id"]), datetime.now(UTC), "INFO", f"line {index}")
        with pytest.raises(OperationalError):
            writer.flush()
    assert writer.waiting_lines <= 50
    assert sum(len(lines) for lines in writer.waiting_logs.values()) == writer.waiting_lines
