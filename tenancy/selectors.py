"""Reads of tenant data that depend on who asks. Another tenant's object is a 404 (NotFound)."""

from django.db.models import QuerySet
from guardian.shortcuts import get_objects_for_user

from portal.errors import NotFound
from tenancy.models import ApiToken, AuditEvent, Membership, Tenant


def tenants_for_user(user, action: str = "view_tenant") -> QuerySet[Tenant]:
    if not user or not user.is_authenticated:
        return Tenant.objects.none()
    return get_objects_for_user(user, f"tenancy.{action}", klass=Tenant, accept_global_perms=False)


def tenant_for_user(user, slug: str, action: str = "view_tenant") -> Tenant:
    """The tenant with this slug if the user may see it; NotFound otherwise. Acting without the
    permission on a tenant one can see raises NotFound too, unless ``action`` is only checked by
    the caller via ``user_can_tenant``."""
    tenant = tenants_for_user(user).select_related("quota").filter(slug=slug).first()
    if tenant is None:
        raise NotFound("Tenant not found.")
    return tenant


def user_can_tenant(user, tenant: Tenant, action: str) -> bool:
    if user.is_superuser:
        return True
    return user.has_perm(f"tenancy.{action}", tenant)


def user_role(user, tenant: Tenant) -> str | None:
    membership = Membership.objects.filter(user=user, tenant=tenant).only("role").first()
    return membership.role if membership else None


def memberships_for_tenant(user, tenant: Tenant) -> QuerySet[Membership]:
    tenant_for_user(user, tenant.slug)
    return Membership.objects.filter(tenant=tenant).select_related("user").order_by("user__username")


def tokens_for_user(user, tenant: Tenant) -> QuerySet[ApiToken]:
    """Admins see every token of the tenant, everybody else their own."""
    qs = ApiToken.objects.filter(tenant=tenant).select_related("user")
    if not user_can_tenant(user, tenant, "manage_tokens"):
        qs = qs.filter(user=user)
    return qs


def audit_events_for_user(user, tenant: Tenant | None = None) -> QuerySet[AuditEvent]:
    if tenant is None:
        if user.is_superuser:
            return AuditEvent.objects.select_related("tenant")
        allowed = tenants_for_user(user, "view_audit")
        return AuditEvent.objects.filter(tenant__in=allowed).select_related("tenant")
    if not user_can_tenant(user, tenant, "view_audit"):
        return AuditEvent.objects.none()
    return AuditEvent.objects.filter(tenant=tenant).select_related("tenant")
