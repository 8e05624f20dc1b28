"""OTLP export of the stored spans through the OpenTelemetry SDK, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is configured (the built-in span store works without it).

The spans are built after the invocation (from its record and the runtime's span header), so they
are handed to the SDK's batch processor as finished ``ReadableSpan``s with their real ids and times.
"""

from __future__ import annotations

import threading

from django.conf import settings

_lock = threading.Lock()
_processor = None
_processor_endpoint = None
_resources: dict[str, object] = {}


def _endpoint() -> str:
    return (getattr(settings, "OTEL_EXPORTER_OTLP_ENDPOINT", "") or "").rstrip("/")


def processor():
    """The batch processor for the configured endpoint, or None when export is off."""
    global _processor, _processor_endpoint
    endpoint = _endpoint()
    if not endpoint:
        return None
    with _lock:
        if _processor is None or _processor_endpoint != endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            if _processor is not None:
                _processor.shutdown()
            # The variable names the collector's base URL; traces go to its /v1/traces path.
            _processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=5))
            _processor_endpoint = endpoint
        return _processor


def _resource(service_name: str, tenant: str, function: str, namespace: str):
    from opentelemetry.sdk.resources import Resource

    resource = _resources.get(service_name)
    if resource is None:
        if len(_resources) > 5000:
            _resources.clear()
        resource = Resource.create({"service.name": service_name, "service.namespace": namespace,
                                    "nimbus.tenant": tenant, "nimbus.function": function})
        _resources[service_name] = resource
    return resource


def export(spans, identity: dict) -> None:
    """Hand stored spans (observability.models.Span, unsaved is fine) to the exporter.

    ``identity`` maps a function id to (tenant slug, function name, namespace, service name).
    """
    proc = processor()
    if proc is None or not spans:
        return
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

    for span in spans:
        tenant, function, namespace, service = identity[span.function_id]
        trace_id = int(span.trace_id, 16)
        context = SpanContext(trace_id, int(span.span_id, 16), is_remote=False, trace_flags=TraceFlags(1))
        parent = (SpanContext(trace_id, int(span.parent_id, 16), is_remote=True, trace_flags=TraceFlags(1))
                  if span.parent_id else None)
        start_ns = int(span.start.timestamp() * 1_000_000_000)
        attributes = {"nimbus.invocation_id": str(span.invocation_id), "nimbus.span_kind": span.kind}
        for key, value in (span.attributes or {}).items():
            if isinstance(value, (str, bool, int, float)):
                attributes[str(key)] = value
            else:
                attributes[str(key)] = str(value)
        status = Status(StatusCode.ERROR, span.error[:500]) if span.error else Status(StatusCode.UNSET)
        # A caller outside the tenant: its trace is linked to, never joined.
        links = ([Link(SpanContext(int(span.link_trace_id, 16), int(span.link_span_id, 16), is_remote=True,
                                   trace_flags=TraceFlags(1)))]
                 if span.link_trace_id and span.link_span_id else [])
        proc.on_end(ReadableSpan(
            name=span.name, context=context, parent=parent,
            resource=_resource(service, tenant, function, namespace), attributes=attributes,
            kind=SpanKind.SERVER if span.kind == "gateway" else SpanKind.INTERNAL, links=links,
            start_time=start_ns, end_time=start_ns + int(span.duration_ms * 1_000_000), status=status))


def flush(timeout_ms: int = 5000) -> bool:
    proc = processor()
    return True if proc is None else proc.force_flush(timeout_ms)


def shutdown() -> None:
    """Flush and stop the exporter (at exit, or when a test is done with its receiver)."""
    global _processor, _processor_endpoint
    with _lock:
        if _processor is not None:
            _processor.shutdown()
        _processor = _processor_endpoint = None
