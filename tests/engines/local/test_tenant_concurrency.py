"""The tenant quota on concurrent invocations, enforced for gateway calls and queued deliveries."""

import asyncio

import pytest

from functions.engines.concurrency import TenantSlots, tenant_slots
from functions.engines.local.invoke import invoke
from tests.engines.local.conftest import asgi_request
from functions.engines.local.gateway import gateway_app

pytestmark = pytest.mark.django_db(transaction=True)

SLOW = """
import time

def handle(event, context):
    time.sleep(float(event.query.get("sleep", "0")))
    return {"slept": event.query.get("sleep", "0")}
"""


def test_slots_count_per_tenant_and_refuse_at_the_limit():
    slots = TenantSlots()
    assert slots.take(1, 2) and slots.take(1, 2)
    assert not slots.take(1, 2)
    assert slots.take(2, 1)  # another tenant has slots of its own
    slots.give_back(1)
    assert slots.in_flight(1) == 1
    assert slots.take(1, 2)
    assert not slots.take(3, 0)  # a limit of 0 refuses everything
    for _ in range(3):
        slots.give_back(1)
    assert slots.in_flight(1) == 0


def set_limit(tenant, engine, limit):
    tenant.quota.max_concurrent_invocations = limit
    tenant.quota.save()
    engine.routes.invalidate()


def test_gateway_refuses_calls_over_the_tenant_limit_with_429(engine, deploy, tenant):
    deploy("slow", {"handler.py": SLOW}, concurrency=2, max_instances=2)
    set_limit(tenant, engine, 1)

    async def two_at_once():
        first = asyncio.ensure_future(asgi_request(gateway_app, "GET", "/fn/acme/slow/", query="sleep=3"))
        while tenant_slots.in_flight(tenant.pk) == 0 and not first.done():
            await asyncio.sleep(0.01)
        second = await asgi_request(gateway_app, "GET", "/fn/acme/slow/")
        return await first, second

    loop = asyncio.new_event_loop()
    try:
        first, second = loop.run_until_complete(two_at_once())
        assert first.status == 200
        assert second.status == 429
        assert second.json()["code"] == "tenant_concurrency"
        assert "limit of 1 concurrent invocations" in second.json()["detail"]
        assert second.headers["retry-after"] == "1"
        assert tenant_slots.in_flight(tenant.pk) == 0  # the slot came back after the call
        # With the slot free the next call is served; with a higher quota two run side by side.
        assert loop.run_until_complete(asgi_request(gateway_app, "GET", "/fn/acme/slow/")).status == 200
        set_limit(tenant, engine, 2)

        async def both():
            return await asyncio.gather(*(asgi_request(gateway_app, "GET", "/fn/acme/slow/", query="sleep=0.5")
                                          for _ in range(2)))

        assert [r.status for r in loop.run_until_complete(both())] == [200, 200]
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def test_a_queued_delivery_over_the_limit_is_rejected_as_retryable(engine, deploy, tenant):
    deploy("slow", {"handler.py": SLOW})
    set_limit(tenant, engine, 1)
    loop = asyncio.new_event_loop()
    try:
        assert tenant_slots.take(tenant.pk, 1)  # another call of the tenant is running
        try:
            refused = loop.run_until_complete(invoke(engine, tenant="acme", name="slow"))
        finally:
            tenant_slots.give_back(tenant.pk)
        assert (refused.status, refused.outcome, refused.retryable) == (429, "rejected", True)
        assert "limit of 1" in refused.error
        served = loop.run_until_complete(invoke(engine, tenant="acme", name="slow"))
        assert (served.status, served.outcome) == (200, "success")
        assert tenant_slots.in_flight(tenant.pk) == 0
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
