"""Who may run a function through the gateway, decided from the caller's role and shares as they are
now: an API token's access (its scopes narrowed to its user's current role, and the functions that
user may invoke) and the IDE test signature's signer.

Running a function takes ``tenancy.permissions.INVOKE_PERM`` on it: a developer, admin or owner of
its tenant, or a user it is shared with at "edit" or "deploy". Viewers read only.
"""

from __future__ import annotations

from dataclasses import dataclass

# Models are imported where used: the gateway imports this module, and it loads before Django's apps.


@dataclass(frozen=True)
class TokenAccess:
    """What one API token may do at the gateway, as of the moment it was looked up."""

    tenant_id: int
    user_id: int
    scopes: frozenset[str]
    invoke_all: bool  # the user's role lets them run every function of the tenant
    invocable: frozenset[int]  # otherwise, the functions shared with them at a level that runs them
    expires_at: float | None = None  # the token's expiry (a Unix time): a cached access ends with it

    def usable(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def may_invoke(self, function_id: int) -> bool:
        return self.invoke_all or function_id in self.invocable


def token_access(plaintext: str) -> TokenAccess | None:
    """The access of the usable token with this plaintext, or None."""
    from tenancy.services import token_authenticate

    token = token_authenticate(plaintext)
    return None if token is None else access_of_token(token)


def access_of_token(token) -> TokenAccess:
    """The access of a token ``token_authenticate`` returned (its scopes narrowed, its ``member_role``
    read): for a caller that already holds the token, as the async path does for callback URLs."""
    from functions.models import FunctionUserObjectPermission
    from tenancy.models import ApiToken
    from tenancy.permissions import FUNCTION_PERMS, INVOKE_PERM

    scopes = frozenset(token.scopes)
    invoke_all = token.user.is_superuser or INVOKE_PERM in FUNCTION_PERMS.get(token.member_role, ())
    invocable: frozenset[int] = frozenset()
    if ApiToken.Scope.INVOKE in scopes and not invoke_all:
        invocable = frozenset(FunctionUserObjectPermission.objects.filter(
            user_id=token.user_id, permission__codename=INVOKE_PERM, content_object__tenant_id=token.tenant_id,
        ).values_list("content_object_id", flat=True))
    return TokenAccess(tenant_id=token.tenant_id, user_id=token.user_id, scopes=scopes, invoke_all=invoke_all,
                       invocable=invocable,
                       expires_at=token.expires_at.timestamp() if token.expires_at is not None else None)


def signer_may_invoke(user_id: int, function_id: int) -> bool:
    """Whether the user who was handed an IDE test signature may still run the function: the
    signature proves who asked and when, this says whether they may now (a removed or downgraded
    member's signatures stop working at once)."""
    from django.contrib.auth import get_user_model

    from functions.models import Function
    from functions.selectors import user_can_function
    from tenancy.permissions import INVOKE_PERM

    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    function = Function.objects.filter(pk=function_id).select_related("tenant").first()
    if user is None or function is None:
        return False
    return user_can_function(user, function, INVOKE_PERM.removesuffix("_function"))
