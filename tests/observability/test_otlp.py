"""OTLP export: with OTEL_EXPORTER_OTLP_ENDPOINT set, an invocation's spans reach a local HTTP
receiver as an OTLP/protobuf ExportTraceServiceRequest with their ids, parents and service."""

import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from observability import ingest, tracing

pytestmark = pytest.mark.django_db


class Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append((self.path, self.headers.get("Content-Type"), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    tracing.shutdown()
    server.shutdown()
    server.server_close()


def test_spans_are_exported_over_otlp_http(receiver, settings, function, record, minute):
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = f"http://127.0.0.1:{receiver.server_address[1]}"
    row = record(minute, 40, cold_start=True, init_ms=10, queue_ms=12, instance="inst-9", status="error",
                 error="the handler raised an exception (see the logs)",
                 trace_id="0af7651916cd43dd8448eb211c80319c")
    user_start = (minute + timedelta(milliseconds=15)).isoformat()
    ingest.invocations_written([row], {str(row.id): {
        "caller_span": "b7ad6b7169203331", "gateway_span": "00f067aa0ba902b7", "handler_span": "1234567890abcdef",
        "total_ms": 60,
        "spans_json": f'[{{"name": "db", "span_id": "fedcba0987654321", "parent_id": "1234567890abcdef", '
                      f'"start": "{user_start}", "duration_ms": 4, "attributes": {{"rows": 2}}}}]'}})
    assert tracing.flush()
    assert Receiver.received, "nothing reached the receiver"
    path, content_type, body = Receiver.received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    spans, services = {}, set()
    for _, _, payload in Receiver.received:
        request = ExportTraceServiceRequest()
        request.ParseFromString(payload)
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            services.add((attrs["service.name"], attrs["service.namespace"], attrs["nimbus.tenant"]))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans[span.name] = span
    assert services == {("hello.nimbus-acme", "nimbus-acme", "acme")}
    assert set(spans) == {"http hello", "queue wait", "cold start", "handler", "db"}
    assert {s.trace_id.hex() for s in spans.values()} == {"0af7651916cd43dd8448eb211c80319c"}
    gateway = spans["http hello"]
    assert gateway.span_id.hex() == "00f067aa0ba902b7" and gateway.parent_span_id.hex() == "b7ad6b7169203331"
    assert gateway.status.code == 2  # STATUS_CODE_ERROR
    assert gateway.end_time_unix_nano - gateway.start_time_unix_nano == 60_000_000
    assert spans["handler"].parent_span_id.hex() == "00f067aa0ba902b7"
    assert spans["db"].parent_span_id.hex() == "1234567890abcdef"
    assert {a.key: a.value.int_value for a in spans["db"].attributes if a.key == "rows"} == {"rows": 2}


def test_no_endpoint_no_export(settings):
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = ""
    assert tracing.processor() is None


def test_a_linked_trace_is_exported_with_its_span_link(receiver, settings, function, record, minute):
    """A call from outside the tenant starts its own trace; the caller's span context travels as an
    OpenTelemetry span link (tests/observability/test_trace_links.py), not as the parent."""
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = f"http://127.0.0.1:{receiver.server_address[1]}"
    row = record(minute, 5, trace_id="11111111111111111111111111111111")
    ingest.invocations_written([row], {str(row.id): {
        "caller_span": "", "gateway_span": "00f067aa0ba902b7",
        "link": ["4bf92f3577b34da6a3ce929d0e0e4736", "b7ad6b7169203331"]}})
    assert tracing.flush()
    exported = []
    for _, _, payload in Receiver.received:
        request = ExportTraceServiceRequest()
        request.ParseFromString(payload)
        exported += [s for r in request.resource_spans for ss in r.scope_spans for s in ss.spans]
    (gateway,) = [s for s in exported if s.span_id.hex() == "00f067aa0ba902b7"]
    assert gateway.trace_id.hex() == "11111111111111111111111111111111" and gateway.parent_span_id == b""
    assert [(link.trace_id.hex(), link.span_id.hex()) for link in gateway.links] == [
        ("4bf92f3577b34da6a3ce929d0e0e4736", "b7ad6b7169203331")]
