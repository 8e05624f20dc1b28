"""REST endpoints for tenants, their members, API tokens and audit trail.

Reads go through tenancy.selectors with the caller, writes through tenancy.services; each view
is input serializer → service → output serializer. Tenants are addressed by slug, members by
username, tokens by prefix.
"""

import django_filters
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import filters, generics, status
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api.filters import FILTER_BACKENDS, DateTimeFilter
from portal.api.inputs import valid_body
from portal.api.permissions import request_token
from portal.errors import NotFound, PermissionDenied
from tenancy import selectors, services
from tenancy.api import serializers as s
from tenancy.models import ApiToken, AuditEvent, Membership, Tenant


def tenant_or_404(request, slug: str):
    """The tenant named in the URL, through the selector: 404 for a tenant the caller cannot see."""
    return selectors.tenant_for_user(request.user, slug)


def _valid(serializer_class, request, **kwargs) -> dict:
    return valid_body(serializer_class, request.data, **kwargs)


def _tenant_detail(request, tenant) -> dict:
    role = selectors.user_role(request.user, tenant)
    return s.TenantDetailSerializer(tenant, context={"request": request, "role": role}).data


# ---- tenants -------------------------------------------------------------------------------

@extend_schema_view(
    get=extend_schema(summary="List the caller's tenants", responses=s.TenantSerializer(many=True)),
)
class TenantListView(generics.ListAPIView):
    queryset = Tenant.objects.none()  # what the schema generator sees
    serializer_class = s.TenantSerializer
    filter_backends = FILTER_BACKENDS
    search_fields = ["slug", "name"]
    ordering_fields = ["slug", "name", "created_at"]
    ordering = ["slug"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return self.queryset
        tenants = selectors.tenants_for_user(self.request.user)
        token = request_token(self.request)
        if token is not None:
            tenants = tenants.filter(pk=token.tenant_id)
        return tenants

    @extend_schema(summary="Create a tenant (the caller becomes its owner)", request=s.TenantCreateSerializer,
                   responses={201: s.TenantDetailSerializer})
    def post(self, request):
        if request_token(request) is not None:
            raise PermissionDenied("An API token belongs to one tenant and cannot create tenants; sign in instead.")
        data = _valid(s.TenantCreateSerializer, request)
        tenant = services.tenant_create(acting_user=request.user, slug=data["slug"], name=data["name"])
        tenant = selectors.tenant_for_user(request.user, tenant.slug)
        return Response(_tenant_detail(request, tenant), status=status.HTTP_201_CREATED)



class TenantDetailView(APIView):
    @extend_schema(summary="A tenant with its quota and the caller's role", responses=s.TenantDetailSerializer)
    def get(self, request, tenant_slug):
        return Response(_tenant_detail(request, tenant_or_404(request, tenant_slug)))

    @extend_schema(summary="Rename a tenant (owners) or change its isolation (platform operators); only the "
                           "fields sent change", request=s.TenantUpdateSerializer, responses=s.TenantDetailSerializer)
    def patch(self, request, tenant_slug):
        tenant = tenant_or_404(request, tenant_slug)
        data = _valid(s.TenantUpdateSerializer, request)
        if data:  # a PATCH without fields changes nothing
            tenant = services.tenant_update(acting_user=request.user, tenant=tenant, **data)
        return Response(_tenant_detail(request, tenant))


# ---- members -------------------------------------------------------------------------------

class MemberListView(generics.ListAPIView):
    queryset = Membership.objects.none()  # what the schema generator sees
    serializer_class = s.MemberSerializer
    filter_backends = [filters.SearchFilter]
    search_fields = ["user__username", "role"]  # not e-mail: no probing members' addresses

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return self.queryset
        tenant = tenant_or_404(self.request, self.kwargs["tenant_slug"])
        return selectors.memberships_for_tenant(self.request.user, tenant)

    @extend_schema(summary="List the tenant's members")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    @extend_schema(summary="Add a user to the tenant (admins)", request=s.MemberAddSerializer,
                   responses={201: s.MemberSerializer})
    def post(self, request, tenant_slug):
        tenant = tenant_or_404(request, tenant_slug)
        data = _valid(s.MemberAddSerializer, request)
        membership = services.tenant_member_add(acting_user=request.user, tenant=tenant,
                                                username=data["username"], role=data["role"])
        return Response(s.MemberSerializer(membership).data, status=status.HTTP_201_CREATED)


def _membership_or_404(request, tenant_slug: str, username: str):
    tenant = tenant_or_404(request, tenant_slug)
    membership = selectors.memberships_for_tenant(request.user, tenant).filter(user__username=username).first()
    if membership is None:
        raise NotFound(f"{username} is not a member of {tenant.slug}.")
    return membership


class MemberDetailView(APIView):
    @extend_schema(summary="One member", responses=s.MemberSerializer)
    def get(self, request, tenant_slug, username):
        return Response(s.MemberSerializer(_membership_or_404(request, tenant_slug, username)).data)

    @extend_schema(summary="Change a member's role (admins; owners for the owner role)",
                   request=s.MemberRoleSerializer, responses=s.MemberSerializer)
    def patch(self, request, tenant_slug, username):
        membership = _membership_or_404(request, tenant_slug, username)
        data = _valid(s.MemberRoleSerializer, request)
        if "role" in data:  # a PATCH without a role changes nothing
            membership = services.tenant_member_change_role(acting_user=request.user, membership=membership,
                                                            role=data["role"])
        return Response(s.MemberSerializer(membership).data)

    @extend_schema(summary="Remove a member (their tokens for the tenant are revoked)", request=None,
                   responses={204: None})
    def delete(self, request, tenant_slug, username):
        membership = _membership_or_404(request, tenant_slug, username)
        services.tenant_member_remove(acting_user=request.user, membership=membership)
        return Response(status=status.HTTP_204_NO_CONTENT)


class LeaveView(APIView):
    @extend_schema(summary="Leave the tenant (any member but its last owner; your tokens for it are revoked)",
                   request=None, responses={204: None})
    def post(self, request, tenant_slug):
        if request_token(request) is not None:
            # A token could otherwise take its user out of the tenant on its own say-so.
            raise PermissionDenied("Leaving a tenant needs you signed in, not an API token.")
        services.tenant_member_leave(acting_user=request.user, tenant=tenant_or_404(request, tenant_slug))
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---- API tokens ----------------------------------------------------------------------------

class TokenListView(generics.ListAPIView):
    """Admins see every token of the tenant, other members their own. Hashes never leave the server."""

    queryset = ApiToken.objects.none()  # what the schema generator sees
    serializer_class = s.TokenSerializer
    filter_backends = FILTER_BACKENDS
    search_fields = ["name", "prefix", "user__username"]
    ordering_fields = ["created_at", "last_used_at", "name", "expires_at"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return self.queryset
        tenant = tenant_or_404(self.request, self.kwargs["tenant_slug"])
        return selectors.tokens_for_user(self.request.user, tenant)

    @extend_schema(summary="List API tokens")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    @extend_schema(summary="Create an API token for yourself; the plaintext is in this response only",
                   request=s.TokenCreateSerializer, responses={201: s.TokenCreatedSerializer})
    def post(self, request, tenant_slug):
        tenant = tenant_or_404(request, tenant_slug)
        data = _valid(s.TokenCreateSerializer, request)
        acting_token = request_token(request)
        if acting_token is not None:
            # A token may mint tokens, but never one that can do more than itself.
            extra = sorted(set(data["scopes"]) - set(acting_token.scopes))
            if extra:
                raise PermissionDenied(f"This API token cannot grant scopes it does not have: {', '.join(extra)}.")
        token, plaintext = services.token_create(acting_user=request.user, tenant=tenant, name=data["name"],
                                                 scopes=data["scopes"], expires_at=data["expires_at"])
        body = s.TokenCreatedSerializer(token, context={"plaintext": plaintext}).data
        return Response(body, status=status.HTTP_201_CREATED)


class TokenDetailView(APIView):
    def _token(self, request, tenant_slug, prefix):
        tenant = tenant_or_404(request, tenant_slug)
        token = selectors.tokens_for_user(request.user, tenant).filter(prefix=prefix).first()
        if token is None:
            raise NotFound("Token not found.")
        return token

    @extend_schema(summary="One API token", responses=s.TokenSerializer)
    def get(self, request, tenant_slug, prefix):
        return Response(s.TokenSerializer(self._token(request, tenant_slug, prefix)).data)

    @extend_schema(summary="Revoke an API token", request=None, responses={204: None})
    def delete(self, request, tenant_slug, prefix):
        services.token_revoke(acting_user=request.user, token=self._token(request, tenant_slug, prefix))
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---- audit trail ---------------------------------------------------------------------------

class AuditEventFilter(django_filters.FilterSet):
    action = django_filters.CharFilter(method="filter_action", help_text=(
        "Exact action, e.g. function.deploy; a trailing '.' matches a family, e.g. function."))
    actor = django_filters.CharFilter(field_name="actor_name", help_text="Username of who acted")
    since = DateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = DateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = AuditEvent
        fields = ["action", "actor", "since", "until"]

    def filter_action(self, queryset, name, value):
        if value.endswith("."):
            return queryset.filter(action__startswith=value)
        return queryset.filter(action=value)


class AuditEventListView(generics.ListAPIView):
    """The tenant's audit trail, newest first (admins and owners)."""

    queryset = AuditEvent.objects.none()  # what the schema generator sees
    serializer_class = s.AuditEventSerializer
    filter_backends = FILTER_BACKENDS
    filterset_class = AuditEventFilter
    search_fields = ["action", "actor_name", "target_repr"]
    ordering_fields = ["created_at"]
    ordering = ["-created_at", "-id"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return self.queryset
        tenant = tenant_or_404(self.request, self.kwargs["tenant_slug"])
        if not selectors.user_can_tenant(self.request.user, tenant, "view_audit"):
            raise PermissionDenied("Only the tenant's admins and owners can read its audit trail.")
        return selectors.audit_events_for_user(self.request.user, tenant)

    @extend_schema(summary="The tenant's audit trail")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

