"""The gateway's route table: which revisions of which function take traffic, read from the
database (TrafficTarget + Revision + Function) and cached, so requests do not query it."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

from django.db import DatabaseError, close_old_connections, connections

from portal.errors import DatabaseBusy

UNLIMITED = 1 << 30  # a tenant without a quota row


@dataclass(frozen=True)
class Target:
    revision: int
    revision_id: int
    percent: int
    tag: str


@dataclass
class Route:
    function_id: int
    tenant: str
    tenant_id: int
    name: str
    invoke_auth: str
    offline: bool
    memory_mb: int
    targets: list[Target] = field(default_factory=list)
    # The tenant's quota on calls running at once (in this process); see functions/engines/concurrency.py.
    max_concurrent: int = UNLIMITED

    def pick(self, tag: str | None = None, rng=random) -> Target | None:
        """The revision for one request: the tagged one, or a weighted draw by percent."""
        if tag:
            return next((t for t in self.targets if t.tag == tag), None)
        weighted = [t for t in self.targets if t.percent > 0]
        if not weighted:
            return None
        point = rng.random() * sum(t.percent for t in weighted)
        for target in weighted:
            point -= target.percent
            if point < 0:
                return target
        return weighted[-1]


class RouteTable:
    def __init__(self, ttl: float = 3.0):
        self.ttl = ttl
        self.routes: dict[tuple[str, str], Route] = {}
        self.loaded_at = 0.0
        self.lock = threading.Lock()
        # Until the database shows a deploy's traffic (written after engine.deploy returns), reload often.
        self.eager_until = 0.0
        # After the database had no connection to give, the table is not reloaded before this moment:
        # the requests meanwhile are served from the table as it is, not each kept waiting for the pool.
        self.unavailable_until = 0.0
        self.on_load = None  # called with the fresh routes (the engine retires unrouted revisions)

    def invalidate(self, *, eager_seconds: float = 0.0) -> None:
        self.loaded_at = 0.0
        if eager_seconds:
            self.eager_until = max(self.eager_until, time.monotonic() + eager_seconds)

    def _stale(self) -> bool:
        age = time.monotonic() - self.loaded_at
        if time.monotonic() < self.eager_until:
            return age > 0.2
        return age > self.ttl

    def refresh(self, force: bool = False) -> None:
        with self.lock:
            if force or self._stale():
                if not force and time.monotonic() < self.unavailable_until:
                    raise DatabaseBusy()
                try:
                    routes = self._load()
                except DatabaseError as exc:
                    if not DatabaseBusy.caused(exc):
                        raise
                    self.unavailable_until = time.monotonic() + DatabaseBusy.retry_after
                    raise DatabaseBusy() from exc
                self.routes = routes
                self.loaded_at = time.monotonic()
                if self.on_load is not None:
                    self.on_load(self.routes)

    def _load(self) -> dict[tuple[str, str], Route]:
        from functions.models import Function, Revision, TrafficTarget
        from tenancy.models import Tenant

        routes: dict[tuple[str, str], Route] = {}
        rows = (TrafficTarget.objects
                .filter(revision__status=Revision.Status.READY)
                .values_list("function_id", "function__name", "function__tenant__slug", "function__tenant_id",
                             "function__tenant__status", "function__invoke_auth", "function__state",
                             "function__memory_mb", "revision__number", "revision_id", "percent", "tag",
                             "function__tenant__quota__max_concurrent_invocations"))
        for (function_id, name, tenant, tenant_id, tenant_status, auth, state, memory, number, revision_id,
             percent, tag, max_concurrent) in rows:
            if tenant_status != Tenant.Status.ACTIVE:
                continue  # a suspended tenant's functions do not answer
            route = routes.get((tenant, name))
            if route is None:
                route = routes[(tenant, name)] = Route(
                    function_id=function_id, tenant=tenant, tenant_id=tenant_id, name=name, invoke_auth=auth,
                    offline=state == Function.State.OFFLINE, memory_mb=memory,
                    max_concurrent=UNLIMITED if max_concurrent is None else max_concurrent)
            route.targets.append(Target(revision=number, revision_id=revision_id, percent=percent, tag=tag))
        return routes

    def get(self, tenant: str, name: str) -> Route | None:
        self.refresh()
        return self.routes.get((tenant, name))

    async def aget(self, tenant: str, name: str) -> Route | None:
        if self._stale():
            try:
                await asyncio.to_thread(with_own_connection, self.refresh)
            except DatabaseBusy:
                # A route the table knows keeps serving while the database is busy; one it does not
                # know may exist by now, so that request is told to retry (503), not 404.
                if (tenant, name) not in self.routes:
                    raise
        return self.routes.get((tenant, name))


def with_own_connection(fn, *args):
    """Run ``fn`` in a worker thread of the event loop, leaving no database connection open there.
    A database with no connection to give (every one of the pool's in use) raises DatabaseBusy."""
    close_old_connections()
    try:
        return fn(*args)
    except DatabaseError as exc:
        if DatabaseBusy.caused(exc):
            raise DatabaseBusy() from exc
        raise
    finally:
        connections.close_all()
