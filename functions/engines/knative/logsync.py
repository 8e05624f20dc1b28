"""Function log lines on the Knative engine into the portal's log store: one pass reads the new
``user-container`` lines of the pods of each recently invoked function and stores the ones tagged
with an invocation of that function as InvocationLog rows (the Logs tab, the IDE's panel and live
tail, an invocation's logs all read those rows, as on the local engine)."""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, timedelta

from django.db import transaction
from django.utils import timezone

from portal.errors import EngineError
from portal.text import storable

from . import names
from .client import KubeClient

log = logging.getLogger(__name__)

LOG_PULL_WINDOW = 10  # minutes: functions with an invocation this recent have their pods read
OVERLAP_SECONDS = 2  # each read reaches this far back over the last one (whole seconds, clock skew)
MAX_FUNCTIONS = 100  # per pass, the most recently invoked first
MAX_LINES = 5000  # per pass, over all pods
PASS_BUDGET_SECONDS = 5.0  # no new pod read starts after this; one read is bounded by the API timeout
# A line can be read before its invocation's record is written (the record is written when the
# call ends): such lines wait in memory for the record, at most the longest function timeout and
# this many characters of messages (lines of calls made directly at the Knative URL never get one).
PENDING_SECONDS = 900
MAX_PENDING_CHARS = 4_000_000

Key = tuple[uuid.UUID, object, str]  # (invocation id, time, message): what de-duplicates a line


@dataclass
class _Pending:
    level: str
    count: int
    since: float


@dataclass(frozen=True)
class RecentFunction:
    function_id: int
    tenant: str
    name: str
    invoked: bool = True  # False: only here for lines awaiting their record; its pods are not read


class LogSync:
    """Pulls pod logs for one KnativeEngine. Safe to run from several processes at once: every
    batch is de-duplicated against the stored lines while holding its invocations' rows."""

    def __init__(self, engine, *, window_minutes: float = LOG_PULL_WINDOW, max_functions: int = MAX_FUNCTIONS,
                 max_lines: int = MAX_LINES, budget_seconds: float = PASS_BUDGET_SECONDS):
        self.engine = engine
        self.window_seconds = max(1, int(window_minutes * 60))
        self.max_functions = max_functions
        self.max_lines = max_lines
        self.budget_seconds = budget_seconds
        self.last_read: dict[tuple[str, str], float] = {}  # (namespace, pod) → monotonic start of its last read
        self.pending: dict[int, dict[Key, _Pending]] = {}  # function id → lines awaiting their record
        self._client: KubeClient | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> KubeClient:
        """The engine's API connection without retries: a pass that fails is retried by the next
        pass, and must not hold the worker's database thread through a retry's backoff."""
        if self._client is None:
            base = self.engine.client
            self._client = KubeClient(base.api_client, timeout=base.timeout, retries=0)
        return self._client

    # ---- one pass ------------------------------------------------------------------------------

    def pull(self) -> int:
        """One pass; returns how many lines were stored. A pass already running elsewhere in this
        process makes this one a no-op."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            return self._pull()
        finally:
            self._lock.release()

    def _pull(self) -> int:
        deadline = time.monotonic() + self.budget_seconds
        budget = self.max_lines
        stored = 0
        listed: set[tuple[str, str]] = set()
        for function in self.recent_functions():
            read: list = []
            marks: dict[tuple[str, str], float] = {}
            if function.invoked and budget > 0 and time.monotonic() < deadline:
                try:
                    read = self.read_function(function, budget=budget, deadline=deadline, marks=marks)
                except EngineError as exc:
                    log.warning("listing the pods of %s/%s failed: %s", function.tenant, function.name, exc)
                budget -= len(read)
                listed.update(marks)
            if read or self.pending.get(function.function_id):
                try:
                    stored += self.store(function.function_id, read)
                except Exception:  # noqa: BLE001 - that function's lines are read again next pass
                    log.exception("storing the log lines of %s/%s failed", function.tenant, function.name)
                    continue
            # Only now: lines read but not stored (a database error) are read again next pass.
            self.last_read.update(marks)
        self._forget(listed)
        return stored

    def recent_functions(self) -> list[RecentFunction]:
        """Functions with an invocation in the window, the most recently invoked first (one query)."""
        from django.db.models import Max

        from functions.models import Function

        since = timezone.now() - timedelta(seconds=self.window_seconds)
        rows = (Function.objects.filter(invocations__started_at__gte=since)
                .annotate(last_invoked=Max("invocations__started_at")).order_by("-last_invoked")
                .values_list("pk", "tenant__slug", "name")[:self.max_functions])
        recent = [RecentFunction(pk, tenant, name) for pk, tenant, name in rows]
        # Lines still waiting for a function that dropped out of the window keep being offered.
        ids = {f.function_id for f in recent}
        waiting = [pk for pk in self.pending if pk not in ids]
        if waiting:
            for pk, tenant, name in Function.objects.filter(pk__in=waiting).values_list("pk", "tenant__slug", "name"):
                recent.append(RecentFunction(pk, tenant, name, invoked=False))
            for pk in set(waiting) - {f.function_id for f in recent}:
                self.pending.pop(pk, None)  # the function was deleted
        return recent

    def read_function(self, function: RecentFunction, *, budget: int, deadline: float,
                      marks: dict[tuple[str, str], float]) -> list:
        """The new lines with an invocation id of the function's pods, as parsed LogLines; ``marks``
        gets when each pod read started, for the next read to start there."""
        from .engine import parse_log_line

        namespace = self.engine.namespace(function.tenant)
        selector = f"{names.KNATIVE_SERVICE_LABEL}={names.service(function.name)}"
        lines: list = []
        for pod in self.client.list_pods(namespace, selector):
            if len(lines) >= budget or time.monotonic() >= deadline:
                break
            pod_name = pod["metadata"]["name"]
            key = (namespace, pod_name)
            started = time.monotonic()
            previous = self.last_read.get(key)
            since = self.window_seconds if previous is None else min(
                self.window_seconds, math.ceil(started - previous) + OVERLAP_SECONDS)
            room = budget - len(lines)
            try:
                # A pod that went away answers 404, which the client reads as an empty log.
                text = self.client.pod_log(namespace, pod_name, container=names.USER_CONTAINER,
                                           since_seconds=since, tail_lines=room)
            except EngineError as exc:
                log.warning("reading the log of pod %s/%s failed: %s", namespace, pod_name, exc)
                continue
            raw_lines = text.splitlines()
            if len(raw_lines) < room:
                marks[key] = started
            # else: the budget cut the read to its newest lines; the mark stays, so the next pass
            # reads this pod from where it was (what this pass stored is not stored twice).
            for raw in raw_lines:
                line = parse_log_line(raw, revision=None, instance=pod_name)
                # The shim's start-up lines belong to no invocation.
                if line is not None and line.invocation_id:
                    lines.append(line)
        return lines

    def store(self, function_id: int, lines: list) -> int:
        """Insert the lines (and the waiting ones) whose invocation is a recorded invocation of the
        function, leaving out what is stored already. Three queries, however many lines."""
        now = time.monotonic()
        wanted: dict[Key, _Pending] = {}
        for line in lines:
            try:
                invocation_id = uuid.UUID(str(line.invocation_id))
            except ValueError:
                continue
            # Cleaned before it becomes a key: what is stored is what the next pass compares with.
            key = (invocation_id, line.time.astimezone(UTC), storable(line.message))
            entry = wanted.get(key)
            if entry is None:
                wanted[key] = _Pending(storable(line.level[:10]), 1, now)
            else:
                entry.count += 1
        waiting = self.pending.pop(function_id, {})
        for key, entry in waiting.items():
            # A waiting line read again (the overlap) is the same line, not another one.
            current = wanted.get(key)
            if current is None:
                wanted[key] = entry
            else:
                current.count, current.since = max(current.count, entry.count), entry.since
        if not wanted:
            return 0
        try:
            rows, owners = self._insert(function_id, wanted)
        except Exception:
            if waiting:
                self.pending[function_id] = waiting  # read in earlier passes: not to be lost
            raise
        # No record yet: wait for it. A record of another function: a line that lies about its
        # invocation (the function's code writes these lines), dropped.
        self._hold(function_id, {key: entry for key, entry in wanted.items() if key[0] not in owners}, now)
        return len(rows)

    def _insert(self, function_id: int, wanted: dict[Key, _Pending]) -> tuple[list, dict]:
        """Store the wanted lines of recorded invocations of the function that are not stored yet;
        (the rows inserted, {invocation id: its function id} for the invocations found)."""
        from functions.models import Invocation, InvocationLog

        invocation_ids = sorted({key[0] for key in wanted})
        with transaction.atomic():
            # Locking the invocations (PostgreSQL) orders concurrent pulls of the same lines: the
            # second one sees the first one's rows below. SQLite serialises writers by itself.
            owners = dict(Invocation.objects.select_for_update().filter(pk__in=invocation_ids).order_by("pk")
                          .values_list("pk", "function_id"))
            known = [pk for pk in invocation_ids if owners.get(pk) == function_id]
            rows = []
            if known:
                earliest = min(key[1] for key in wanted if owners.get(key[0]) == function_id)
                stored = collections.Counter(
                    (invocation, when.astimezone(UTC), message) for invocation, when, message in
                    InvocationLog.objects.filter(invocation_id__in=known, time__gte=earliest)
                    .values_list("invocation_id", "time", "message"))
                for key, entry in wanted.items():
                    if owners.get(key[0]) != function_id:
                        continue
                    for _ in range(entry.count - stored[key]):
                        rows.append(InvocationLog(invocation_id=key[0], time=key[1], level=entry.level,
                                                  message=key[2]))
                if rows:
                    InvocationLog.objects.bulk_create(rows)
        return rows, owners

    # ---- memory bounds ------------------------------------------------------------------------------

    def _hold(self, function_id: int, lines: dict[Key, _Pending], now: float) -> None:
        room = MAX_PENDING_CHARS - sum(len(key[2]) for held in self.pending.values() for key in held)
        kept: dict[Key, _Pending] = {}
        # The newest first: an old line's call is the likelier one never to be recorded.
        for key, entry in sorted(lines.items(), key=lambda item: item[0][1], reverse=True):
            if now - entry.since >= PENDING_SECONDS:
                continue
            room -= len(key[2])
            if room < 0:
                log.debug("dropping log lines whose invocation record has not arrived (memory bound)")
                break
            kept[key] = entry
        if kept:
            self.pending[function_id] = kept

    def _forget(self, listed: set[tuple[str, str]]) -> None:
        """Drop the read marks of pods not seen this pass that are older than the window (a pod
        read again later starts from the window, which is where an old mark would start too)."""
        now = time.monotonic()
        for key, started in list(self.last_read.items()):
            if key not in listed and now - started > self.window_seconds:
                del self.last_read[key]
