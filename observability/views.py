"""Observability pages: a function's Monitor tab, its log search, a trace's waterfall, the tenant
overview, and the Prometheus exposition at /metrics."""

from __future__ import annotations

import hashlib
import hmac

from django.conf import settings
from django.core.paginator import Paginator
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from functions.selectors import functions_for_user
from functions.views import function_context, function_page
from observability import metrics, panels, selectors
from observability.forms import LogSearchForm
from tenancy.views import tenant_context, tenant_page

LOGS_PAGE_SIZE = 100
TRACES_SHOWN = 20
RECENT_LOG_LINES = 15


def _range_choices(current: str) -> list[dict]:
    return [{"key": r.key, "label": r.label, "active": r.key == current} for r in selectors.RANGES.values()]


@function_page
def function_monitor(request, function):
    window = selectors.time_range(request.GET.get("range"))
    data = selectors.function_metrics(function, window.key)
    embedded = panels.panels_for(settings, tenant_slug=function.tenant.slug, function_name=function.name,
                                 range_key=window.key)
    traces = list(selectors.traces_for_function(function)[:TRACES_SHOWN])
    latest_rows, latest_ms = [], 0.0
    if traces:
        latest_rows, latest_ms = _waterfall(selectors.spans_of_trace(function, traces[0].trace_id))
    response = render(request, "observability/monitor.html", function_context(
        request, function, "monitor", metrics=data, ranges=_range_choices(window.key), range=window,
        invocations=selectors.recent_invocations(function), traces=traces, panels=embedded,
        rows=latest_rows, total_ms=latest_ms,
        logs=list(selectors.logs_for_function(function, selectors.LogQuery())[:RECENT_LOG_LINES])))
    response["Content-Security-Policy"] = panels.content_security_policy(settings)
    return response


@function_page
def function_logs(request, function):
    form = LogSearchForm(request.GET or None)
    query = form.query()
    page = Paginator(selectors.logs_for_function(function, query), LOGS_PAGE_SIZE).get_page(request.GET.get("page"))
    params = request.GET.copy()
    params.pop("page", None)
    return render(request, "observability/logs.html", function_context(
        request, function, "logs", form=form, page=page, filtered=bool(request.GET.dict().keys() - {"page"}),
        querystring=params.urlencode(),
        # The live tail is the IDE's: same consumer, same "logs" action.
        ws_path=f"/ws/ide/{function.tenant.slug}/{function.name}/?presence=0"))


def _waterfall(spans) -> tuple[list[dict], float]:
    """Rows in tree order with each bar's offset and width as % of the whole trace."""
    start = min(s.start for s in spans)
    end = max(s.start.timestamp() + s.duration_ms / 1000 for s in spans)
    total_ms = max((end - start.timestamp()) * 1000, 0.001)
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list] = {}
    roots = []
    for span in spans:
        if span.parent_id and span.parent_id in by_id and span.parent_id != span.span_id:
            children.setdefault(span.parent_id, []).append(span)
        else:
            roots.append(span)
    rows, seen = [], set()

    def walk(span, depth):
        if span.span_id in seen:
            return
        seen.add(span.span_id)
        offset = (span.start - start).total_seconds() * 1000
        rows.append({"span": span, "depth": depth, "offset_ms": offset,
                     "left": round(100 * offset / total_ms, 3),
                     "width": max(round(100 * span.duration_ms / total_ms, 3), 0.3)})
        for child in children.get(span.span_id, []):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return rows, total_ms


@tenant_page
def trace_detail(request, tenant, trace_id):
    spans = selectors.trace_for_user(request.user, tenant, trace_id)
    rows, total_ms = _waterfall(spans)
    function = spans[0].function
    jaeger = settings.JAEGER_URL
    return render(request, "observability/trace.html", tenant_context(
        request.user, tenant, "monitor", trace_id=trace_id.lower(), rows=rows, total_ms=total_ms, function=function,
        invocation_id=spans[0].invocation_id,
        linked_from=next((s.link_trace_id for s in spans if s.link_trace_id), ""),
        jaeger_url=panels.jaeger_trace_url(jaeger, trace_id.lower()) if panels.origin(jaeger) else ""))


@tenant_page
def tenant_monitor(request, tenant):
    window = selectors.time_range(request.GET.get("range"))
    visible = functions_for_user(request.user, tenant=tenant)
    data = selectors.tenant_metrics(tenant, window.key, functions=visible.values("pk"))
    return render(request, "observability/tenant.html", tenant_context(
        request.user, tenant, "monitor", metrics=data, ranges=_range_choices(window.key), range=window))


def _metrics_refusal(request) -> HttpResponse | None:
    """Why this request may not read /metrics (a response to send), or None when it may.

    The exposition names every tenant's functions, so it is only public on a development install
    (DEBUG): otherwise it needs NIMBUS_METRICS_TOKEN set (the deploy check warns when it is not)
    and that token as ``Authorization: Bearer <token>``."""
    token = getattr(settings, "NIMBUS_METRICS_TOKEN", "") or ""
    if not token:
        if settings.DEBUG:
            return None
        return JsonResponse({"code": "permission_denied",
                             "detail": "/metrics is closed: set NIMBUS_METRICS_TOKEN and scrape with "
                                       "Authorization: Bearer <token>."}, status=403)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Digests of equal length, compared in constant time: neither the token nor its length shows.
    if scheme.lower() == "bearer" and hmac.compare_digest(
            hashlib.sha256(given.strip().encode("utf-8", "surrogatepass")).digest(),
            hashlib.sha256(token.encode()).digest()):
        return None
    return JsonResponse({"code": "unauthenticated", "detail": "/metrics needs Authorization: Bearer <token>."},
                        status=401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})


@require_GET
def metrics_view(request):
    """Prometheus text exposition, for ``Authorization: Bearer <NIMBUS_METRICS_TOKEN>`` (open without a
    token only when DEBUG is on)."""
    refusal = _metrics_refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(metrics.exposition(), content_type="text/plain; version=0.0.4; charset=utf-8")
