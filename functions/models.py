"""Functions, their draft source, immutable revisions, traffic, configuration and invocations."""

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone
from guardian.models import GroupObjectPermissionBase, UserObjectPermissionBase

from tenancy.models import Tenant

# A DNS-1035 label short enough that "<function>-<5-digit revision>" and the tenant prefix fit
# the 63-character limits Kubernetes puts on names.
function_name_validator = RegexValidator(
    r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$",
    "Use 1-40 lowercase letters, digits or hyphens, starting with a letter and not ending with a hyphen.",
)
env_name_validator = RegexValidator(
    r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
    "Use letters, digits and underscores, not starting with a digit.",
)
tag_validator = RegexValidator(
    r"^[a-z]([a-z0-9-]{0,18}[a-z0-9])?$",
    "Use 1-20 lowercase letters, digits or hyphens, starting with a letter.",
)


class Runtime(models.TextChoices):
    PYTHON = "python3.11", "Python 3.11"
    NODE = "node20", "Node.js 20"


class Function(models.Model):
    class State(models.TextChoices):
        DRAFT = "draft", "Draft"
        DEPLOYED = "deployed", "Deployed"
        OFFLINE = "offline", "Offline"

    class InvokeAuth(models.TextChoices):
        PUBLIC = "public", "Public"
        TOKEN = "token", "API token with the invoke scope"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="functions")
    name = models.CharField(max_length=40, validators=[function_name_validator])
    runtime = models.CharField(max_length=16, choices=Runtime.choices, default=Runtime.PYTHON)
    handler = models.CharField(max_length=100, default="handler.handle",
                               help_text="module.function (Python) or file.export (Node)")
    description = models.CharField(max_length=500, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.DRAFT)

    memory_mb = models.PositiveIntegerField(default=256, validators=[MinValueValidator(64), MaxValueValidator(32768)])
    cpu_millicores = models.PositiveIntegerField(default=500, validators=[MinValueValidator(50), MaxValueValidator(32000)])
    gpus = models.PositiveIntegerField(default=0, validators=[MaxValueValidator(8)])
    timeout_seconds = models.PositiveIntegerField(default=30, validators=[MinValueValidator(1), MaxValueValidator(900)])
    concurrency = models.PositiveIntegerField(
        default=1, validators=[MaxValueValidator(1000)],
        help_text="Requests one instance serves at once (0 = unlimited), like Knative's containerConcurrency.")
    min_instances = models.PositiveIntegerField(default=0, validators=[MaxValueValidator(100)])
    max_instances = models.PositiveIntegerField(default=5, validators=[MinValueValidator(1), MaxValueValidator(1000)])
    invoke_auth = models.CharField(max_length=16, choices=InvokeAuth.choices, default=InvokeAuth.PUBLIC)
    allow_egress = models.BooleanField(default=False, help_text="Let instances open network connections.")
    debug = models.BooleanField(default=False, help_text="Show handler tracebacks in error responses.")

    source_version = models.PositiveIntegerField(default=1)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant__slug", "name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="function_unique_name")]
        permissions = [
            ("deploy_function", "Can deploy the function and change its traffic"),
            ("share_function", "Can grant other users access to the function"),
        ]

    def __str__(self):
        return f"{self.tenant.slug}/{self.name}"

    def clean(self):
        from django.core.exceptions import ValidationError

        if self.min_instances > self.max_instances:
            raise ValidationError({"min_instances": "Min instances cannot exceed max instances."})


class FunctionUserObjectPermission(UserObjectPermissionBase):
    content_object = models.ForeignKey(Function, on_delete=models.CASCADE)


class FunctionGroupObjectPermission(GroupObjectPermissionBase):
    content_object = models.ForeignKey(Function, on_delete=models.CASCADE)


class SourceFile(models.Model):
    """One file of a function's draft. The draft as a whole carries Function.source_version."""

    function = models.ForeignKey(Function, on_delete=models.CASCADE, related_name="files")
    path = models.CharField(max_length=255)
    content = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["path"]
        constraints = [models.UniqueConstraint(fields=["function", "path"], name="sourcefile_unique_path")]

    def __str__(self):
        return self.path


class Revision(models.Model):
    """An immutable snapshot of a function's source and configuration, as deployed."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DEPLOYING = "deploying", "Deploying"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"

    function = models.ForeignKey(Function, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    content_hash = models.CharField(max_length=64)
    files = models.JSONField()
    config = models.JSONField()
    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                               related_name="+")
    message = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    status_message = models.TextField(blank=True)
    deployed_at = models.DateTimeField(null=True, blank=True)

    IMMUTABLE_FIELDS = ("function_id", "number", "content_hash", "files", "config")

    class Meta:
        ordering = ["function", "-number"]
        constraints = [models.UniqueConstraint(fields=["function", "number"], name="revision_unique_number")]

    def __str__(self):
        return f"{self.function}@{self.number}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            stored = Revision.objects.filter(pk=self.pk).values(*self.IMMUTABLE_FIELDS).first()
            if stored and any(stored[f] != getattr(self, f) for f in self.IMMUTABLE_FIELDS):
                raise ValueError("A revision's source and configuration are immutable.")
        super().save(*args, **kwargs)


class TrafficTarget(models.Model):
    function = models.ForeignKey(Function, on_delete=models.CASCADE, related_name="traffic")
    revision = models.ForeignKey(Revision, on_delete=models.CASCADE, related_name="traffic")
    percent = models.PositiveSmallIntegerField(validators=[MaxValueValidator(100)])
    tag = models.CharField(max_length=20, blank=True, validators=[tag_validator])

    class Meta:
        ordering = ["-percent", "revision__number"]
        constraints = [
            models.UniqueConstraint(fields=["function", "revision"], name="traffic_unique_revision"),
        ]

    def __str__(self):
        return f"{self.function}: {self.revision.number} {self.percent}%"


class EnvVar(models.Model):
    function = models.ForeignKey(Function, on_delete=models.CASCADE, related_name="env_vars")
    name = models.CharField(max_length=128, validators=[env_name_validator])
    value = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["function", "name"], name="envvar_unique_name")]

    def __str__(self):
        return self.name


class Secret(models.Model):
    """A secret value, encrypted at rest (functions/crypto.py); never shown after it is written."""

    function = models.ForeignKey(Function, on_delete=models.CASCADE, related_name="secrets")
    name = models.CharField(max_length=128, validators=[env_name_validator])
    ciphertext = models.TextField()
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["function", "name"], name="secret_unique_name")]

    def __str__(self):
        return self.name


class Invocation(models.Model):
    """One call of a function, like an OpenWhisk activation."""

    class Status(models.TextChoices):
        SUCCESS = "success", "Success"
        ERROR = "error", "Handler error"
        TIMEOUT = "timeout", "Timed out"
        CRASHED = "crashed", "Instance died"
        REJECTED = "rejected", "Rejected (saturated)"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    function = models.ForeignKey(Function, on_delete=models.CASCADE, related_name="invocations")
    revision = models.ForeignKey(Revision, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    instance = models.CharField(max_length=64, blank=True)
    started_at = models.DateTimeField(db_index=True)
    duration_ms = models.FloatField(default=0)
    status = models.CharField(max_length=16, choices=Status.choices)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    cold_start = models.BooleanField(default=False)
    init_ms = models.FloatField(default=0)
    queue_ms = models.FloatField(default=0)
    billed_gb_seconds = models.FloatField(default=0)
    trace_id = models.CharField(max_length=32, blank=True)
    error = models.TextField(blank=True)
    trigger = models.CharField(max_length=16, default="http")

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["function", "-started_at"])]

    def __str__(self):
        return f"{self.function_id}:{self.id}"


class InvocationLog(models.Model):
    invocation = models.ForeignKey(Invocation, on_delete=models.CASCADE, related_name="logs")
    time = models.DateTimeField()
    level = models.CharField(max_length=10, default="INFO")
    message = models.TextField()

    class Meta:
        ordering = ["time", "id"]


# ---- triggers, the durable delivery queue and sequences (issue 6) ---------------------------------

trigger_name_validator = RegexValidator(
    r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$",
    "Use 1-40 lowercase letters, digits or hyphens, starting with a letter and not ending with a hyphen.",
)


class Trigger(models.Model):
    """What starts a function besides its HTTP route: a cron schedule or matching CloudEvents."""

    class Kind(models.TextChoices):
        HTTP = "http", "HTTP (the function's route)"
        CRON = "cron", "Cron schedule"
        EVENT = "event", "CloudEvents"

    function = models.ForeignKey(Function, on_delete=models.CASCADE, related_name="triggers")
    name = models.CharField(max_length=40, validators=[trigger_name_validator])
    kind = models.CharField(max_length=8, choices=Kind.choices)
    enabled = models.BooleanField(default=True)
    schedule = models.CharField(max_length=120, blank=True, help_text="Cron expression (cron triggers).")
    time_zone = models.CharField(max_length=64, default="UTC", help_text="IANA time zone of the schedule.")
    next_run_at = models.DateTimeField(null=True, blank=True, db_index=True)
    # [{"attribute": "type", "value": "com.example.order.created", "match": "exact" | "prefix"}, …]
    filters = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["function", "name"]
        constraints = [models.UniqueConstraint(fields=["function", "name"], name="trigger_unique_name")]
        indexes = [models.Index(fields=["kind", "enabled", "next_run_at"])]

    def __str__(self):
        return f"{self.function}:{self.name} ({self.kind})"


class RetryPolicy(models.Model):
    """How the queue retries a function's async, cron, event and sequence deliveries, and where the
    results of its async calls go when the caller names no callback."""

    function = models.OneToOneField(Function, on_delete=models.CASCADE, related_name="retry_policy")
    max_attempts = models.PositiveIntegerField(default=3, validators=[MinValueValidator(1), MaxValueValidator(100)])
    backoff_seconds = models.FloatField(default=1.0, validators=[MinValueValidator(0.0), MaxValueValidator(3600)])
    backoff_max_seconds = models.FloatField(default=300.0, validators=[MinValueValidator(0.0),
                                                                       MaxValueValidator(86400)])
    max_event_age_seconds = models.PositiveIntegerField(default=86400, validators=[MinValueValidator(1)])
    # Set by the function's developers: only an authenticated caller may name a callback per call, so
    # this is how a public function's anonymous callers get their results posted somewhere.
    callback_url = models.URLField(max_length=2000, blank=True)

    def __str__(self):
        return f"retry policy of {self.function}"


class Sequence(models.Model):
    """Functions of one tenant run one after another, each one's output the next one's input."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="sequences")
    name = models.CharField(max_length=40, validators=[trigger_name_validator])
    description = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["tenant", "name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="sequence_unique_name")]

    def __str__(self):
        return f"{self.tenant.slug}/{self.name}"


class SequenceStep(models.Model):
    sequence = models.ForeignKey(Sequence, on_delete=models.CASCADE, related_name="steps")
    position = models.PositiveIntegerField()
    function = models.ForeignKey(Function, on_delete=models.CASCADE, related_name="sequence_steps")

    class Meta:
        ordering = ["sequence", "position"]
        constraints = [models.UniqueConstraint(fields=["sequence", "position"], name="sequencestep_unique_position")]


class Delivery(models.Model):
    """One durable queue item: a request to deliver to a function, retried until it succeeds or
    becomes a dead letter. Stored before the caller is answered, so it survives restarts."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        DEAD = "dead", "Dead letter"
        DISCARDED = "discarded", "Discarded"

    class Source(models.TextChoices):
        ASYNC = "async", "Async call"
        CRON = "cron", "Cron trigger"
        EVENT = "event", "CloudEvent"
        SEQUENCE = "sequence", "Sequence step"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    function = models.ForeignKey(Function, on_delete=models.CASCADE, related_name="deliveries")
    source = models.CharField(max_length=16, choices=Source.choices)
    trigger = models.ForeignKey(Trigger, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    sequence = models.ForeignKey(Sequence, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    step = models.PositiveIntegerField(default=0)
    # The first delivery of a sequence run; every step of the run points at it.
    run_id = models.UUIDField(null=True, blank=True, db_index=True)
    tag = models.CharField(max_length=20, blank=True)
    method = models.CharField(max_length=10, default="POST")
    path = models.CharField(max_length=2000, default="/")
    headers = models.JSONField(default=list)  # [[name, value], …]
    body = models.BinaryField(default=b"")
    callback_url = models.URLField(max_length=2000, blank=True)

    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    available_at = models.DateTimeField(default=timezone.now)
    lease_until = models.DateTimeField(null=True, blank=True)
    leased_by = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    invocation_id = models.UUIDField(null=True, blank=True)
    result_status = models.PositiveSmallIntegerField(null=True, blank=True)
    result_headers = models.JSONField(default=list, blank=True)
    result_body = models.BinaryField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    callback_status = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["state", "available_at"]),
            models.Index(fields=["function", "state", "-created_at"]),
        ]

    def __str__(self):
        return f"{self.function_id}:{self.id} ({self.state})"

    @property
    def trace_id(self) -> str:
        """The W3C trace this delivery continues (from its traceparent header), or ""."""
        value = next((str(v) for k, v in self.headers or [] if str(k).lower() == "traceparent"), "")
        parts = value.split("-")
        return parts[1].lower() if len(parts) == 4 and len(parts[1]) == 32 else ""
