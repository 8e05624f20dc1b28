"""Input and output shapes of the tenancy API: tenants, members, API tokens, audit events.

Input serializers only check types and presence; the rules (who may, what is unique, which
roles exist) live in tenancy.services and come back as NimbusError.
"""

from rest_framework import serializers

from portal.api.inputs import ClosedInputSerializer
from tenancy.models import ApiToken, AuditEvent, Membership, Quota, Role, Tenant


class QuotaSerializer(serializers.ModelSerializer):
    class Meta:
        model = Quota
        fields = ["max_functions", "max_memory_mb_per_function", "max_total_memory_mb",
                  "max_instances_per_function", "max_gpus", "max_concurrent_invocations"]
        read_only_fields = fields


class TenantSerializer(serializers.ModelSerializer):
    class Meta:
        model = Tenant
        fields = ["slug", "name", "status", "isolation", "created_at"]
        read_only_fields = fields


class TenantDetailSerializer(TenantSerializer):
    quota = QuotaSerializer(read_only=True)
    role = serializers.SerializerMethodField(help_text="The caller's role in the tenant (null for operators).")

    class Meta(TenantSerializer.Meta):
        fields = [*TenantSerializer.Meta.fields, "quota", "role"]
        read_only_fields = fields

    def get_role(self, tenant) -> str | None:
        return self.context.get("role")


class TenantCreateSerializer(serializers.Serializer):
    slug = serializers.CharField(max_length=30)
    name = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")


class TenantUpdateSerializer(ClosedInputSerializer):
    """What a PATCH may change: the name (owners), the isolation (platform operators)."""

    read_only_names = tuple(TenantDetailSerializer.Meta.fields)

    name = serializers.CharField(max_length=100, required=False)
    isolation = serializers.ChoiceField(choices=Tenant.Isolation.choices, required=False,
                                        help_text="Platform operators only.")


class MemberSerializer(serializers.ModelSerializer):
    """A member as the tenant knows them: the username they were added by and their role. No e-mail
    or other profile data: adding a username must not reveal anything else about that account."""

    username = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = Membership
        fields = ["username", "role", "created_at"]
        read_only_fields = fields


class MemberAddSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    role = serializers.ChoiceField(choices=Role.choices, default=Role.DEVELOPER)


class MemberRoleSerializer(ClosedInputSerializer):
    read_only_names = tuple(MemberSerializer.Meta.fields)

    role = serializers.ChoiceField(choices=Role.choices, required=False)


class TokenSerializer(serializers.ModelSerializer):
    user = serializers.CharField(source="user.username", read_only=True)
    revoked = serializers.SerializerMethodField()

    class Meta:
        model = ApiToken
        fields = ["prefix", "name", "user", "scopes", "expires_at", "last_used_at", "created_at", "revoked",
                  "revoked_at"]
        read_only_fields = fields

    def get_revoked(self, token) -> bool:
        return token.revoked_at is not None


class TokenCreatedSerializer(TokenSerializer):
    token = serializers.SerializerMethodField(help_text="The plaintext token. Shown once; store it now.")

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "token"]
        read_only_fields = fields

    def get_token(self, token) -> str:
        return self.context["plaintext"]


class TokenCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=ApiToken.Scope.choices), allow_empty=False)
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)


class AuditEventSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor_name", read_only=True)

    class Meta:
        model = AuditEvent
        fields = ["id", "created_at", "actor", "action", "target_type", "target_id", "target_repr", "details", "ip"]
        read_only_fields = fields
