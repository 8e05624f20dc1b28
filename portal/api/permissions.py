"""The project-wide API permission: who may reach an endpoint at all, and what an API token allows.

Object-level decisions (may this user change this function?) stay in selectors and services;
this class only adds what is specific to the API edge: authentication, and the two limits of an
API token, its single tenant and its scopes.
"""

from rest_framework import permissions

from portal.errors import NotFound, PermissionDenied
from tenancy.models import ApiToken

SCOPE_READ = ApiToken.Scope.READ
SCOPE_WRITE = ApiToken.Scope.WRITE
SCOPE_DEPLOY = ApiToken.Scope.DEPLOY


def request_token(request) -> ApiToken | None:
    """The API token the request authenticated with, or None for a session."""
    auth = getattr(request, "auth", None)
    return auth if isinstance(auth, ApiToken) else None


def required_scope(request, view) -> str:
    """``read`` for safe methods; for changes the view's ``token_scope`` (``deploy`` on the deploy
    verbs), ``write`` otherwise."""
    if request.method in permissions.SAFE_METHODS:
        return SCOPE_READ
    return getattr(view, "token_scope", None) or SCOPE_WRITE


class NimbusApiPermission(permissions.BasePermission):
    """Authenticated users only; a token reaches its own tenant alone and only within its scopes.

    The tenant comes from the URL (``tenant_slug``). Another tenant answers 404, as it would for a
    user who is not a member, so a token cannot probe which tenants exist.
    """

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not user or not user.is_authenticated:
            return False
        token = request_token(request)
        if token is None:
            return True
        slug = view.kwargs.get("tenant_slug") if hasattr(view, "kwargs") else None
        if slug is not None and slug != token.tenant.slug:
            raise NotFound("Tenant not found.")
        scope = required_scope(request, view)
        if not token.has_scope(scope):
            raise PermissionDenied(
                f"This API token lacks the '{scope}' scope (it has: {', '.join(token.scopes) or 'none'}).")
        return True
