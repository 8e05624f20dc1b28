"""Reads of metrics, traces and logs. Who may see a function is decided by the functions and
tenancy selectors first; these then read only that function's (or tenant's) rows. Charts read the
per-minute rollups, never the raw invocation records."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone as dt_timezone

from django.db.models import Max, Q, QuerySet, Sum
from django.utils import timezone

from functions.models import Function, Invocation, InvocationLog
from functions.selectors import functions_for_user
from observability.models import BUCKET_BOUNDS_MS, BUCKET_FIELDS, HourRollup, MinuteRollup, Span
from portal.errors import NotFound


@dataclass(frozen=True)
class TimeRange:
    key: str
    label: str
    span: timedelta
    step: timedelta


RANGES = {r.key: r for r in (
    TimeRange("15m", "15 min", timedelta(minutes=15), timedelta(minutes=1)),
    TimeRange("1h", "1 hour", timedelta(hours=1), timedelta(minutes=1)),
    TimeRange("6h", "6 hours", timedelta(hours=6), timedelta(minutes=5)),
    TimeRange("24h", "24 hours", timedelta(hours=24), timedelta(minutes=15)),
    TimeRange("7d", "7 days", timedelta(days=7), timedelta(hours=1)),
)}
DEFAULT_RANGE = "1h"
SUM_FIELDS = ("invocations", "errors", "cold_starts", "duration_ms_sum", "gb_seconds", *BUCKET_FIELDS)


def time_range(key: str | None) -> TimeRange:
    return RANGES.get(key or "", RANGES[DEFAULT_RANGE])


def _source(window: TimeRange, now: datetime) -> tuple:
    """(rollup model, its period field, the earliest period start to read) for a range: hour rows
    once a step is an hour or more, minute rows below that."""
    if window.step >= timedelta(hours=1):
        return HourRollup, "hour", now - window.span - timedelta(hours=1)
    return MinuteRollup, "minute", now - window.span - timedelta(minutes=1)


def percentile(buckets: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a fixed-bucket histogram, interpolated inside its bucket."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index >= len(BUCKET_BOUNDS_MS):
                return float(BUCKET_BOUNDS_MS[-1])  # slower than the last bound: all we know
            low = BUCKET_BOUNDS_MS[index - 1] if index else 0.0
            high = BUCKET_BOUNDS_MS[index]
            return round(low + (high - low) * (rank - seen) / count, 3)
        seen += count
    return float(BUCKET_BOUNDS_MS[-1])


def _series(rows, window: TimeRange, now: datetime, period: str = "minute") -> dict:
    """Merge minute rows into the range's steps: one point per step, empty steps included."""
    step_seconds = int(window.step.total_seconds())
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - window.span
    first = int(start.timestamp()) // step_seconds * step_seconds
    count = (int(end.timestamp()) - first + step_seconds - 1) // step_seconds
    points = [{"totals": dict.fromkeys(SUM_FIELDS, 0), "max_instances": 0} for _ in range(count)]
    for row in rows:
        index = (int(row[period].timestamp()) - first) // step_seconds
        if 0 <= index < count:
            point = points[index]
            for field in SUM_FIELDS:
                point["totals"][field] += row[field] or 0
            point["max_instances"] = max(point["max_instances"], row["max_instances"] or 0)
    totals = dict.fromkeys(SUM_FIELDS, 0)
    for point in points:
        for field in SUM_FIELDS:
            totals[field] += point["totals"][field]
    labels, invocations, errors, cold, instances, gb, p50, p95, p99, mean = ([] for _ in range(10))
    for index, point in enumerate(points):
        t = point["totals"]
        buckets = [t[f] for f in BUCKET_FIELDS]
        labels.append(datetime.fromtimestamp(first + index * step_seconds, tz=dt_timezone.utc).isoformat())
        invocations.append(t["invocations"])
        errors.append(t["errors"])
        cold.append(t["cold_starts"])
        instances.append(point["max_instances"])
        gb.append(round(t["gb_seconds"], 6))
        p50.append(percentile(buckets, 0.50))
        p95.append(percentile(buckets, 0.95))
        p99.append(percentile(buckets, 0.99))
        mean.append(round(t["duration_ms_sum"] / t["invocations"], 3) if t["invocations"] else None)
    buckets = [totals[f] for f in BUCKET_FIELDS]
    summary = {
        "invocations": totals["invocations"], "errors": totals["errors"], "cold_starts": totals["cold_starts"],
        "error_rate": round(totals["errors"] / totals["invocations"], 4) if totals["invocations"] else 0.0,
        "gb_seconds": round(totals["gb_seconds"], 6),
        "max_instances": max(instances) if instances else 0,
        "p50_ms": percentile(buckets, 0.50), "p95_ms": percentile(buckets, 0.95), "p99_ms": percentile(buckets, 0.99),
        "mean_ms": round(totals["duration_ms_sum"] / totals["invocations"], 3) if totals["invocations"] else None,
    }
    return {"range": window.key, "step_seconds": step_seconds, "start": start.isoformat(), "end": end.isoformat(),
            "summary": summary,
            "series": {"time": labels, "invocations": invocations, "errors": errors, "cold_starts": cold,
                       "max_instances": instances, "gb_seconds": gb, "p50_ms": p50, "p95_ms": p95,
                       "p99_ms": p99, "mean_ms": mean}}


def function_metrics(function: Function, range_key: str | None = None, *, now: datetime | None = None) -> dict:
    """Charts and totals of one function over a range, from its minute rollups."""
    window = time_range(range_key)
    now = now or timezone.now()
    model, period, since = _source(window, now)
    rows = model.objects.filter(function=function, **{f"{period}__gte": since}).values(
        period, "max_instances", *SUM_FIELDS)
    return _series(rows, window, now, period)


def tenant_metrics(tenant, range_key: str | None = None, *, functions=None, now: datetime | None = None) -> dict:
    """The tenant's functions together over a range (minutes summed in the database), and a row per
    function with its totals. ``functions`` is what the user may see (from functions_for_user)."""
    window = time_range(range_key)
    now = now or timezone.now()
    model, period, since = _source(window, now)
    base = model.objects.filter(tenant=tenant, **{f"{period}__gte": since})
    if functions is not None:
        base = base.filter(function__in=functions)
    rows = (base.values(period).order_by(period)
            .annotate(max_instances=Max("max_instances"), **{f: Sum(f) for f in SUM_FIELDS}))
    result = _series(rows, window, now, period)
    per_function = []
    for row in (base.values("function_id", "function__name").order_by("function__name")
                .annotate(**{f: Sum(f) for f in SUM_FIELDS})):
        buckets = [row[f] or 0 for f in BUCKET_FIELDS]
        per_function.append({
            "function": row["function__name"], "invocations": row["invocations"], "errors": row["errors"],
            "cold_starts": row["cold_starts"], "gb_seconds": round(row["gb_seconds"] or 0, 6),
            "p95_ms": percentile(buckets, 0.95),
            "error_rate": round(row["errors"] / row["invocations"], 4) if row["invocations"] else 0.0})
    result["functions"] = per_function
    return result


def recent_invocations(function: Function, limit: int = 20) -> list[Invocation]:
    return list(Invocation.objects.filter(function=function).select_related("revision")
                .defer("revision__files", "revision__config").order_by("-started_at")[:limit])


def trace_for_user(user, tenant, trace_id: str) -> list[Span]:
    """The spans of one trace that belong to functions the user may see in this tenant (404 if none)."""
    trace_id = (trace_id or "").lower()
    visible = functions_for_user(user, tenant=tenant).values("pk")
    spans = list(Span.objects.filter(trace_id=trace_id, tenant=tenant, function__in=visible)
                 .select_related("function").order_by("start", "id"))
    if not spans:
        raise NotFound("Trace not found.")
    return spans


def spans_of_trace(function: Function, trace_id: str) -> list[Span]:
    """One trace's spans of this function (the function was resolved through its selector)."""
    return list(Span.objects.filter(function=function, trace_id=trace_id).order_by("start", "id"))


def traces_for_function(function: Function) -> QuerySet[Span]:
    """The root (gateway) span of each stored trace of the function, newest first."""
    return Span.objects.filter(function=function, kind=Span.Kind.GATEWAY).order_by("-start", "-id")


@dataclass
class LogQuery:
    since: datetime | None = None
    until: datetime | None = None
    revision: int | None = None
    invocation: str = ""
    level: str = ""
    text: str = ""


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def logs_for_function(function: Function, query: LogQuery) -> QuerySet[InvocationLog]:
    """The function's stored log lines matching the query, newest first."""
    qs = InvocationLog.objects.filter(invocation__function=function).select_related(
        "invocation", "invocation__revision").defer("invocation__revision__files", "invocation__revision__config")
    if query.since:
        qs = qs.filter(time__gte=query.since)
    if query.until:
        qs = qs.filter(time__lte=query.until)
    if query.revision:
        qs = qs.filter(invocation__revision__number=query.revision)
    if query.invocation:
        qs = qs.filter(invocation_id=query.invocation)
    if query.level:
        level = query.level.upper()
        # A level shows itself and everything more severe, like a logger's threshold.
        wanted = LEVELS[LEVELS.index(level):] if level in LEVELS else (level,)
        qs = qs.filter(level__in=wanted)
    if query.text:
        qs = qs.filter(Q(message__icontains=query.text))
    return qs.order_by("-time", "-id")
