"""Monitor tab at scale: its server time with a week of per-minute rollups standing for 1,000,000
invocation records per function (ten such functions in the tenant), and the rollup's own cost per
record when real invocation records go through the records writer's hook.

    .venv/bin/python -m bench.monitor_scale [invocations_per_function]
"""

from __future__ import annotations

import random
import statistics
import sys
import time
import uuid
from datetime import timedelta


def make_rollups(function, tenant, per_function: int, now) -> int:
    """A week of minute rows whose invocations add up to ``per_function``, with a latency mix."""
    from observability.ingest import bucket_index
    from observability.models import BUCKET_FIELDS, HourRollup, MinuteRollup

    minutes = 7 * 24 * 60
    base, extra = divmod(per_function, minutes)
    rng = random.Random(function.pk)
    rows = []
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    for i in range(minutes):
        count = base + (1 if i < extra else 0)
        buckets = dict.fromkeys(BUCKET_FIELDS, 0)
        total_ms = 0.0
        # 16 samples stand for the minute's shape; counts are scaled to the minute's total.
        for sample in range(16):
            duration = rng.lognormvariate(3.0, 1.0)  # median ~20 ms, long tail
            share = count // 16 + (1 if sample < count % 16 else 0)
            buckets[BUCKET_FIELDS[bucket_index(duration)]] += share
            total_ms += duration * share
        errors = sum(1 for _ in range(count) if rng.random() < 0.01) if count < 1000 else count // 100
        rows.append(MinuteRollup(tenant=tenant, function=function, minute=start + timedelta(minutes=i),
                                 invocations=count, errors=errors, cold_starts=1 if i % 15 == 0 else 0,
                                 max_instances=rng.randint(1, 4), duration_ms_sum=total_ms,
                                 gb_seconds=total_ms / 1000 * 0.125, **buckets))
    MinuteRollup.objects.bulk_create(rows, batch_size=2000)
    hours: dict = {}
    for row in rows:
        start_of_hour = row.minute.replace(minute=0)
        hour = hours.get(start_of_hour)
        if hour is None:
            hour = hours[start_of_hour] = HourRollup(tenant=tenant, function=function, hour=start_of_hour)
        for field in ("invocations", "errors", "cold_starts", "duration_ms_sum", "gb_seconds", *BUCKET_FIELDS):
            setattr(hour, field, getattr(hour, field) + getattr(row, field))
        hour.max_instances = max(hour.max_instances, row.max_instances)
    HourRollup.objects.bulk_create(hours.values(), batch_size=2000)
    return sum(r.invocations for r in rows)


def timed_get(client, url, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(url)
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    return samples


def ingest_cost(function, records: int) -> float:
    """µs per invocation record for invocations_written (rollup, samples, spans), batches of 500."""
    from django.utils import timezone

    from functions.models import Invocation
    from observability.ingest import invocations_written

    rng = random.Random(7)
    now = timezone.now()
    elapsed = 0.0
    for offset in range(0, records, 500):
        rows = [Invocation(id=uuid.uuid4(), function=function, started_at=now - timedelta(seconds=rng.random() * 600),
                           duration_ms=rng.lognormvariate(3.0, 1.0), status="success", http_status=200,
                           instance=f"i{rng.randint(1, 4)}", queue_ms=0.2, trace_id=uuid.uuid4().hex,
                           billed_gb_seconds=0.001) for _ in range(min(500, records - offset))]
        Invocation.objects.bulk_create(rows)
        started = time.perf_counter()
        invocations_written(rows)
        elapsed += time.perf_counter() - started
    return elapsed / records * 1e6


def main(user, tenant, per_function: int = 1_000_000, functions: int = 10, repeat: int = 20) -> None:
    from django.test import Client
    from django.utils import timezone

    from functions.services import function_create

    print(f"== Monitor tab with {per_function:,} invocations per function in rollups ({functions} functions)")
    now = timezone.now()
    created, total = [], 0
    started = time.perf_counter()
    for n in range(functions):
        function = function_create(acting_user=user, tenant=tenant, name=f"busy-{n}",
                                   files={"handler.py": "def handle(event, context):\n    return 'ok'\n"})
        total += make_rollups(function, tenant, per_function, now)
        created.append(function)
    print(f"   {total:,} invocations as {functions * 7 * 24 * 60:,} minute rows (+ hour rows), "
          f"written in {time.perf_counter() - started:.1f} s")
    client = Client()
    client.force_login(user)
    target = created[0]
    for key in ("15m", "1h", "6h", "24h", "7d"):
        page = timed_get(client, f"/t/{tenant.slug}/f/{target.name}/monitor/?range={key}", repeat)
        api = timed_get(client, f"/api/v1/tenants/{tenant.slug}/functions/{target.name}/metrics?range={key}", repeat)
        overview = timed_get(client, f"/t/{tenant.slug}/monitor/?range={key}", max(repeat // 4, 3))
        print(f"   range {key:>3}: Monitor tab p50 {statistics.median(page):6.1f} ms  max {max(page):6.1f} ms | "
              f"metrics API p50 {statistics.median(api):6.1f} ms | tenant overview p50 "
              f"{statistics.median(overview):6.1f} ms")
    response = client.get(f"/api/v1/tenants/{tenant.slug}/functions/{target.name}/metrics?range=7d").json()
    print(f"   7 d summary of {target.name}: {response['summary']['invocations']:,} invocations, "
          f"p50 {response['summary']['p50_ms']} ms, p95 {response['summary']['p95_ms']} ms, "
          f"p99 {response['summary']['p99_ms']} ms")
    fresh = function_create(acting_user=user, tenant=tenant, name="ingested",
                            files={"handler.py": "def handle(event, context):\n    return 'ok'\n"})
    print(f"   rollup hook: {ingest_cost(fresh, 20_000):.0f} µs per invocation record "
          "(rollup upsert + Prometheus samples + 2 spans, batches of 500)")


if __name__ == "__main__":
    from bench.common import setup_portal

    developer, bench_tenant = setup_portal()
    main(developer, bench_tenant, int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
