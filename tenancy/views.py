"""Tenant self-service pages: members and roles, API tokens, quota and usage, the audit trail."""

from functools import wraps

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import F, Q, Sum
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from guardian.core import ObjectPermissionChecker

from functions.engines.concurrency import tenant_slots
from functions.models import Function
from functions.selectors import functions_for_user
from portal.errors import NimbusError, PermissionDenied
from portal.views import form_error_from, nimbus_page
from tenancy.forms import AuditFilterForm, MemberAddForm, MemberFilterForm, MemberRoleForm, TokenCreateForm
from tenancy.permissions import token_scopes_allowed
from tenancy.selectors import (
    audit_events_for_user,
    memberships_for_tenant,
    tenant_for_user,
    tokens_for_user,
    user_can_tenant,
    user_role,
)
from tenancy.services import (
    tenant_member_add,
    tenant_member_change_role,
    tenant_member_leave,
    tenant_member_remove,
    token_create,
    token_revoke,
)

TENANT_ACTIONS = ("create_function", "manage_members", "manage_tokens", "view_audit", "change_tenant")
AUDIT_PAGE_SIZE = 50
MEMBERS_PAGE_SIZE = 50
TOKENS_PAGE_SIZE = 50


def tenant_page(view):
    """Resolve ``<tenant>`` from the URL through the selector (404 for another tenant's) and pass the Tenant."""

    @nimbus_page
    @wraps(view)
    def wrapper(request, tenant, *args, **kwargs):
        return view(request, tenant_for_user(request.user, tenant), *args, **kwargs)

    return wrapper


def tenant_context(user, tenant, active: str, **extra) -> dict:
    """What every tenant page's header and tabs need: the tenant, my role, what I may do here."""
    # One checker answers every action from a single fetch of my permissions on the tenant
    # (user_can_tenant's has_perm would fetch them again for each action).
    checker = ObjectPermissionChecker(user)
    return {
        "tenant": tenant,
        "tenant_role": user_role(user, tenant),
        "tenant_can": {action: checker.has_perm(action, tenant) for action in TENANT_ACTIONS},
        "active_tab": active,
        **extra,
    }


def _require_tenant(user, tenant, action: str) -> None:
    if not user_can_tenant(user, tenant, action):
        raise PermissionDenied("You do not have permission to do this in this tenant.")


# ---- members -------------------------------------------------------------------------------

def _membership(user, tenant, membership_id: int):
    membership = memberships_for_tenant(user, tenant).filter(pk=membership_id).first()
    if membership is None:
        raise Http404("Member not found.")
    return membership


@tenant_page
def members(request, tenant):
    can_manage = user_can_tenant(request.user, tenant, "manage_members")
    form = MemberAddForm(request.POST or None)
    if request.method == "POST":
        _require_tenant(request.user, tenant, "manage_members")
        if form.is_valid():
            try:
                membership = tenant_member_add(acting_user=request.user, tenant=tenant, **form.cleaned_data)
            except NimbusError as exc:
                form_error_from(form, exc)
            else:
                messages.success(request, f"{membership.user.username} joined {tenant.slug} as {membership.role}.")
                return redirect("tenant_members", tenant=tenant.slug)
    filters = MemberFilterForm(request.GET or None, auto_id="filter-%s")
    memberships = memberships_for_tenant(request.user, tenant)
    if filters.is_valid():
        if filters.cleaned_data["q"]:
            q = filters.cleaned_data["q"]
            # Usernames only: members' e-mail addresses are not shown here, nor to be probed by a search.
            memberships = memberships.filter(user__username__icontains=q)
        if filters.cleaned_data["role"]:
            memberships = memberships.filter(role=filters.cleaned_data["role"])
    page = Paginator(memberships, MEMBERS_PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [(m, MemberRoleForm(initial={"role": m.role}, prefix=f"m{m.pk}")) for m in page.object_list]
    return render(request, "tenancy/members.html", tenant_context(
        request.user, tenant, "members", rows=rows, page=page, filters=filters, form=form, can_manage=can_manage))


@tenant_page
def member_role(request, tenant, membership_id):
    membership = _membership(request.user, tenant, membership_id)
    if request.method != "POST":
        return redirect("tenant_members", tenant=tenant.slug)
    _require_tenant(request.user, tenant, "manage_members")
    form = MemberRoleForm(request.POST, prefix=f"m{membership.pk}")
    if not form.is_valid():
        messages.error(request, "Choose one of the roles.")
    else:
        try:
            tenant_member_change_role(acting_user=request.user, membership=membership, role=form.cleaned_data["role"])
        except NimbusError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"{membership.user.username} is now {membership.role}.")
    return redirect("tenant_members", tenant=tenant.slug)


@tenant_page
def member_remove(request, tenant, membership_id):
    membership = _membership(request.user, tenant, membership_id)
    _require_tenant(request.user, tenant, "manage_members")
    if request.method == "POST":
        try:
            tenant_member_remove(acting_user=request.user, membership=membership)
        except NimbusError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"{membership.user.username} no longer belongs to {tenant.slug}; "
                                      "their API tokens for it are revoked.")
        return redirect("tenant_members", tenant=tenant.slug)
    return render(request, "confirm.html", tenant_context(
        request.user, tenant, "members",
        title=f"Remove {membership.user.username}?",
        body=f"{membership.user.username} ({membership.role}) loses access to every function of "
             f"{tenant.slug}, and their API tokens for it are revoked.",
        confirm_label="Remove member", cancel_url=reverse("tenant_members", args=[tenant.slug])))


@tenant_page
def member_leave(request, tenant):
    """The signed-in user leaves the tenant (any member, except its last owner), after confirming."""
    if request.method == "POST":
        try:
            tenant_member_leave(acting_user=request.user, tenant=tenant)
        except NimbusError as exc:
            messages.error(request, exc.message)
            return redirect("tenant_members", tenant=tenant.slug)
        messages.success(request, f"You left {tenant.slug}; your API tokens for it are revoked.")
        return redirect("home")
    return render(request, "confirm.html", tenant_context(
        request.user, tenant, "members",
        title=f"Leave {tenant.slug}?",
        body=f"You lose access to every function of {tenant.slug} at once, and your API tokens for it are "
             "revoked. An admin of the tenant can add you again.",
        confirm_label="Leave tenant", cancel_url=reverse("tenant_members", args=[tenant.slug])))


# ---- API tokens ----------------------------------------------------------------------------

@tenant_page
def tokens(request, tenant):
    allowed = token_scopes_allowed(user_role(request.user, tenant), superuser=request.user.is_superuser)
    form = TokenCreateForm(request.POST or None, allowed_scopes=allowed)
    new_token = None
    if request.method == "POST" and form.is_valid():
        try:
            token, plaintext = token_create(acting_user=request.user, tenant=tenant, name=form.cleaned_data["name"],
                                            scopes=form.cleaned_data["scopes"], expires_at=form.expires_at())
        except NimbusError as exc:
            form_error_from(form, exc)
        else:
            # Shown in this response only: the plaintext is never stored, so no redirect.
            new_token = {"token": token, "plaintext": plaintext}
            form = TokenCreateForm(allowed_scopes=allowed)
    token_list = tokens_for_user(request.user, tenant)
    show_revoked = request.GET.get("revoked") == "1"
    if not show_revoked:
        token_list = token_list.filter(revoked_at__isnull=True)
    page = Paginator(token_list.order_by("-created_at"), TOKENS_PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "tenancy/tokens.html", tenant_context(
        request.user, tenant, "tokens", tokens=page.object_list, page=page, show_revoked=show_revoked,
        form=form, new_token=new_token))


@tenant_page
def token_revoke_view(request, tenant, token_id):
    token = tokens_for_user(request.user, tenant).filter(pk=token_id).first()
    if token is None:
        raise Http404("Token not found.")
    if request.method == "POST":
        try:
            token_revoke(acting_user=request.user, token=token)
        except NimbusError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Token {token.name} ({token.prefix}…) is revoked.")
        return redirect("tenant_tokens", tenant=tenant.slug)
    return render(request, "confirm.html", tenant_context(
        request.user, tenant, "tokens",
        title=f"Revoke token {token.name}?",
        body=f"Scripts using {token.prefix}… will get 401 from now on. This cannot be undone.",
        confirm_label="Revoke token", cancel_url=reverse("tenant_tokens", args=[tenant.slug])))


# ---- quota ---------------------------------------------------------------------------------

@tenant_page
def quota(request, tenant):
    functions = functions_for_user(request.user, tenant=tenant)
    active = functions.exclude(state=Function.State.OFFLINE)
    reserved = active.aggregate(memory=Sum(F("memory_mb") * F("max_instances")),
                                gpus=Sum(F("gpus") * F("max_instances")))
    limits = tenant.quota
    usage = [
        ("Functions", functions.count(), limits.max_functions, ""),
        ("Reserved memory", reserved["memory"] or 0, limits.max_total_memory_mb, "MB"),
        ("GPUs", reserved["gpus"] or 0, limits.max_gpus, ""),
    ]
    rows = [{"label": label, "used": used, "limit": limit, "unit": unit,
             "percent": min(100, round(100 * used / limit)) if limit else (100 if used else 0)}
            for label, used, limit, unit in usage]
    per_function = [
        ("Memory per function", limits.max_memory_mb_per_function, "MB"),
        ("Instances per function", limits.max_instances_per_function, ""),
    ]
    return render(request, "tenancy/quota.html", tenant_context(
        request.user, tenant, "quota", usage=rows, per_function=per_function,
        max_concurrent=limits.max_concurrent_invocations, in_flight=tenant_slots.in_flight(tenant.pk)))


# ---- audit ---------------------------------------------------------------------------------

@tenant_page
def audit(request, tenant):
    _require_tenant(request.user, tenant, "view_audit")
    form = AuditFilterForm(request.GET or None)
    events = audit_events_for_user(request.user, tenant).select_related(None)
    if form.is_valid():
        data = form.cleaned_data
        if data["action"]:
            events = events.filter(action__startswith=data["action"].strip())
        if data["actor"]:
            events = events.filter(actor_name__iexact=data["actor"].strip())
        if data["q"]:
            events = events.filter(Q(target_repr__icontains=data["q"]) | Q(action__icontains=data["q"]))
    page = Paginator(events, AUDIT_PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "tenancy/audit.html", tenant_context(
        request.user, tenant, "audit", page=page, form=form))
