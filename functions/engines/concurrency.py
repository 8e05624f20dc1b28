"""The tenant quota on concurrent invocations, counted per portal process.

Every call that reaches a function through the portal (the gateway, queued deliveries) takes a slot of
its tenant for as long as it runs; when the tenant's ``max_concurrent_invocations`` slots are all taken
the call is refused with 429 (a queued delivery is retried by its policy). With several portal
processes each one counts its own calls, so the limit holds per process.
"""

from __future__ import annotations

import threading

from functions.engines.base import InvokeResult


class TenantSlots:
    """In-flight calls per tenant. Used from the gateway's event loop and the worker's, hence the lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}

    def take(self, tenant_id: int, limit: int) -> bool:
        """Take a slot; False (and nothing taken) when the tenant already has ``limit`` calls running."""
        with self._lock:
            running = self._in_flight.get(tenant_id, 0)
            if running >= limit:
                return False
            self._in_flight[tenant_id] = running + 1
            return True

    def give_back(self, tenant_id: int) -> None:
        with self._lock:
            running = self._in_flight.get(tenant_id, 0) - 1
            if running > 0:
                self._in_flight[tenant_id] = running
            else:
                self._in_flight.pop(tenant_id, None)

    def in_flight(self, tenant_id: int) -> int:
        return self._in_flight.get(tenant_id, 0)


async def routed_call(engine, tenant: str, name: str, tag: str, call):
    """A queued call's common part on either engine: route it (404 "unavailable" when nothing
    serves), hold a slot of its tenant (429 "rejected" at the quota) and run ``call(route, target)``."""
    route = await engine.routes.aget(tenant, name)
    if route is None or route.offline:
        return InvokeResult(404, outcome="unavailable", error=f"{tenant}/{name} is not deployed or is offline")
    target = route.pick(tag or None)
    if target is None:
        return InvokeResult(404, outcome="unavailable",
                            error=f"no revision is tagged '{tag}'" if tag else "no revision takes traffic")
    if not tenant_slots.take(route.tenant_id, route.max_concurrent):
        return InvokeResult(429, outcome="rejected", error=refusal(route.tenant, route.max_concurrent))
    try:
        return await call(route, target)
    finally:
        tenant_slots.give_back(route.tenant_id)


def refusal(tenant: str, limit: int) -> str:
    return (f"Tenant {tenant} is running its limit of {limit} concurrent invocations; "
            "try again shortly or ask an operator to raise the quota.")


tenant_slots = TenantSlots()  # this process's count, shared by the gateway and the delivery worker
