"""Every write to tenants, memberships, quotas, API tokens, and the audit trail."""

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import OuterRef, Subquery
from django.utils import timezone
from guardian.shortcuts import assign_perm

from portal.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from portal.middleware import client_ip
from tenancy.models import ApiToken, AuditEvent, Membership, Quota, Role, Tenant
from tenancy.permissions import ROLE_ORDER, TENANT_PERMS, role_group_name, token_scopes_allowed
from tenancy.revocation import access_changed
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


# ---- the tenant lock -----------------------------------------------------------------------

# Ids of the tenants whose row this thread (or task) holds through tenant_locked().
_tenants_locked: ContextVar[frozenset[int]] = ContextVar("tenants_locked", default=frozenset())


@contextmanager
def tenant_locked(tenant: Tenant | int) -> Iterator[Tenant]:
    """Open (or join) a transaction and lock the tenant's row until it ends; yields the tenant
    re-read under the lock, with its quota.

    Every check of a tenant-wide invariant (quotas, "at least one owner") and the write it guards
    run inside, so two requests of one tenant take turns instead of both passing the check on the
    same old state. Take it first in the transaction, before reading any usage: the reads that
    follow see what the previous holder committed. FOR NO KEY UPDATE serialises the holders but
    does not block rows that merely point at the tenant (audit events, invocations) from being
    inserted meanwhile. SQLite ignores the lock; its writers are serialised by the database.
    """
    pk = tenant if isinstance(tenant, int) else tenant.pk
    with transaction.atomic():
        locked = (Tenant.objects.select_for_update(of=("self",), no_key=True).select_related("quota")
                  .filter(pk=pk).first())
        if locked is None:
            raise NotFound("Tenant not found.")
        held = _tenants_locked.set(_tenants_locked.get() | {pk})
        try:
            yield locked
        finally:
            _tenants_locked.reset(held)


def require_tenant_locked(tenant: Tenant | int) -> None:
    """Refuse to check a quota or count owners outside ``tenant_locked``: such a check is a race.
    A programming error, not a user's: it raises RuntimeError, never a NimbusError."""
    pk = tenant if isinstance(tenant, int) else tenant.pk
    if pk not in _tenants_locked.get() or not transaction.get_connection().in_atomic_block:
        raise RuntimeError(f"Checks on tenant {pk} must run inside tenancy.services.tenant_locked().")


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
        access_changed(reason=f"{tenant.slug} was suspended", tenant_id=tenant.pk)
    return tenant


def tenant_reactivate(*, acting_user, tenant: Tenant) -> Tenant:
    _operator_only(acting_user)
    with transaction.atomic():
        tenant.status = Tenant.Status.ACTIVE
        tenant.save(update_fields=["status"])
        audit_record(actor=acting_user, action="tenant.reactivate", tenant=tenant, target=tenant)
    return tenant


def user_deactivate(*, acting_user, user) -> None:
    """Turn an account off (operators): its sessions and API tokens stop working in every process at
    once, and its open IDE sockets are closed."""
    _operator_only(acting_user)
    with transaction.atomic():
        user.is_active = False
        user.save(update_fields=["is_active"])
        audit_record(actor=acting_user, action="user.deactivate", target=user,
                     details={"user": user.get_username()})
        # The save above announced it (tenancy/signals.py), as any save that turns an account off does.


_QUOTA_LIMITS = frozenset(f.name for f in Quota._meta.concrete_fields if f.name not in {"id", "tenant"})


def quota_update(*, acting_user, tenant: Tenant, **limits) -> Quota:
    _operator_only(acting_user)
    for field in limits:
        if field not in _QUOTA_LIMITS:
            raise ValidationFailed(f"Unknown quota '{field}'.", field=field)
    # Under the tenant lock, so a check running now sees either the old limits or the new ones.
    with tenant_locked(tenant) as locked:
        quota = locked.quota
        before = {field: getattr(quota, field) for field in limits}
        for field, value in limits.items():
            setattr(quota, field, value)
        full_clean_or_raise(quota, exclude=["tenant"])
        quota.save(update_fields=list(limits) or None)
        audit_record(actor=acting_user, action="quota.update", tenant=locked, target=locked,
                     details={k: [before[k], v] for k, v in limits.items()})
    tenant.quota = quota
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
    # Inactive accounts answer like unknown ones; nothing else about an account outside the tenant is
    # said here or in the answer (no e-mail): a tenant admin learns only whether the name can be added.
    user = User.objects.filter(username=username, is_active=True).first()
    if user is None:
        raise ValidationFailed(f"There is no user named '{username}' who can be added.", field="username")
    with tenant_locked(tenant) as locked:
        # Checked again under the lock: a concurrent change may just have taken the acting user's role.
        _require(acting_user, locked, "manage_members")
        if role == Role.OWNER and not user_can_tenant(acting_user, locked, "change_tenant"):
            raise PermissionDenied("Only an owner can add another owner.")
        if Membership.objects.filter(tenant=locked, user=user).exists():
            raise Conflict(f"{username} is already a member of {tenant.slug}.", field="username")
        membership = _membership_add(tenant=locked, user=user, role=role)
        audit_record(actor=acting_user, action="member.add", tenant=locked, target=membership,
                     details={"user": username, "role": role})
    return membership


def _membership_locked(tenant: Tenant, membership: Membership) -> Membership:
    """The membership as it is now, read under the tenant lock (a concurrent change may have
    changed its role or removed it since the caller loaded it)."""
    require_tenant_locked(tenant)
    current = Membership.objects.select_related("user").filter(pk=membership.pk, tenant=tenant).first()
    if current is None:
        raise NotFound(f"{membership.user.get_username()} is no longer a member of {tenant.slug}.")
    return current


def _require_owner_left(tenant: Tenant, membership: Membership, refusal: str) -> None:
    """Refuse (Conflict) a change that takes the owner role from the tenant's last owner."""
    require_tenant_locked(tenant)
    if membership.role != Role.OWNER:
        return
    others = Membership.objects.filter(tenant=tenant, role=Role.OWNER).exclude(pk=membership.pk)
    if not others.exists():
        raise Conflict(f"A tenant needs at least one owner: {refusal}")


def tenant_member_change_role(*, acting_user, membership: Membership, role: str) -> Membership:
    tenant = membership.tenant
    _require(acting_user, tenant, "manage_members")
    if role not in Role.values:
        raise ValidationFailed(f"Unknown role '{role}'.", field="role")
    with tenant_locked(tenant) as locked:
        current = _membership_locked(locked, membership)
        old = current.role
        # Checked again under the lock: a concurrent change may just have taken the acting user's role.
        _require(acting_user, locked, "manage_members")
        if Role.OWNER in (role, old) and not user_can_tenant(acting_user, locked, "change_tenant"):
            raise PermissionDenied("Only an owner can grant or take away the owner role.")
        if old == role:
            membership.role = old
            return membership
        username = current.user.get_username()
        _require_owner_left(locked, current, f"{username} is the last owner of {tenant.slug}; "
                                             "make someone else owner before changing their role.")
        current.user.groups.remove(role_group(locked, old))
        current.user.groups.add(role_group(locked, role))
        current.role = role
        current.save(update_fields=["role"])
        audit_record(actor=acting_user, action="member.change_role", tenant=locked, target=current,
                     details={"user": username, "from": old, "to": role})
        _tokens_narrow(acting_user=acting_user, tenant=locked, user=current.user, role=role)
        # Their tokens act at most as the new role allows from the next request on; an editor opened
        # with more than the new role allows is closed.
        access_changed(reason=f"your role in {tenant.slug} changed from {old} to {role}", tenant_id=locked.pk,
                       user_ids=[current.user_id], close_sockets=ROLE_ORDER.index(role) < ROLE_ORDER.index(old))
    membership.role = role
    return membership


def _tokens_narrow(*, acting_user, tenant: Tenant, user, role: str) -> None:
    """After a role change, the user's tokens of the tenant keep only the scopes the new role allows,
    in the database: narrowed only in memory at each use, a token would get its old scopes back the
    day its user is promoted again, which nobody chose.

    Rewritten rather than revoked: what the token still may do goes on working, as the narrowing at
    each use already let it (a downgraded developer's CI keeps reading), and a promotion gives back
    nothing; more takes a new token, made under the new role. A token left with no scope at all is
    revoked. Each one is audited."""
    allowed = token_scopes_allowed(role, superuser=user.is_superuser)
    now = timezone.now()
    tokens = ApiToken.objects.select_for_update().filter(tenant=tenant, user=user, revoked_at__isnull=True)
    for token in tokens:
        kept = [scope for scope in token.scopes if scope in allowed]
        if kept == token.scopes:
            continue
        details = {"prefix": token.prefix, "from": token.scopes, "to": kept, "role": role}
        if kept:
            token.scopes = kept
            token.save(update_fields=["scopes"])
            audit_record(actor=acting_user, action="token.narrow", tenant=tenant, target=token, details=details)
        else:  # its scopes stay as they were, for the record
            token.revoked_at = now
            token.save(update_fields=["revoked_at"])
            audit_record(actor=acting_user, action="token.revoke", tenant=tenant, target=token,
                         details={**details, "reason": f"the {role} role allows none of its scopes"})


def _membership_delete(*, acting_user, tenant: Tenant, membership: Membership, action: str) -> None:
    """Remove a member: their role group, their API tokens for the tenant, their membership."""
    require_tenant_locked(tenant)
    membership.user.groups.remove(role_group(tenant, membership.role))
    ApiToken.objects.filter(tenant=tenant, user=membership.user, revoked_at__isnull=True).update(
        revoked_at=timezone.now())
    audit_record(actor=acting_user, action=action, tenant=tenant, target=membership,
                 details={"user": membership.user.get_username(), "role": membership.role})
    access_changed(reason=f"you no longer belong to {tenant.slug}", tenant_id=tenant.pk,
                   user_ids=[membership.user_id], close_sockets=True)
    membership.delete()


def tenant_member_remove(*, acting_user, membership: Membership) -> None:
    tenant = membership.tenant
    _require(acting_user, tenant, "manage_members")
    with tenant_locked(tenant) as locked:
        current = _membership_locked(locked, membership)
        _require(acting_user, locked, "manage_members")
        if current.role == Role.OWNER and not user_can_tenant(acting_user, locked, "change_tenant"):
            raise PermissionDenied("Only an owner can remove an owner.")
        username = current.user.get_username()
        _require_owner_left(locked, current, f"{username} is the last owner of {tenant.slug}; "
                                             "make someone else owner before removing them.")
        _membership_delete(acting_user=acting_user, tenant=locked, membership=current, action="member.remove")


def tenant_member_leave(*, acting_user, tenant: Tenant) -> None:
    """The acting user leaves the tenant. Any member may, except its last owner."""
    with tenant_locked(tenant) as locked:
        current = Membership.objects.select_related("user").filter(tenant=locked, user=acting_user).first()
        if current is None:
            raise NotFound(f"You are not a member of {tenant.slug}.")
        _require_owner_left(locked, current, f"you are the last owner of {tenant.slug}; "
                                             "make someone else owner before leaving.")
        _membership_delete(acting_user=acting_user, tenant=locked, membership=current, action="member.leave")


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
    role = Membership.objects.filter(tenant=tenant, user=acting_user).values_list("role", flat=True).first()
    allowed = token_scopes_allowed(role, superuser=acting_user.is_superuser)
    beyond = sorted(set(scopes) - allowed)
    if beyond:
        raise ValidationFailed(
            f"Your role in {tenant.slug} ({role or 'none'}) does not allow a token with the scope(s) "
            f"{', '.join(beyond)}; choose among {', '.join(sorted(allowed)) or 'none'}.", field="scopes")
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
        access_changed(reason=f"token {token.prefix} was revoked", tenant_id=token.tenant_id)
    return token


def token_authenticate(plaintext: str) -> ApiToken | None:
    """The usable token for this plaintext, or None. Marks it used (at most once a minute).

    The token comes back with ``member_role`` (its user's role in its tenant now) and with ``scopes``
    narrowed to those that role allows (tenancy.permissions.ROLE_TOKEN_SCOPES): a token acts with at
    most its scopes and its user's current role, whatever it was made with (a downgrade also narrows
    the stored scopes, _tokens_narrow, so a later promotion gives none back). A
    token whose user is no longer a member (and not an operator) is not usable.
    """
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or "\x00" in parts[1]:
        return None  # a NUL could not even be looked up (PostgreSQL refuses it in text)
    role = Membership.objects.filter(tenant=OuterRef("tenant"), user=OuterRef("user")).values("role")[:1]
    token = (ApiToken.objects.select_related("user", "tenant").annotate(member_role=Subquery(role))
             .filter(prefix=parts[1], token_hash=hash_token(plaintext)).first())
    if token is None or not token.is_usable or not token.user.is_active:
        return None
    if token.member_role is None and not token.user.is_superuser:
        return None
    allowed = token_scopes_allowed(token.member_role, superuser=token.user.is_superuser)
    token.scopes = [scope for scope in token.scopes if scope in allowed]
    now = timezone.now()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token
