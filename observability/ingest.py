"""Turns each batch the invocation records writer stores into rollups, Prometheus samples and
trace spans. Runs on the writer's thread, never on the request path.

A batch holds many tenants' spans, and functions name their own spans and attributes: text the
database cannot store (NUL, lone surrogates) is cleaned, values JSON cannot carry are made text, and
a batch the database still refuses is written row by row, so one bad span never costs the others."""

from __future__ import annotations

import bisect
import json
import logging
import math
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone as dt_timezone

from django.conf import settings
from django.db import IntegrityError, OperationalError, transaction
from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone

from functions.engines.local.records import insert_rows
from observability import identity, metrics, tracing
from observability.models import BUCKET_BOUNDS_MS, BUCKET_FIELDS, HourRollup, MinuteRollup, Span
from portal.text import storable

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 300.0
QUEUE_SPAN_MIN_MS = 1.0
WRITE_ATTEMPTS = 3
MAX_ATTRIBUTES = 64  # of one user span; OpenTelemetry's default limit is 128
MAX_ATTRIBUTE_CHARS = 1000
HEX = frozenset("0123456789abcdef")
_last_prune = 0.0


def retention() -> dict:
    configured = getattr(settings, "NIMBUS_OBSERVABILITY", {}) or {}
    return {"SPAN_DAYS": float(configured.get("SPAN_DAYS", 7)),
            "ROLLUP_DAYS": float(configured.get("ROLLUP_DAYS", 35))}


def bucket_index(duration_ms: float) -> int:
    return bisect.bisect_left(BUCKET_BOUNDS_MS, duration_ms)


def _identities(function_ids, revision_ids) -> tuple[dict[int, tuple], dict[int, int]]:
    """({function id: (tenant id, tenant slug, name, namespace, service)}, {revision id: number}):
    two queries a batch (not cached, so a deleted and re-created function is never mislabelled)."""
    from functions.models import Function, Revision

    functions = {pk: (tenant_id, slug, name, identity.namespace_for(slug), identity.service_for(name))
                 for pk, tenant_id, slug, name in Function.objects.filter(pk__in=function_ids).values_list(
                     "pk", "tenant_id", "tenant__slug", "name")}
    revisions = dict(Revision.objects.filter(pk__in=[r for r in revision_ids if r]).values_list("pk", "number"))
    return functions, revisions


def invocations_written(rows, traces: dict | None = None) -> None:
    """Account for freshly stored invocations (functions.models.Invocation instances).

    ``traces`` maps an invocation id to what the gateway learnt about its trace: the caller's span,
    the gateway's span id, the handler's span id, the total time and the runtime's user spans.
    """
    if not rows:
        return
    traces = traces or {}
    ids, revisions = _identities({r.function_id for r in rows}, {r.revision_id for r in rows})
    rows = [r for r in rows if r.function_id in ids]
    for row in rows:
        tenant_id, slug, name, namespace, service = ids[row.function_id]
        revision = revisions.get(row.revision_id)
        metrics.observe({"tenant": slug, "namespace": namespace, "function": name, "service": service,
                         "revision": identity.revision_for(name, revision) if revision else ""},
                        status=row.status, http_status=row.http_status, duration_ms=row.duration_ms,
                        queue_ms=row.queue_ms, cold_start=row.cold_start, gb_seconds=row.billed_gb_seconds)
    spans = []
    for row in rows:
        try:
            spans.extend(storable_span(span) for span in spans_for(
                row, ids[row.function_id][0], traces.get(str(row.id)) or {}, ids[row.function_id][2]))
        except Exception:  # noqa: BLE001 - one invocation's trace must not cost the batch its rollups
            log.exception("the spans of invocation %s could not be read; it is kept without them", row.id)
    for attempt in range(WRITE_ATTEMPTS):
        try:
            # All or nothing, so a retry after a transient lock error cannot count a batch twice.
            with transaction.atomic():
                _roll_up(rows, ids, traces)
            break
        except OperationalError:
            if attempt == WRITE_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * 2 ** attempt)
    # Apart from the rollups: a span the database refuses costs only itself (row by row), never the
    # counts, nor the other invocations' and tenants' spans.
    spans = insert_rows(Span, spans) if spans else []
    if spans:
        try:
            tracing.export(spans, {f: (v[1], v[2], v[3], identity.trace_service_for(v[1], v[2]))
                                   for f, v in ids.items()})
        except Exception:  # noqa: BLE001 - the exporter is the operator's; the store already has the spans
            log.exception("handing spans to the OTLP exporter failed")
    prune_if_due()


def _roll_up(rows, ids, traces: dict) -> None:
    for model, period, truncate in ((MinuteRollup, "minute", {"second": 0, "microsecond": 0}),
                                    (HourRollup, "hour", {"minute": 0, "second": 0, "microsecond": 0})):
        _roll_up_into(model, period, truncate, rows, ids, traces)


def _roll_up_into(model, period: str, truncate: dict, rows, ids, traces: dict) -> None:
    groups: dict[tuple, dict] = {}
    instances: dict[tuple, set] = defaultdict(set)
    pool_sizes: dict[tuple, int] = defaultdict(int)
    for row in rows:
        key = (row.function_id, row.started_at.replace(**truncate))
        group = groups.setdefault(key, dict.fromkeys(
            ("invocations", "errors", "cold_starts", "duration_ms_sum", "gb_seconds", *BUCKET_FIELDS), 0))
        group["invocations"] += 1
        group["errors"] += row.status != "success"
        group["cold_starts"] += bool(row.cold_start)
        group["duration_ms_sum"] += row.duration_ms
        group["gb_seconds"] += row.billed_gb_seconds
        group[BUCKET_FIELDS[bucket_index(row.duration_ms)]] += 1
        if row.instance:
            instances[key].add(row.instance)
        trace = traces.get(str(row.id)) or {}
        pool_sizes[key] = max(pool_sizes[key], int(trace.get("instances") or 0))
    for (function_id, start), deltas in groups.items():
        # The revision's pool size as calls finished (the gateway reports it); for records without
        # it, the distinct instances of the batch, a lower bound.
        seen = max(pool_sizes[(function_id, start)], len(instances[(function_id, start)]))
        changes = {field: F(field) + value for field, value in deltas.items() if value}
        changes["max_instances"] = Greatest("max_instances", seen)
        target = model.objects.filter(function_id=function_id, **{period: start})
        if target.update(**changes):
            continue
        try:
            with transaction.atomic():
                model.objects.create(tenant_id=ids[function_id][0], function_id=function_id, max_instances=seen,
                                     **{period: start}, **deltas)
        except IntegrityError:
            target.update(**changes)  # another process created the row first


def _span_id(value: str = "") -> str:
    """``value`` when it is a span id (16 hex digits), else a new one."""
    value = value.lower()
    return value if len(value) == 16 and HEX.issuperset(value) else f"{uuid.uuid4().int >> 64:016x}"


def _trace_link(trace: dict) -> tuple[str, str]:
    """(trace id, span id) the gateway linked the call to (a caller outside the tenant), or ("", "")."""
    link = trace.get("link")
    if isinstance(link, (list, tuple)) and len(link) == 2:
        trace_id, span_id = (str(part).lower() for part in link)
        if len(trace_id) == 32 and len(span_id) == 16 and HEX.issuperset(trace_id + span_id):
            return trace_id, span_id
    return "", ""


def _attribute(value):
    """One attribute value as OpenTelemetry and the JSON column take it: str, bool, int, finite
    float; anything else as text."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -2 ** 63 <= value < 2 ** 63 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)[:MAX_ATTRIBUTE_CHARS]
    return storable(text[:MAX_ATTRIBUTE_CHARS])


def storable_attributes(attributes) -> dict:
    if not isinstance(attributes, dict):
        return {}
    return {storable(str(key)[:200]): _attribute(value) for key, value in list(attributes.items())[:MAX_ATTRIBUTES]}


def storable_span(span: Span) -> Span:
    """``span`` with its text fit for any database: NUL and lone surrogates replaced, attributes flat
    and JSON-safe (PostgreSQL's jsonb refuses NaN and \\u0000)."""
    span.name = storable(span.name)[:200]
    span.error = storable(span.error)
    span.attributes = storable_attributes(span.attributes)
    return span


def _float(value, default: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return number if math.isfinite(number) else default


def spans_for(row, tenant_id: int, trace: dict, function_name: str = "") -> list[Span]:
    """The spans of one invocation: gateway → queue wait (→ cold start) → handler → user spans."""
    if not row.trace_id:
        return []
    common = {"tenant_id": tenant_id, "function_id": row.function_id, "invocation_id": row.id,
              "trace_id": row.trace_id}
    gateway_id = _span_id(trace.get("gateway_span", ""))
    total_ms = float(trace.get("total_ms") or (row.queue_ms + row.duration_ms))
    start = row.started_at
    failed = row.error if row.status != "success" else ""
    link_trace, link_span = _trace_link(trace)
    spans = [Span(**common, span_id=gateway_id, parent_id=trace.get("caller_span", "")[:16],
                  name=f"{row.trigger} {function_name or row.function_id}", kind=Span.Kind.GATEWAY, start=start,
                  duration_ms=total_ms, error=failed[:2000], link_trace_id=link_trace, link_span_id=link_span,
                  attributes={"status": row.status, "http.status_code": row.http_status or 0,
                              "cold_start": row.cold_start, "instance": row.instance})]
    # A warm call's sub-millisecond wait is noise in a waterfall and a third of the rows stored.
    if row.queue_ms >= QUEUE_SPAN_MIN_MS or row.cold_start:
        queue_id = _span_id()
        spans.append(Span(**common, span_id=queue_id, parent_id=gateway_id, name="queue wait",
                          kind=Span.Kind.QUEUE, start=start, duration_ms=row.queue_ms))
        if row.cold_start and row.init_ms:
            init_ms = min(row.init_ms, row.queue_ms)
            spans.append(Span(**common, span_id=_span_id(), parent_id=queue_id, name="cold start",
                              kind=Span.Kind.COLD_START,
                              start=start + timedelta(milliseconds=row.queue_ms - init_ms), duration_ms=init_ms,
                              attributes={"instance": row.instance}))
    # The handler ran on an instance; on Knative the portal cannot name the pod, but the shim's
    # traceparent (handler_span) says the handler ran.
    if row.instance or trace.get("handler_span"):
        handler_id = _span_id(trace.get("handler_span", ""))
        handler_start = start + timedelta(milliseconds=row.queue_ms)
        spans.append(Span(**common, span_id=handler_id, parent_id=gateway_id, name="handler",
                          kind=Span.Kind.HANDLER, start=handler_start, duration_ms=row.duration_ms,
                          error=failed[:2000], attributes={"instance": row.instance}))
        try:
            user_spans = json.loads(trace.get("spans_json") or "[]")
        except ValueError:
            user_spans = []
        for user in user_spans if isinstance(user_spans, list) else []:
            if not isinstance(user, dict):
                continue
            try:
                user_start = datetime.fromisoformat(str(user.get("start")))
                if user_start.tzinfo is None:
                    user_start = user_start.replace(tzinfo=dt_timezone.utc)
                # In UTC: PostgreSQL refuses some offsets Python accepts (beyond ±15:59).
                user_start = user_start.astimezone(dt_timezone.utc)
            except (TypeError, ValueError, OverflowError):
                user_start = handler_start
            parent = str(user.get("parent_id") or "").lower()
            spans.append(Span(**common, span_id=_span_id(str(user.get("span_id", ""))),
                              parent_id=parent if len(parent) == 16 and HEX.issuperset(parent) else handler_id,
                              name=str(user.get("name", "span"))[:200], kind=Span.Kind.USER, start=user_start,
                              duration_ms=max(0.0, _float(user.get("duration_ms"))),
                              attributes=storable_attributes(user.get("attributes")),
                              error=str(user.get("error") or "")[:2000]))
    return spans


def prune_if_due(force: bool = False) -> None:
    """Drop spans and rollups past their retention (rollups outlive the raw records on purpose)."""
    global _last_prune
    now = time.monotonic()
    if not force and now - _last_prune < PRUNE_INTERVAL:
        return
    _last_prune = now
    limits = retention()
    Span.objects.filter(start__lt=timezone.now() - timedelta(days=limits["SPAN_DAYS"])).delete()
    MinuteRollup.objects.filter(minute__lt=timezone.now() - timedelta(days=limits["ROLLUP_DAYS"])).delete()
    HourRollup.objects.filter(hour__lt=timezone.now() - timedelta(days=limits["ROLLUP_DAYS"])).delete()
