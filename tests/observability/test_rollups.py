"""Per-minute rollups from invocation records: counts, the fixed-bucket histogram and percentiles
merged over ranges, instances, GB-seconds, the tenant overview, and retention."""

from datetime import timedelta

import pytest

from observability import ingest
from observability.models import BUCKET_BOUNDS_MS, MinuteRollup
from observability.selectors import function_metrics, percentile, tenant_metrics

pytestmark = pytest.mark.django_db


def test_bucket_index_puts_bounds_in_their_own_bucket():
    assert ingest.bucket_index(0.2) == 0
    assert ingest.bucket_index(1) == 0
    assert ingest.bucket_index(1.01) == 1
    assert ingest.bucket_index(60000) == len(BUCKET_BOUNDS_MS) - 1
    assert ingest.bucket_index(90000) == len(BUCKET_BOUNDS_MS)


def test_percentile_interpolates_inside_the_bucket():
    buckets = [0] * (len(BUCKET_BOUNDS_MS) + 1)
    buckets[6] = 100  # all in (50, 100] ms
    assert percentile(buckets, 0.5) == pytest.approx(75)
    assert percentile(buckets, 0.99) == pytest.approx(99.5)
    assert percentile([0] * len(buckets), 0.5) is None
    slow = [0] * len(buckets)
    slow[-1] = 3
    assert percentile(slow, 0.5) == BUCKET_BOUNDS_MS[-1]


def test_batches_add_up_in_one_row_per_minute(function, record, minute):
    first = [record(minute + timedelta(seconds=1), 3, cold_start=True, instance="i1"),
             record(minute + timedelta(seconds=2), 40, instance="i1"),
             record(minute + timedelta(seconds=3), 700, status="error", instance="i2")]
    ingest.invocations_written(first)
    ingest.invocations_written([record(minute + timedelta(seconds=4), 40, instance="i1")])
    row = MinuteRollup.objects.get(function=function, minute=minute)
    assert (row.invocations, row.errors, row.cold_starts, row.max_instances) == (4, 1, 1, 2)
    late = record(minute + timedelta(seconds=5), 40, instance="i1")
    ingest.invocations_written([late], {str(late.id): {"instances": 3}})  # the pool's size, from the gateway
    row.refresh_from_db()
    assert row.max_instances == 3
    assert row.duration_ms_sum == pytest.approx(823)
    assert row.gb_seconds == pytest.approx(0.125 * 0.823)
    assert (row.b2, row.b5, row.b9) == (1, 3, 1)  # (2,5], (25,50], (500,1000]
    assert row.tenant_id == function.tenant_id


def test_function_metrics_merge_minutes_into_steps(function, record, minute):
    for offset in range(3):  # three minutes, 10 calls each
        ingest.invocations_written([record(minute - timedelta(minutes=offset) + timedelta(seconds=s), 10 + offset)
                                    for s in range(10)])
    old = record(minute - timedelta(hours=3), 5)
    ingest.invocations_written([old])
    data = function_metrics(function, "15m", now=minute + timedelta(seconds=30))
    assert data["summary"]["invocations"] == 30
    assert data["summary"]["errors"] == 0
    assert sum(data["series"]["invocations"]) == 30
    assert len(data["series"]["time"]) == 15
    assert data["series"]["invocations"][-1] == 10
    assert 5 < data["summary"]["p50_ms"] <= 25
    wide = function_metrics(function, "6h")
    assert wide["summary"]["invocations"] == 31
    assert wide["step_seconds"] == 300
    assert function_metrics(function, "nonsense")["range"] == "1h"


def test_tenant_metrics_sum_visible_functions(tenant, members, function, record, minute):
    from functions.services import function_create

    other = function_create(acting_user=members["developer"], tenant=tenant, name="other", starter="hello")
    ingest.invocations_written([record(minute, 10), record(minute, 20, status="error"),
                                record(minute, 30, function=other)])
    data = tenant_metrics(tenant, "1h")
    assert data["summary"]["invocations"] == 3 and data["summary"]["errors"] == 1
    rows = {r["function"]: r for r in data["functions"]}
    assert rows["hello"]["invocations"] == 2 and rows["other"]["invocations"] == 1
    only_other = tenant_metrics(tenant, "1h", functions=[other.pk])
    assert only_other["summary"]["invocations"] == 1


def test_spans_follow_the_invocation(function, record, minute):
    row = record(minute, 80, cold_start=True, init_ms=30, queue_ms=35, instance="inst-1")
    trace = {"caller_span": "b7ad6b7169203331", "gateway_span": "1111111111111111", "handler_span": "2222222222222222",
             "total_ms": 120.0,
             "spans_json": '[{"name": "work", "span_id": "3333333333333333", "parent_id": "2222222222222222",'
                           ' "start": "%s", "duration_ms": 5, "attributes": {"size": 3}}]'
                           % (minute + timedelta(milliseconds=40)).isoformat()}
    ingest.invocations_written([row], {str(row.id): trace})
    from observability.models import Span

    spans = {s.kind: s for s in Span.objects.filter(invocation_id=row.id)}
    assert set(spans) == {"gateway", "queue", "cold_start", "handler", "user"}
    assert spans["gateway"].parent_id == "b7ad6b7169203331" and spans["gateway"].duration_ms == 120
    assert spans["queue"].parent_id == spans["gateway"].span_id
    assert spans["cold_start"].parent_id == spans["queue"].span_id
    assert spans["handler"].span_id == "2222222222222222"
    assert spans["user"].parent_id == "2222222222222222" and spans["user"].attributes == {"size": 3}
    assert {s.trace_id for s in spans.values()} == {row.trace_id}


def test_retention_prunes_old_spans_and_rollups(function, record, minute, settings):
    settings.NIMBUS_OBSERVABILITY = {"SPAN_DAYS": 1, "ROLLUP_DAYS": 2}
    ingest.invocations_written([record(minute - timedelta(days=3), 5), record(minute - timedelta(hours=30), 5),
                                record(minute, 5)])
    ingest.prune_if_due(force=True)
    from observability.models import Span

    assert MinuteRollup.objects.filter(function=function).count() == 2
    assert Span.objects.filter(function=function).count() == 1


def test_warm_call_without_a_real_wait_has_no_queue_span(function, record, minute):
    from observability.models import Span

    row = record(minute, 8, queue_ms=0.2, instance="inst-1")
    ingest.invocations_written([row])
    assert sorted(Span.objects.filter(invocation_id=row.id).values_list("kind", flat=True)) == ["gateway", "handler"]
