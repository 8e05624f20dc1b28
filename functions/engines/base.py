"""The Engine protocol: what the portal asks of an engine, in plain data (no ORM objects).

Two implementations: ``local`` (functions/engines/local, processes on this machine) and
``knative`` (functions/engines/knative, Kubernetes). Services build the specs below from models
and call the engine after their transaction commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class TenantSpec:
    slug: str
    isolation: str = "shared"  # shared | sandboxed | dedicated
    # Quota limits (tenancy.Quota fields), for engines that enforce them (Knative ResourceQuota).
    quota: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FunctionRef:
    tenant: str
    name: str
    function_id: int
    tenant_id: int = 0  # the local engine runs each tenant's processes as a host uid of its own


@dataclass(frozen=True)
class RevisionSpec:
    """Everything an engine needs to run one revision."""

    function: FunctionRef
    number: int
    revision_id: int
    content_hash: str
    runtime: str  # python3.11 | node20
    handler: str  # "module.function" (Python) or "file.export" (Node)
    files: dict[str, str]
    memory_mb: int = 256
    cpu_millicores: int = 500
    gpus: int = 0
    timeout_seconds: int = 30
    concurrency: int = 1  # 0 = unlimited
    min_instances: int = 0
    max_instances: int = 5
    env: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # decrypted; never log
    allow_egress: bool = False
    debug: bool = False
    tenant: TenantSpec | None = None

    def __repr__(self):  # keep secret values out of logs and tracebacks
        return f"RevisionSpec({self.function.tenant}/{self.function.name}@{self.number})"


@dataclass(frozen=True)
class TrafficSpec:
    revision: int  # revision number
    percent: int
    tag: str = ""


@dataclass(frozen=True)
class DeployEvent:
    """One step of a deploy, as the IDE shows it.

    ``step``: frozen | dependencies | instance | health | traffic | done (engines may add more).
    ``status``: running | ok | failed. ``output``: installer or instance output, when any.
    """

    step: str
    status: str
    message: str = ""
    output: str = ""


@dataclass
class RevisionStatus:
    revision: int
    ready: bool
    percent: int = 0
    tag: str = ""
    instances: int = 0
    url: str | None = None


@dataclass
class FunctionStatus:
    ready: bool
    url: str | None = None
    latest_ready_revision: int | None = None
    revisions: list[RevisionStatus] = field(default_factory=list)
    offline: bool = False
    message: str = ""


@dataclass
class LogLine:
    time: datetime
    message: str
    level: str = "INFO"
    revision: int | None = None
    invocation_id: str | None = None
    instance: str | None = None


@dataclass
class InvokeResult:
    """What one call through ``Engine.invoke`` gave: the function's answer and how it went."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    invocation_id: str = ""
    # success | error | timeout | crashed | rejected | unavailable (the Invocation statuses, plus
    # "unavailable" when nothing routes to the function, which records no invocation)
    outcome: str = "success"
    error: str = ""

    @property
    def retryable(self) -> bool:
        """Whether another attempt may succeed: the platform or the handler failed, or the function
        was busy; a handler's own 4xx answer is its result."""
        return self.outcome != "success" or self.status >= 500 or self.status in (408, 429)


ProgressCallback = Callable[[DeployEvent], None]


@runtime_checkable
class Engine(Protocol):
    name: str
    # Whether the engine fires cron triggers itself (Knative: PingSources in the cluster). When it
    # does, the portal's delivery worker leaves them alone, so a schedule runs once per slot.
    runs_cron: bool

    def ensure_tenant(self, tenant: TenantSpec) -> None:
        """Create or update what the tenant needs (a namespace and quota on Knative)."""

    def deploy(self, spec: RevisionSpec, *, traffic: list[TrafficSpec], progress: ProgressCallback) -> None:
        """Make the revision runnable and then route ``traffic``. Raises EngineError on failure,
        leaving the traffic that was serving before untouched."""

    def set_traffic(self, function: FunctionRef, traffic: list[TrafficSpec]) -> None:
        """Route requests between already deployed revisions."""

    def set_offline(self, function: FunctionRef, offline: bool) -> None:
        """Stop serving (and release instances) or serve again."""

    def delete(self, function: FunctionRef) -> None:
        """Remove everything the engine holds for the function. Absent is not an error."""

    def status(self, function: FunctionRef) -> FunctionStatus:
        ...

    def logs(self, function: FunctionRef, *, revision: int | None = None, since: datetime | None = None,
             follow: bool = False, limit: int = 500) -> Iterator[LogLine]:
        ...

    async def invoke(self, *, tenant: str, name: str, tag: str = "", method: str = "POST", path: str = "/",
                     headers: list[tuple[str, str]] | None = None, body: bytes = b"", trigger: str = "async",
                     invocation_id: uuid.UUID | None = None) -> InvokeResult:
        """One call of ``tenant/name`` (the ``tag``ged revision, or the routed traffic split) from the
        platform itself: the delivery queue's async calls, CloudEvents, cron runs and sequence steps.
        Leaves an invocation record with ``trigger``; a function that does not answer is an outcome
        of the result, not an exception."""
        ...

    def sync_triggers(self, function: FunctionRef, triggers: list[dict], *, policy=None) -> None:
        """Make the engine's own trigger objects match the function's enabled ``triggers`` (plain
        dicts: name, kind, schedule, time_zone, filters), with ``policy``'s retries. Engines whose
        triggers the portal's worker runs from the database do nothing."""

    def sync_sequence(self, tenant: str, name: str, functions: list[str] | None, *, policy=None) -> None:
        """Make the engine's object for a sequence of ``functions`` (names, in order), or remove it
        when ``functions`` is None. A no-op where the portal's worker runs sequences."""

    # Optional capability (not a member above, so engines without it still satisfy the protocol;
    # see LogPulling): an engine whose function log lines do not reach the portal's log store by
    # themselves has ``pull_logs()``, which the delivery worker calls every ``log_pull_seconds``.


@runtime_checkable
class LogPulling(Protocol):
    """An engine that brings function log lines into the portal's log store (InvocationLog rows)
    only when asked: Knative, whose lines are in its pods. ``log_pull_seconds`` 0 turns it off."""

    log_pull_seconds: float

    def pull_logs(self) -> int:
        """One pass: store the new log lines of recently invoked functions; returns how many.
        Blocking (HTTP and database), so never on an event loop. Safe to run in several processes."""
        ...
