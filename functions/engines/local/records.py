"""Invocation records and their log lines, written in batches by one thread off the request path,
and kept within the retention limit (NIMBUS_LOCAL["RETENTION"]). A batch holds many tenants' rows:
text the database cannot store is cleaned first, and a batch it still refuses is written row by
row, so one bad row never costs the others."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from datetime import timedelta

from django.db import DatabaseError, InterfaceError, OperationalError, connections, transaction
from django.utils import timezone

from portal.text import storable

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.25
ORPHAN_LOG_SECONDS = 30.0  # log lines wait this long for their invocation record
PRUNE_INTERVAL = 30.0
KNOWN_IDS = 20000
WRITE_ATTEMPTS = 3
# Records and lines kept while the database cannot take them (down, or no pooled connection free);
# past this many, the oldest are dropped (with a warning) so the portal's memory stays bounded.
BACKLOG_LIMIT = 50000
WAITING_LINES_LIMIT = 200000  # log lines waiting for their records, likewise
BATCH_ITEMS = 5000  # records and lines taken per flush: one flush holds the lock briefly
FAILED_FLUSH_PAUSE = 1.0  # after a failed flush, before the next try
PERSIST_WAIT_SECONDS = 2.0


class RecordsWriter:
    def __init__(self, retention: dict | None = None):
        retention = retention or {}
        self.max_per_function = int(retention.get("MAX_PER_FUNCTION", 1000))
        self.max_days = float(retention.get("DAYS", 7))
        self.queue: queue.Queue = queue.Queue()
        self.written: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.waiting_logs: dict[str, list] = {}
        self.waiting_since: dict[str, float] = {}
        self.waiting_lines = 0
        self.backlogged = False
        self.touched_functions: set[int] = set()
        self.last_prune = time.monotonic()
        self.flush_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.thread_lock = threading.Lock()

    def _ensure_thread(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            with self.thread_lock:
                if self.thread is None or not self.thread.is_alive():
                    self.thread = threading.Thread(target=self._run, name="nimbus-records", daemon=True)
                    self.thread.start()

    def submit(self, record: dict) -> None:
        """Queue one invocation (the Invocation fields as a dict)."""
        self.queue.put(("record", record))
        self._ensure_thread()

    def add_log(self, invocation_id: str, when, level: str, message: str) -> None:
        self.queue.put(("log", (invocation_id, when, level, message)))
        self._ensure_thread()

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(FLUSH_INTERVAL)
            self.wake.clear()
            try:
                self.flush()
                while self.backlogged and not self.stopping:
                    self.flush()  # a backlog: the next batch at once
            except Exception:  # noqa: BLE001 - records are best effort; the writer keeps going
                log.exception("writing invocation records failed")
                time.sleep(FAILED_FLUSH_PAUSE)  # the database is down or busy: not four tracebacks a second

    def flush(self) -> int:
        """Write what is queued, up to BATCH_ITEMS records and lines (``backlogged`` says more may be
        waiting); returns how many records were written."""
        with self.flush_lock:
            records, logs = [], []
            while len(records) + len(logs) < BATCH_ITEMS:
                try:
                    kind, item = self.queue.get_nowait()
                except queue.Empty:
                    break
                (records if kind == "record" else logs).append(item)
            self.backlogged = len(records) + len(logs) >= BATCH_ITEMS
            if not records and not logs and not self.waiting_logs:
                return 0
            try:
                try:
                    written = self._write(records, logs)
                except (OperationalError, InterfaceError):
                    # The database is down, or no pooled connection came free: try these again later.
                    self._put_back(records)
                    raise
                if time.monotonic() - self.last_prune > PRUNE_INTERVAL:
                    self.prune()
                return written
            finally:
                if threading.current_thread() is self.thread:
                    # A short-lived connection per batch: nothing stays open between flushes.
                    connections.close_all()

    def persist(self, invocation_id: str) -> bool:
        """Write the record of ``invocation_id`` now, alone, if it is still waiting here; the rest of
        the batch stays for the writer's thread. For a caller about to store a reference to it (a
        delivery's result): a reference must never name a record that only lives in this batch, which
        a crash would lose. True once it is stored; False when it cannot be (its function was deleted
        meanwhile, or the flush that held it failed). A database error is raised, and the record goes
        back to the batch for the writer's next flush."""
        key = str(invocation_id)
        if key in self.written:
            return True
        # A flush in progress may hold the record: it is stored, or not, once it ends. The caller is a
        # worker's only database thread, which must not stall behind a long flush: then False (the
        # record stays for the writer, and the caller's reference names none).
        if not self.flush_lock.acquire(timeout=PERSIST_WAIT_SECONDS):
            return False
        try:
            if key in self.written:
                return True
            record = self._take_record(key)
            if record is None:
                return False
            try:
                self._write_records([dict(record)])
            except Exception:
                if key not in self.written:
                    self.queue.put(("record", record))
                raise
        finally:
            self.flush_lock.release()
        return key in self.written

    def _drop_oldest_lines(self) -> None:
        """Bound the lines waiting while the database takes nothing: the oldest invocations' go."""
        dropped = 0
        for invocation_id in sorted(self.waiting_since, key=self.waiting_since.get):
            if self.waiting_lines <= WAITING_LINES_LIMIT:
                break
            lines = len(self.waiting_logs.pop(invocation_id, ()))
            self.waiting_since.pop(invocation_id, None)
            self.waiting_lines -= lines
            dropped += lines
        log.warning("the database has taken no log lines for a while: %d of the oldest dropped", dropped)

    def _put_back(self, records: list[dict]) -> None:
        """Records the database could not take at all (it is down, or no connection came free) go
        back to the queue for the next flush, ahead of what came meanwhile, instead of being lost
        (their lines wait in ``waiting_logs``)."""
        items = [("record", r) for r in records if str(r["id"]) not in self.written]
        with self.queue.mutex:
            self.queue.queue.extendleft(reversed(items))
            excess = len(self.queue.queue) - BACKLOG_LIMIT
            for _ in range(max(0, excess)):
                self.queue.queue.popleft()
        if excess > 0:
            log.warning("the database has taken no invocation records for a while: %d of the oldest dropped",
                        excess)

    def _take_record(self, key: str) -> dict | None:
        """Take the record of invocation ``key`` out of the batch (None when it is not waiting there)."""
        with self.queue.mutex:
            for index, (kind, item) in enumerate(self.queue.queue):
                if kind == "record" and str(item["id"]) == key:
                    del self.queue.queue[index]
                    return item
        return None

    def _write(self, records: list[dict], logs: list) -> int:
        from functions.models import InvocationLog

        # Lines wait here for their record, across flushes when the database takes nothing for a while.
        now = time.monotonic()
        for invocation_id, when, level, message in logs:
            self.waiting_logs.setdefault(invocation_id, []).append((when, level, message))
            self.waiting_since.setdefault(invocation_id, now)
        self.waiting_lines += len(logs)
        if self.waiting_lines > WAITING_LINES_LIMIT:
            self._drop_oldest_lines()
        self._write_records(records)
        lines, ready = [], []
        for invocation_id in list(self.waiting_logs):
            if invocation_id in self.written:
                ready.append(invocation_id)
                for when, level, message in self.waiting_logs[invocation_id]:
                    # A function prints what it likes: keep the line, with what cannot be stored replaced.
                    lines.append(InvocationLog(invocation_id=uuid.UUID(invocation_id), time=when,
                                               level=storable(level[:10]), message=storable(message)))
            elif now - self.waiting_since.get(invocation_id, now) > ORPHAN_LOG_SECONDS:
                self.waiting_lines -= len(self.waiting_logs.pop(invocation_id, ()))
                self.waiting_since.pop(invocation_id, None)
        if lines:
            insert_rows(InvocationLog, lines)  # raises when the database took none: they wait for the next flush
        for invocation_id in ready:
            self.waiting_lines -= len(self.waiting_logs.pop(invocation_id, ()))
            self.waiting_since.pop(invocation_id, None)
        self._forget_old_ids()
        return len(records)

    def _forget_old_ids(self) -> None:
        """Keep the newest KNOWN_IDS stored ids (after this batch's lines found theirs)."""
        while len(self.written) > KNOWN_IDS:
            self.written.popitem(last=False)

    def _write_records(self, records: list[dict]) -> None:
        from functions.models import Function, Invocation, Revision

        if not records:
            return
        # What the gateway learnt about each trace rides along with the record, not into the table
        # (copies: a batch the database does not take goes back to the queue as it came).
        records = [dict(r) for r in records]
        traces = {str(r["id"]): r.pop("trace", None) for r in records if "trace" in r}
        function_ids = {r["function_id"] for r in records}
        existing = set(Function.objects.filter(pk__in=function_ids).values_list("pk", flat=True))
        revision_ids = {r.get("revision_id") for r in records if r.get("revision_id")}
        revisions = set(Revision.objects.filter(pk__in=revision_ids).values_list("pk", flat=True))
        rows = []
        for record in records:
            if record["function_id"] not in existing:
                continue  # the function was deleted meanwhile
            if record.get("revision_id") not in revisions:
                record = dict(record, revision_id=None)
            # Error texts carry what instances and callers said (exit reasons, exceptions).
            rows.append(Invocation(**{key: storable(value) if isinstance(value, str) else value
                                      for key, value in record.items()}))
        rows = insert_rows(Invocation, rows, ignore_conflicts=True)
        for row in rows:
            self.written[str(row.id)] = None
            self.touched_functions.add(row.function_id)
        try:
            from observability.ingest import invocations_written

            invocations_written(rows, traces)
        except Exception:  # noqa: BLE001 - metrics and traces must never cost the records themselves
            log.exception("rolling up invocation records failed")

    def prune(self) -> None:
        """Keep the newest MAX_PER_FUNCTION records of each function, none older than DAYS."""
        from functions.models import Invocation

        self.last_prune = time.monotonic()
        if self.max_days:
            Invocation.objects.filter(started_at__lt=timezone.now() - timedelta(days=self.max_days)).delete()
        for function_id in list(self.touched_functions):
            cutoff = (Invocation.objects.filter(function_id=function_id).order_by("-started_at", "-id")
                      .values_list("started_at", flat=True)[self.max_per_function:self.max_per_function + 1])
            cutoff = list(cutoff)
            if cutoff:
                Invocation.objects.filter(function_id=function_id, started_at__lte=cutoff[0]).delete()
        self.touched_functions.clear()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        thread = self.thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=5)
        try:
            self.flush()
            while self.backlogged:
                self.flush()
        except Exception:  # noqa: BLE001 - shutting down: nothing left to report to
            log.exception("final flush of invocation records failed")


def insert_rows(model, rows: list, **options) -> list:
    """Insert ``rows`` in one batch; returns the rows stored. A batch the database refuses (a row it
    cannot take, such as a log line whose invocation was deleted meanwhile) is inserted again row by
    row, so the refused row costs only itself, not the other invocations and tenants in the batch.
    (The span store writes its batches through here too: observability/ingest.py.)"""
    try:
        _insert_batch(model, rows, **options)
        return rows
    except OperationalError:
        raise  # retried already, and about the database, not about these rows
    except DatabaseError as exc:
        if len(rows) == 1:
            log.warning("the database refused a %s row, which is dropped: %s", model.__name__, exc)
            return []
        log.warning("the database refused a batch of %d %s rows (%s); writing them one by one", len(rows),
                    model.__name__, exc)
    return [row for row in rows if insert_rows(model, [row], **options)]


def _insert_batch(model, rows: list, **options) -> None:
    for attempt in range(WRITE_ATTEMPTS):
        try:
            # Its own transaction (a savepoint inside a caller's): a refused batch leaves nothing
            # behind, and foreign keys are checked here, not at some later commit.
            with transaction.atomic():
                model.objects.bulk_create(rows, **options)
            return
        except OperationalError:
            # A transient lock (SQLite) must not cost the batch; nothing of it was kept, so it can be retried.
            if attempt == WRITE_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * 2 ** attempt)
