"""Roles and what each may do, as django-guardian object permissions held by per-tenant groups.

Every tenant has one group per role (``tenant-<id>-<role>``). The group holds object
permissions on the tenant and on each of the tenant's functions; a membership puts the user in
exactly one of those groups. A function can also be shared with one user directly.
"""

from tenancy.models import Role

TENANT_PERMS = {
    Role.VIEWER: {"view_tenant"},
    Role.DEVELOPER: {"view_tenant", "create_function"},
    Role.ADMIN: {"view_tenant", "create_function", "manage_members", "manage_tokens", "view_audit"},
    Role.OWNER: {"view_tenant", "create_function", "manage_members", "manage_tokens", "view_audit",
                 "change_tenant"},
}

FUNCTION_PERMS = {
    Role.VIEWER: {"view_function"},
    Role.DEVELOPER: {"view_function", "change_function", "deploy_function"},
    Role.ADMIN: {"view_function", "change_function", "deploy_function", "delete_function", "share_function"},
    Role.OWNER: {"view_function", "change_function", "deploy_function", "delete_function", "share_function"},
}

# What sharing a function with one user grants, by access level.
SHARE_LEVELS = {
    "view": {"view_function"},
    "edit": {"view_function", "change_function"},
    "deploy": {"view_function", "change_function", "deploy_function"},
}

ALL_FUNCTION_PERMS = set().union(*FUNCTION_PERMS.values())

ROLE_ORDER = [Role.VIEWER, Role.DEVELOPER, Role.ADMIN, Role.OWNER]


def role_group_name(tenant_id: int, role: str) -> str:
    return f"tenant-{tenant_id}-{role}"


def role_at_least(role: str, minimum: str) -> bool:
    return ROLE_ORDER.index(Role(role)) >= ROLE_ORDER.index(Role(minimum))
