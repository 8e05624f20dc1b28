"""Input and output shapes of the functions API.

Secrets are write-only: no output serializer here has a field that can carry a secret value or
its ciphertext (revision configs are shown with secret names only).
"""

from django.conf import settings
from rest_framework import serializers

from functions.models import EnvVar, Function, Invocation, InvocationLog, Revision, Runtime, Secret, TrafficTarget
from functions.selectors import ACTIONS
from functions.starters import TITLES
from portal.api.inputs import ClosedInputSerializer
from tenancy.permissions import SHARE_LEVELS


def invoke_url(function: Function) -> str:
    return f"{settings.NIMBUS_PUBLIC_URL}/fn/{function.tenant.slug}/{function.name}/"


class TrafficTargetSerializer(serializers.ModelSerializer):
    revision = serializers.IntegerField(source="revision.number", read_only=True)

    class Meta:
        model = TrafficTarget
        fields = ["revision", "percent", "tag"]
        read_only_fields = fields


class FunctionSerializer(serializers.ModelSerializer):
    """A function in a list: enough to show a row, with what the caller may do to it."""

    tenant = serializers.CharField(source="tenant.slug", read_only=True)
    invoke_url = serializers.SerializerMethodField()
    permissions = serializers.SerializerMethodField(help_text="What the caller may do: view, change, deploy, "
                                                              "delete, share.")

    class Meta:
        model = Function
        fields = ["tenant", "name", "runtime", "handler", "description", "state", "source_version",
                  "invoke_url", "permissions", "created_at", "updated_at"]
        read_only_fields = fields

    def get_invoke_url(self, function) -> str:
        return invoke_url(function)

    def get_permissions(self, function) -> list[str]:
        granted = self.context.get("permissions", {}).get(function.pk, set())
        return [action for action in ACTIONS if action in granted]


class FunctionDetailSerializer(FunctionSerializer):
    traffic = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="created_by.username", read_only=True, default=None)

    class Meta(FunctionSerializer.Meta):
        fields = [*FunctionSerializer.Meta.fields, "memory_mb", "cpu_millicores", "gpus", "timeout_seconds",
                  "concurrency", "min_instances", "max_instances", "invoke_auth", "allow_egress", "debug",
                  "created_by", "traffic"]
        read_only_fields = fields

    def get_traffic(self, function) -> list[dict]:
        return TrafficTargetSerializer(self.context.get("traffic", []), many=True).data


class FunctionConfigSerializer(ClosedInputSerializer):
    """Settings a PATCH may change; every field optional, any other field refused by name."""

    read_only_names = tuple(FunctionDetailSerializer.Meta.fields)
    unknown_message = "Unknown setting."

    runtime = serializers.ChoiceField(choices=Runtime.choices, required=False)
    handler = serializers.CharField(max_length=100, required=False)
    description = serializers.CharField(max_length=500, required=False, allow_blank=True)
    memory_mb = serializers.IntegerField(required=False)
    cpu_millicores = serializers.IntegerField(required=False)
    gpus = serializers.IntegerField(required=False, min_value=0)
    timeout_seconds = serializers.IntegerField(required=False)
    concurrency = serializers.IntegerField(required=False, min_value=0)
    min_instances = serializers.IntegerField(required=False, min_value=0)
    max_instances = serializers.IntegerField(required=False)
    invoke_auth = serializers.ChoiceField(choices=Function.InvokeAuth.choices, required=False)
    allow_egress = serializers.BooleanField(required=False)
    debug = serializers.BooleanField(required=False)



class FunctionCreateSerializer(FunctionConfigSerializer):
    name = serializers.CharField(max_length=40)
    runtime = serializers.ChoiceField(choices=Runtime.choices, default=Runtime.PYTHON)
    starter = serializers.ChoiceField(choices=sorted(TITLES), default="hello",
                                      help_text="Template to start from (ignored when files are given).")
    files = serializers.DictField(child=serializers.CharField(allow_blank=True, trim_whitespace=False),
                                  required=False, help_text="{path: content}; replaces the starter.")


class SourceFileSerializer(serializers.Serializer):
    path = serializers.CharField()
    size = serializers.IntegerField(help_text="Bytes (UTF-8).")


class SourceTreeSerializer(serializers.Serializer):
    version = serializers.IntegerField(help_text="The draft's source version; send it back as base_version.")
    files = SourceFileSerializer(many=True)


class SourceFileContentSerializer(serializers.Serializer):
    path = serializers.CharField()
    size = serializers.IntegerField()
    content = serializers.CharField(trim_whitespace=False)
    version = serializers.IntegerField()


class SourceReplaceSerializer(serializers.Serializer):
    files = serializers.DictField(child=serializers.CharField(allow_blank=True, trim_whitespace=False),
                                  allow_empty=False)
    base_version = serializers.IntegerField(min_value=1)


class FileSaveSerializer(serializers.Serializer):
    content = serializers.CharField(allow_blank=True, trim_whitespace=False)
    base_version = serializers.IntegerField(min_value=1)


class FileRenameSerializer(serializers.Serializer):
    new_path = serializers.CharField(max_length=255)
    base_version = serializers.IntegerField(min_value=1)


class BaseVersionSerializer(serializers.Serializer):
    base_version = serializers.IntegerField(min_value=1)


class SourceVersionSerializer(serializers.Serializer):
    path = serializers.CharField(required=False)
    version = serializers.IntegerField()


class RevisionSerializer(serializers.ModelSerializer):
    author = serializers.CharField(source="author.username", read_only=True, default=None)
    content_hash = serializers.CharField(read_only=True)

    class Meta:
        model = Revision
        fields = ["number", "status", "status_message", "message", "content_hash", "author", "created_at",
                  "deployed_at"]
        read_only_fields = fields


class RevisionDetailSerializer(RevisionSerializer):
    files = serializers.DictField(child=serializers.CharField(), read_only=True)
    config = serializers.SerializerMethodField()

    class Meta(RevisionSerializer.Meta):
        fields = [*RevisionSerializer.Meta.fields, "files", "config"]
        read_only_fields = fields

    def get_config(self, revision) -> dict:
        # The snapshot keeps secret ciphertexts so a rollback restores them; only names leave.
        config = {key: value for key, value in revision.config.items() if key != "secrets"}
        config["secrets"] = sorted(revision.config.get("secrets", {}))
        return config


class DeploySerializer(serializers.Serializer):
    message = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    promote = serializers.BooleanField(default=True, help_text="Send all traffic to the revision once ready.")


class RollbackSerializer(serializers.Serializer):
    revision = serializers.IntegerField(min_value=1)


class TrafficInputSerializer(serializers.Serializer):
    revision = serializers.IntegerField(min_value=1)
    percent = serializers.IntegerField(min_value=0, max_value=100)
    tag = serializers.CharField(max_length=20, required=False, allow_blank=True, default="")


class EnvVarSerializer(serializers.ModelSerializer):
    class Meta:
        model = EnvVar
        fields = ["name", "value"]
        read_only_fields = fields


class EnvVarInputSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=128)
    value = serializers.CharField(allow_blank=True, trim_whitespace=False)


class SecretSerializer(serializers.ModelSerializer):
    class Meta:
        model = Secret
        fields = ["name", "updated_at"]
        read_only_fields = fields


class SecretInputSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=128)
    value = serializers.CharField(write_only=True, trim_whitespace=False)


class GrantSerializer(serializers.Serializer):
    username = serializers.CharField()
    level = serializers.ChoiceField(choices=sorted(SHARE_LEVELS))
    permissions = serializers.ListField(child=serializers.CharField(), read_only=True)


class GrantInputSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    level = serializers.ChoiceField(choices=sorted(SHARE_LEVELS))


class InvocationSerializer(serializers.ModelSerializer):
    revision = serializers.IntegerField(source="revision.number", read_only=True, default=None)

    class Meta:
        model = Invocation
        fields = ["id", "revision", "status", "http_status", "started_at", "duration_ms", "cold_start", "init_ms",
                  "queue_ms", "billed_gb_seconds", "instance", "trigger", "trace_id", "error"]
        read_only_fields = fields


class InvocationLogSerializer(serializers.ModelSerializer):
    class Meta:
        model = InvocationLog
        fields = ["time", "level", "message"]
        read_only_fields = fields


class InvocationDetailSerializer(InvocationSerializer):
    logs = InvocationLogSerializer(many=True, read_only=True)

    class Meta(InvocationSerializer.Meta):
        fields = [*InvocationSerializer.Meta.fields, "logs"]
        read_only_fields = fields
