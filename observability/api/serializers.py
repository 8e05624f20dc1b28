"""Shapes of the observability API: log lines, spans, and the metrics of a range."""

from rest_framework import serializers

from functions.models import InvocationLog
from observability.models import Span


class LogLineSerializer(serializers.ModelSerializer):
    invocation = serializers.UUIDField(source="invocation_id", read_only=True)
    revision = serializers.IntegerField(source="invocation.revision.number", read_only=True, default=None,
                                        allow_null=True)
    trace_id = serializers.CharField(source="invocation.trace_id", read_only=True)

    class Meta:
        model = InvocationLog
        fields = ["id", "time", "level", "message", "invocation", "revision", "trace_id"]
        read_only_fields = fields


class SpanSerializer(serializers.ModelSerializer):
    function = serializers.CharField(source="function.name", read_only=True)

    class Meta:
        model = Span
        fields = ["trace_id", "span_id", "parent_id", "name", "kind", "function", "invocation_id", "start",
                  "duration_ms", "attributes", "error"]
        read_only_fields = fields


class MetricsSummarySerializer(serializers.Serializer):
    invocations = serializers.IntegerField()
    errors = serializers.IntegerField()
    error_rate = serializers.FloatField()
    cold_starts = serializers.IntegerField()
    max_instances = serializers.IntegerField()
    gb_seconds = serializers.FloatField()
    p50_ms = serializers.FloatField(allow_null=True)
    p95_ms = serializers.FloatField(allow_null=True)
    p99_ms = serializers.FloatField(allow_null=True)
    mean_ms = serializers.FloatField(allow_null=True)


class MetricsSeriesSerializer(serializers.Serializer):
    time = serializers.ListField(child=serializers.DateTimeField())
    invocations = serializers.ListField(child=serializers.IntegerField())
    errors = serializers.ListField(child=serializers.IntegerField())
    cold_starts = serializers.ListField(child=serializers.IntegerField())
    max_instances = serializers.ListField(child=serializers.IntegerField())
    gb_seconds = serializers.ListField(child=serializers.FloatField())
    p50_ms = serializers.ListField(child=serializers.FloatField(allow_null=True))
    p95_ms = serializers.ListField(child=serializers.FloatField(allow_null=True))
    p99_ms = serializers.ListField(child=serializers.FloatField(allow_null=True))
    mean_ms = serializers.ListField(child=serializers.FloatField(allow_null=True))


class MetricsSerializer(serializers.Serializer):
    range = serializers.CharField()
    step_seconds = serializers.IntegerField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    summary = MetricsSummarySerializer()
    series = MetricsSeriesSerializer()


class FunctionTotalsSerializer(serializers.Serializer):
    function = serializers.CharField()
    invocations = serializers.IntegerField()
    errors = serializers.IntegerField()
    error_rate = serializers.FloatField()
    cold_starts = serializers.IntegerField()
    gb_seconds = serializers.FloatField()
    p95_ms = serializers.FloatField(allow_null=True)


class TenantMetricsSerializer(MetricsSerializer):
    functions = FunctionTotalsSerializer(many=True)


class TraceSerializer(serializers.Serializer):
    trace_id = serializers.CharField()
    spans = SpanSerializer(many=True)
