"""Input and output shapes for triggers, the retry policy, deliveries (async calls, dead letters)
and sequences."""

from rest_framework import serializers

from functions.models import Delivery, RetryPolicy, Sequence, Trigger
from functions.triggers import cron
from portal.api.inputs import ClosedInputSerializer


class FilterSerializer(serializers.Serializer):
    attribute = serializers.CharField(help_text="type, source, subject or an extension name")
    value = serializers.CharField()
    match = serializers.ChoiceField(choices=["exact", "prefix"], default="exact")


class TriggerSerializer(serializers.ModelSerializer):
    filters = FilterSerializer(many=True, read_only=True)
    next_runs = serializers.SerializerMethodField(help_text="The next five run times of a cron trigger")

    class Meta:
        model = Trigger
        fields = ["name", "kind", "enabled", "schedule", "time_zone", "filters", "next_run_at", "next_runs",
                  "created_at", "updated_at"]
        read_only_fields = fields

    def get_next_runs(self, trigger) -> list[str]:
        if trigger.kind != Trigger.Kind.CRON or not trigger.enabled:
            return []
        try:
            return [run.isoformat() for run in cron.next_runs(trigger.schedule, trigger.time_zone)]
        except Exception:  # noqa: BLE001 - shown as no runs; the schedule was validated when saved
            return []


class TriggerCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=40)
    kind = serializers.ChoiceField(choices=[Trigger.Kind.CRON, Trigger.Kind.EVENT, Trigger.Kind.HTTP])
    enabled = serializers.BooleanField(default=True)
    schedule = serializers.CharField(required=False, allow_blank=True, default="")
    time_zone = serializers.CharField(required=False, default="UTC")
    filters = FilterSerializer(many=True, required=False, default=list)


class TriggerUpdateSerializer(ClosedInputSerializer):
    """What a PATCH may change; a trigger's name and kind stay what they were made with."""

    read_only_names = tuple(TriggerSerializer.Meta.fields)

    enabled = serializers.BooleanField(required=False)
    schedule = serializers.CharField(required=False, allow_blank=True)
    time_zone = serializers.CharField(required=False)
    filters = FilterSerializer(many=True, required=False)


class RetryPolicySerializer(ClosedInputSerializer, serializers.ModelSerializer):
    """Read and changed whole or in part (a PUT takes any subset of the fields); other fields are refused."""

    class Meta:
        model = RetryPolicy
        fields = ["max_attempts", "backoff_seconds", "backoff_max_seconds", "max_event_age_seconds", "callback_url"]
        extra_kwargs = {"callback_url": {"help_text": (
            "Where the results of async calls are POSTed when the caller names no callback (only a caller "
            "with an invoke-scoped API token may name one). Private, loopback, link-local and metadata "
            "addresses are refused.")}}


class DeliverySerializer(serializers.ModelSerializer):
    """A queued delivery (async call, cron run, event, sequence step) without its payloads."""

    trigger = serializers.CharField(source="trigger.name", read_only=True, default=None, allow_null=True)
    # Not a URLField: an empty string (no callback) is not a URI, and the schema must allow what is shown.
    callback_url = serializers.CharField(read_only=True, help_text="Where the result is POSTed; empty for none")
    # Plain strings: a second "state" enum beside the function's would collide in the OpenAPI schema.
    state = serializers.CharField(read_only=True, help_text="pending, running, succeeded, dead or discarded")
    source = serializers.CharField(read_only=True, help_text="async, cron, event or sequence")

    class Meta:
        model = Delivery
        fields = ["id", "source", "trigger", "state", "attempts", "created_at", "available_at", "finished_at",
                  "invocation_id", "result_status", "last_error", "callback_url", "callback_status", "run_id",
                  "step"]
        read_only_fields = fields
        extra_kwargs = {"callback_status": {"help_text": (
            'How posting the result went: "delivered: <HTTP status>", or "failed: …" with the HTTP status '
            'or "destination refused by policy" / "no answer"')}}


class DeliveryResultSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    function = serializers.CharField()
    source = serializers.CharField()
    state = serializers.CharField()
    attempts = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    invocation_id = serializers.UUIDField(allow_null=True)
    error = serializers.CharField(allow_blank=True)
    status = serializers.IntegerField(allow_null=True, help_text="The function's HTTP status")
    headers = serializers.DictField(child=serializers.CharField())
    body = serializers.CharField(allow_null=True, help_text="The function's answer (UTF-8), once there is one")
    body_base64 = serializers.CharField(required=False, help_text="The answer when it is not UTF-8")
    run_id = serializers.UUIDField(allow_null=True)
    step = serializers.IntegerField()


class SequenceSerializer(serializers.ModelSerializer):
    functions = serializers.SerializerMethodField()

    class Meta:
        model = Sequence
        fields = ["name", "description", "functions", "created_at"]
        read_only_fields = fields

    def get_functions(self, sequence) -> list[str]:
        return [step.function.name for step in sequence.steps.all()]


class SequenceCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=40)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    functions = serializers.ListField(child=serializers.CharField(), min_length=1)


class SequenceStartSerializer(serializers.Serializer):
    input = serializers.JSONField(required=False, default=None, help_text="JSON given to the first step")
    callback_url = serializers.URLField(required=False, allow_blank=True, default="", max_length=2000,
                                        help_text="Where the run's result is POSTed (private, loopback, "
                                                  "link-local and metadata addresses are refused)")


class AcceptedSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    state = serializers.CharField()
    status_url = serializers.URLField()
    trace_id = serializers.CharField(required=False, help_text="The W3C trace the delivery continues (a "
                                                               "sequence run is one trace), when known.")
