"""Roles and what each may do, as django-guardian object permissions held by per-tenant groups.

Every tenant has one group per role (``tenant-<id>-<role>``). The group holds object
permissions on the tenant and on each of the tenant's functions; a membership puts the user in
exactly one of those groups. A function can also be shared with one user directly.
"""

from tenancy.models import ApiToken, Role

Scope = ApiToken.Scope

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

# What sharing a function with one user grants, by access level. Running a function goes with
# changing it (INVOKE_PERM): an "edit" or "deploy" share lets its user invoke the function (the IDE's
# test panel and an API token with the invoke scope); a "view" share reads only, like the viewer role.
SHARE_LEVELS = {
    "view": {"view_function"},
    "edit": {"view_function", "change_function"},
    "deploy": {"view_function", "change_function", "deploy_function"},
}

ALL_FUNCTION_PERMS = set().union(*FUNCTION_PERMS.values())

# Who may run a function (through the gateway with a token or the IDE's test signature, or queue an
# async call of it): whoever may change it. That is every developer, admin and owner of its tenant
# through their role, and a user the function is shared with at "edit" or "deploy". Viewers read only.
INVOKE_PERM = "change_function"

# The scopes an API token may carry, by its user's role: no wider than what the role lets the user
# do in person. Checked when a token is made (token_create) and again on every use against the
# user's role at that moment, so a member who is downgraded loses what the new role does not allow.
# A viewer's token may carry "invoke" for the functions shared with them to run (INVOKE_PERM is still
# checked per function); on anything else it only reads, even where a share lets them edit in person
# (a share widens what a token may run, not what it may write). Publishing events takes a developer.
ROLE_TOKEN_SCOPES = {
    Role.VIEWER: frozenset({Scope.READ, Scope.INVOKE}),
    Role.DEVELOPER: frozenset({Scope.READ, Scope.WRITE, Scope.DEPLOY, Scope.INVOKE, Scope.PUBLISH}),
    Role.ADMIN: frozenset(Scope.values),
    Role.OWNER: frozenset(Scope.values),
}

ROLE_ORDER = [Role.VIEWER, Role.DEVELOPER, Role.ADMIN, Role.OWNER]


def role_group_name(tenant_id: int, role: str) -> str:
    return f"tenant-{tenant_id}-{role}"


def role_at_least(role: str, minimum: str) -> bool:
    return ROLE_ORDER.index(Role(role)) >= ROLE_ORDER.index(Role(minimum))


def token_scopes_allowed(role: str | None, *, superuser: bool = False) -> frozenset[str]:
    """The scopes a token of a user with this role (None: not a member) may carry and use.
    Platform operators act on every tenant, so their tokens may carry every scope."""
    if superuser:
        return frozenset(Scope.values)
    return ROLE_TOKEN_SCOPES.get(role, frozenset()) if role else frozenset()
