"""What the platform keeps to chart, trace and search its functions: per-minute rollups of the
invocation records (with a fixed-bucket latency histogram so percentiles merge over any range) and
the spans of each invocation's trace."""

from django.db import models

# Upper bounds (ms) of the duration histogram; the last bucket is everything slower. Fixed buckets
# are what lets a chart merge minutes into a range by summing columns in the database.
BUCKET_BOUNDS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
BUCKET_FIELDS = tuple(f"b{i}" for i in range(len(BUCKET_BOUNDS_MS) + 1))


class Rollup(models.Model):
    """Counters of one function over one period (the period field is the subclass's)."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="+")
    function = models.ForeignKey("functions.Function", on_delete=models.CASCADE, related_name="+")
    invocations = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    cold_starts = models.PositiveIntegerField(default=0)
    max_instances = models.PositiveIntegerField(default=0)
    duration_ms_sum = models.FloatField(default=0)
    gb_seconds = models.FloatField(default=0)
    b0 = models.PositiveIntegerField(default=0)
    b1 = models.PositiveIntegerField(default=0)
    b2 = models.PositiveIntegerField(default=0)
    b3 = models.PositiveIntegerField(default=0)
    b4 = models.PositiveIntegerField(default=0)
    b5 = models.PositiveIntegerField(default=0)
    b6 = models.PositiveIntegerField(default=0)
    b7 = models.PositiveIntegerField(default=0)
    b8 = models.PositiveIntegerField(default=0)
    b9 = models.PositiveIntegerField(default=0)
    b10 = models.PositiveIntegerField(default=0)
    b11 = models.PositiveIntegerField(default=0)
    b12 = models.PositiveIntegerField(default=0)
    b13 = models.PositiveIntegerField(default=0)
    b14 = models.PositiveIntegerField(default=0)
    b15 = models.PositiveIntegerField(default=0)

    class Meta:
        abstract = True


class MinuteRollup(Rollup):
    """One function's invocations in one UTC minute."""

    minute = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["function", "minute"], name="obs_rollup_function_minute")]
        indexes = [models.Index(fields=["tenant", "minute"], name="obs_rollup_tenant_minute")]

    def __str__(self):
        return f"{self.function_id}@{self.minute:%Y-%m-%d %H:%M}"


class HourRollup(Rollup):
    """One function's invocations in one UTC hour: the week-long charts read 168 of these instead
    of 10,080 minutes."""

    hour = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["function", "hour"], name="obs_rollup_function_hour")]
        indexes = [models.Index(fields=["tenant", "hour"], name="obs_rollup_tenant_hour")]

    def __str__(self):
        return f"{self.function_id}@{self.hour:%Y-%m-%d %H}h"


class Span(models.Model):
    """One span of an invocation's trace: the platform's own (gateway, queue wait, cold start,
    handler) and the function's user-defined ones."""

    class Kind(models.TextChoices):
        GATEWAY = "gateway", "Gateway"
        QUEUE = "queue", "Queue wait"
        COLD_START = "cold_start", "Cold start"
        HANDLER = "handler", "Handler"
        USER = "user", "User-defined"

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="+")
    function = models.ForeignKey("functions.Function", on_delete=models.CASCADE, related_name="+")
    # No foreign key: invocation records are pruned sooner than traces may be kept.
    invocation_id = models.UUIDField(db_index=True)
    trace_id = models.CharField(max_length=32, db_index=True)
    span_id = models.CharField(max_length=16)
    parent_id = models.CharField(max_length=16, blank=True)
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    start = models.DateTimeField(db_index=True)
    duration_ms = models.FloatField(default=0)
    attributes = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    # A caller outside the tenant (anonymous, another tenant's token) that sent a traceparent starts a
    # trace of its own: its span context is kept as an OpenTelemetry span link, never as the parent.
    link_trace_id = models.CharField(max_length=32, blank=True)
    link_span_id = models.CharField(max_length=16, blank=True)

    class Meta:
        ordering = ["start", "id"]

    def __str__(self):
        return f"{self.trace_id}/{self.span_id} {self.name}"
