"""Every write to tenants, memberships, quotas, API tokens, and the audit trail."""

import hashlib
import secrets
from datetime import datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from guardian.shortcuts import assign_perm

from portal.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from portal.middleware import client_ip
from tenancy.models import ApiToken, AuditEvent, Membership, Quota, Role, Tenant
from tenancy.permissions import TENANT_PERMS, role_group_name
from tenancy.selectors import tenant_for_user, user_can_tenant

User = get_user_model()

TOKEN_PREFIX = "nmb"


def audit_record(*, actor, action: str, tenant: Tenant | None = None, target=None,
                 details: dict | None = None) -> AuditEvent:
    """Record who did what to which object, and from where. Called inside the service's transaction."""
    actor_obj = actor if getattr(actor, "is_authenticated", False) else None
    return AuditEvent.objects.create(
        actor=actor_obj,
        actor_name=actor_obj.get_username() if actor_obj else "system",
        tenant=tenant,
        action=action,
        target_type=target._meta.model_name if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        target_repr=str(target)[:200] if target is not None else "",
        details=details or {},
        ip=client_ip.get(),
    )


def full_clean_or_raise(obj, exclude=None, *, validate_unique: bool = True) -> None:
    try:
        obj.full_clean(exclude=exclude, validate_unique=validate_unique)
    except ValidationError as exc:
        errors = exc.message_dict
        first_field, messages = next(iter(errors.items()))
        field = None if first_field == "__all__" else first_field
        raise ValidationFailed(f"{field + ': ' if field else ''}{messages[0]}", field=field, errors=errors) from exc


def role_group(tenant: Tenant, role: str) -> Group:
    group, _ = Group.objects.get_or_create(name=role_group_name(tenant.pk, role))
    return group


def _require(user, tenant: Tenant, action: str) -> None:
    if not user_can_tenant(user, tenant, action):
        raise PermissionDenied("You do not have permission to do this in this tenant.")


# ---- tenants -------------------------------------------------------------------------------

def tenant_create(*, acting_user, slug: str, name: str, isolation: str = Tenant.Isolation.SHARED,
                  owner=None, quota: dict | None = None) -> Tenant:
    """Create a tenant with its role groups and quota; ``owner`` (default: the acting user) becomes its owner."""
    if not acting_user.is_superuser and not getattr(settings, "NIMBUS_SELF_SERVICE_TENANTS", True):
        raise PermissionDenied("Only platform operators can create tenants.")
    tenant = Tenant(slug=slug, name=name or slug, isolation=isolation)
    # A taken slug is a conflict (409), found by the insert below rather than as a field error.
    full_clean_or_raise(tenant, validate_unique=False)
    with transaction.atomic():
        try:
            tenant.save()
        except IntegrityError as exc:
            raise Conflict(f"A tenant named '{slug}' already exists.", field="slug") from exc
        for role, perms in TENANT_PERMS.items():
            group = role_group(tenant, role)
            for perm in perms:
                assign_perm(f"tenancy.{perm}", group, tenant)
        quota_obj = Quota(tenant=tenant, **(quota or {}))
        full_clean_or_raise(quota_obj, exclude=["tenant"])
        quota_obj.save()
        owner = owner or acting_user
        _membership_add(tenant=tenant, user=owner, role=Role.OWNER)
        audit_record(actor=acting_user, action="tenant.create", tenant=tenant, target=tenant,
                     details={"owner": owner.get_username(), "isolation": isolation})
    return tenant


def tenant_update(*, acting_user, tenant: Tenant, name: str | None = None, isolation: str | None = None) -> Tenant:
    _require(acting_user, tenant, "change_tenant")
    changes = {}
    if name is not None and name != tenant.name:
        changes["name"] = [tenant.name, name]
        tenant.name = name
    if isolation is not None and isolation != tenant.isolation:
        if not acting_user.is_superuser:
            raise PermissionDenied("Only platform operators can change a tenant's isolation.")
        changes["isolation"] = [tenant.isolation, isolation]
        tenant.isolation = isolation
    full_clean_or_raise(tenant)
    with transaction.atomic():
        tenant.save()
        audit_record(actor=acting_user, action="tenant.update", tenant=tenant, target=tenant, details=changes)
    return tenant


def _operator_only(acting_user) -> None:
    if not acting_user.is_superuser:
        raise PermissionDenied("Only platform operators can do this.")


def tenant_suspend(*, acting_user, tenant: Tenant, reason: str = "") -> Tenant:
    _operator_only(acting_user)
    with transaction.atomic():
        tenant.status = Tenant.Status.SUSPENDED
        tenant.save(update_fields=["status"])
        audit_record(actor=acting_user, action="tenant.suspend", tenant=tenant, target=tenant,
                     details={"reason": reason})
    return tenant


def tenant_reactivate(*, acting_user, tenant: Tenant) -> Tenant:
    _operator_only(acting_user)
    with transaction.atomic():
        tenant.status = Tenant.Status.ACTIVE
        tenant.save(update_fields=["status"])
        audit_record(actor=acting_user, action="tenant.reactivate", tenant=tenant, target=tenant)
    return tenant


def quota_update(*, acting_user, tenant: Tenant, **limits) -> Quota:
    _operator_only(acting_user)
    quota = tenant.quota
    before = {}
    for field, value in limits.items():
        if not hasattr(quota, field) or field in {"id", "tenant"}:
            raise ValidationFailed(f"Unknown quota '{field}'.", field=field)
        before[field] = getattr(quota, field)
        setattr(quota, field, value)
    full_clean_or_raise(quota, exclude=["tenant"])
    with transaction.atomic():
        quota.save()
        audit_record(actor=acting_user, action="quota.update", tenant=tenant, target=tenant,
                     details={k: [before[k], v] for k, v in limits.items()})
    return quota


# ---- members -------------------------------------------------------------------------------

def _membership_add(*, tenant: Tenant, user, role: str) -> Membership:
    membership = Membership.objects.create(tenant=tenant, user=user, role=role)
    user.groups.add(role_group(tenant, role))
    return membership


def tenant_member_add(*, acting_user, tenant: Tenant, username: str, role: str) -> Membership:
    _require(acting_user, tenant, "manage_members")
    if role not in Role.values:
        raise ValidationFailed(f"Unknown role '{role}'.", field="role")
    if role == Role.OWNER and not user_can_tenant(acting_user, tenant, "change_tenant"):
        raise PermissionDenied("Only an owner can add another owner.")
    user = User.objects.filter(username=username).first()
    if user is None:
        raise ValidationFailed(f"There is no user named '{username}'.", field="username")
    with transaction.atomic():
        if Membership.objects.filter(tenant=tenant, user=user).exists():
            raise Conflict(f"{username} is already a member of {tenant.slug}.", field="username")
        membership = _membership_add(tenant=tenant, user=user, role=role)
        audit_record(actor=acting_user, action="member.add", tenant=tenant, target=membership,
                     details={"user": username, "role": role})
    return membership


def _owners_left_after(tenant: Tenant, membership: Membership) -> int:
    return Membership.objects.filter(tenant=tenant, role=Role.OWNER).exclude(pk=membership.pk).count()


def tenant_member_change_role(*, acting_user, membership: Membership, role: str) -> Membership:
    tenant = membership.tenant
    _require(acting_user, tenant, "manage_members")
    if role not in Role.values:
        raise ValidationFailed(f"Unknown role '{role}'.", field="role")
    touches_owner = Role.OWNER in (role, membership.role)
    if touches_owner and not user_can_tenant(acting_user, tenant, "change_tenant"):
        raise PermissionDenied("Only an owner can grant or take away the owner role.")
    old = membership.role
    if old == role:
        return membership
    with transaction.atomic():
        if old == Role.OWNER and _owners_left_after(tenant, membership) == 0:
            raise Conflict("A tenant needs at least one owner: make someone else owner first.")
        membership.user.groups.remove(role_group(tenant, old))
        membership.user.groups.add(role_group(tenant, role))
        membership.role = role
        membership.save(update_fields=["role"])
        audit_record(actor=acting_user, action="member.change_role", tenant=tenant, target=membership,
                     details={"user": membership.user.get_username(), "from": old, "to": role})
    return membership


def tenant_member_remove(*, acting_user, membership: Membership) -> None:
    tenant = membership.tenant
    _require(acting_user, tenant, "manage_members")
    if membership.role == Role.OWNER and not user_can_tenant(acting_user, tenant, "change_tenant"):
        raise PermissionDenied("Only an owner can remove an owner.")
    with transaction.atomic():
        if membership.role == Role.OWNER and _owners_left_after(tenant, membership) == 0:
            raise Conflict("A tenant needs at least one owner: make someone else owner first.")
        membership.user.groups.remove(role_group(tenant, membership.role))
        ApiToken.objects.filter(tenant=tenant, user=membership.user, revoked_at__isnull=True).update(
            revoked_at=timezone.now())
        audit_record(actor=acting_user, action="member.remove", tenant=tenant, target=membership,
                     details={"user": membership.user.get_username(), "role": membership.role})
        membership.delete()


# ---- API tokens ----------------------------------------------------------------------------

def hash_token(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def token_create(*, acting_user, tenant: Tenant, name: str, scopes: list[str],
                 expires_at: datetime | None = None) -> tuple[ApiToken, str]:
    """Create a token for the acting user; the plaintext is returned once and never stored."""
    tenant_for_user(acting_user, tenant.slug)
    if not name or len(name) > 100:
        raise ValidationFailed("Give the token a name of at most 100 characters.", field="name")
    unknown = sorted(set(scopes) - set(ApiToken.Scope.values))
    if not scopes or unknown:
        raise ValidationFailed(
            f"Choose scopes among {', '.join(ApiToken.Scope.values)}" + (f" (unknown: {', '.join(unknown)})" if unknown else "."),
            field="scopes")
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationFailed("The expiry must be in the future.", field="expires_at")
    prefix = secrets.token_hex(4)
    plaintext = f"{TOKEN_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    with transaction.atomic():
        token = ApiToken.objects.create(tenant=tenant, user=acting_user, name=name, prefix=prefix,
                                        token_hash=hash_token(plaintext), scopes=sorted(set(scopes)),
                                        expires_at=expires_at)
        audit_record(actor=acting_user, action="token.create", tenant=tenant, target=token,
                     details={"name": name, "scopes": token.scopes, "prefix": prefix})
    return token, plaintext


def token_revoke(*, acting_user, token: ApiToken) -> ApiToken:
    if token.user_id != acting_user.pk and not user_can_tenant(acting_user, token.tenant, "manage_tokens"):
        raise NotFound("Token not found.")
    if token.revoked_at is not None:
        return token
    with transaction.atomic():
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_record(actor=acting_user, action="token.revoke", tenant=token.tenant, target=token,
                     details={"prefix": token.prefix})
    return token


def token_authenticate(plaintext: str) -> ApiToken | None:
    """The usable token for this plaintext, or None. Marks it used (at most once a minute)."""
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        return None
    token = (ApiToken.objects.select_related("user", "tenant")
             .filter(prefix=parts[1], token_hash=hash_token(plaintext)).first())
    if token is None or not token.is_usable or not token.user.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token
