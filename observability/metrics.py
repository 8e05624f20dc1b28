"""The portal's Prometheus exposition: per-function counters and a latency histogram, fed from the
invocation records writer (off the request path) and served at /metrics.

Names and labels sit beside Knative's (deploy/observability/README.md): ``namespace`` and
``service`` carry the same values Knative's ``namespace_name`` / ``service_name`` would.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from observability.models import BUCKET_BOUNDS_MS

LABELS = ("tenant", "namespace", "function", "service", "revision")

registry = CollectorRegistry(auto_describe=True)

invocations_total = Counter(
    "nimbus_function_invocations", "Invocations of a function, by outcome.",
    LABELS + ("status", "response_code_class"), registry=registry)
errors_total = Counter(
    "nimbus_function_errors", "Invocations that did not succeed (handler error, timeout, crash, rejection).",
    LABELS, registry=registry)
cold_starts_total = Counter(
    "nimbus_function_cold_starts", "Invocations that had to start an instance first.", LABELS, registry=registry)
gb_seconds_total = Counter(
    "nimbus_function_gb_seconds", "Billed memory-time (GB-seconds).", LABELS, registry=registry)
duration_seconds = Histogram(
    "nimbus_function_duration_seconds", "Time the handler took (excluding queue wait).", LABELS,
    buckets=tuple(b / 1000 for b in BUCKET_BOUNDS_MS) + (float("inf"),), registry=registry)
queue_seconds = Histogram(
    "nimbus_function_queue_seconds", "Time spent waiting for an instance (including a cold start).", LABELS,
    buckets=(0.001, 0.005, 0.025, 0.1, 0.25, 1, 2.5, 10, float("inf")), registry=registry)
cpu_throttled_seconds_total = Counter(
    "nimbus_function_cpu_throttled_seconds",
    "Time the local engine held instances stopped for using more CPU than their millicores.", LABELS,
    registry=registry)

# Every series name the exposition can contain; the operator kit's tests check dashboards against it.
SERIES = {
    "nimbus_function_invocations_total", "nimbus_function_errors_total", "nimbus_function_cold_starts_total",
    "nimbus_function_gb_seconds_total",
    "nimbus_function_duration_seconds_bucket", "nimbus_function_duration_seconds_sum",
    "nimbus_function_duration_seconds_count",
    "nimbus_function_queue_seconds_bucket", "nimbus_function_queue_seconds_sum",
    "nimbus_function_queue_seconds_count",
    "nimbus_function_cpu_throttled_seconds_total",
}


def observe(labels: dict, *, status: str, http_status: int | None, duration_ms: float, queue_ms: float,
            cold_start: bool, gb_seconds: float) -> None:
    code_class = f"{http_status // 100}xx" if http_status else "none"
    invocations_total.labels(**labels, status=status, response_code_class=code_class).inc()
    if status != "success":
        errors_total.labels(**labels).inc()
    if cold_start:
        cold_starts_total.labels(**labels).inc()
    gb_seconds_total.labels(**labels).inc(gb_seconds)
    duration_seconds.labels(**labels).observe(duration_ms / 1000)
    queue_seconds.labels(**labels).observe(queue_ms / 1000)


def cpu_throttled(labels: dict, seconds: float) -> None:
    cpu_throttled_seconds_total.labels(**labels).inc(seconds)


def exposition() -> bytes:
    return generate_latest(registry)
