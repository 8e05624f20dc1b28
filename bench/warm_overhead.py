"""Warm overhead: the same warm instance called through the gateway and directly on its unix
socket, at concurrency 1 and 50: latency p50/p99 and the throughput ratio."""

from __future__ import annotations

import asyncio
import time

from bench.common import create_and_deploy, gateway_request, percentile, use_engine

HELLO = {"handler.py": "def handle(event, context):\n    return 'Hello!'\n"}


async def _measure(call, concurrency: int, total: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    remaining = total

    async def worker():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, total / (time.perf_counter() - started)


def main(user, tenant, requests: int = 2000) -> dict:
    from functions.engines.local import client

    print(f"== warm overhead ({requests} requests per run)")
    engine = use_engine(idle_seconds=600, queue_limit=1000)
    # One instance that takes every request (unlimited concurrency), so both paths hit the same process;
    # a whole-machine CPU setting, so the CPU throttle (a function's own limit) does not pace either path.
    _, revision = create_and_deploy(user, tenant, "warm", HELLO, concurrency=0, max_instances=1, min_instances=1,
                                    cpu_millicores=32000)
    pool = engine.pool_for(revision.pk)
    figures = {}

    async def run():
        status, _, _ = await gateway_request("/fn/bench/warm/")
        assert status == 200
        inst = next(iter(pool.instances.values()))

        async def direct():
            status, _, _ = await client.call(inst, "GET", "/", [("X-Nimbus-Invocation-Id", "bench")], b"")
            assert status == 200

        async def via_gateway():
            status, _, _ = await gateway_request("/fn/bench/warm/")
            assert status == 200

        for concurrency in (1, 50):
            await _measure(direct, concurrency, 200)  # warm both paths' connections
            await _measure(via_gateway, concurrency, 200)
            d_lat, d_rps = await _measure(direct, concurrency, requests)
            g_lat, g_rps = await _measure(via_gateway, concurrency, requests)
            print(f"  c={concurrency:<3d} direct   p50 {percentile(d_lat, 50):6.2f} ms  p99 {percentile(d_lat, 99):6.2f} ms"
                  f"  {d_rps:8.0f} req/s")
            print(f"  c={concurrency:<3d} gateway  p50 {percentile(g_lat, 50):6.2f} ms  p99 {percentile(g_lat, 99):6.2f} ms"
                  f"  {g_rps:8.0f} req/s")
            print(f"  c={concurrency:<3d} gateway overhead p50 {percentile(g_lat, 50) - percentile(d_lat, 50):+.2f} ms, "
                  f"throughput ratio gateway/direct {g_rps / d_rps:.2f}")
            figures[concurrency] = {"direct": (d_lat, d_rps), "gateway": (g_lat, g_rps)}

    asyncio.run(run())
    engine.records.flush()
    engine.shutdown()
    return figures


if __name__ == "__main__":
    from bench.common import setup_portal

    main(*setup_portal())
