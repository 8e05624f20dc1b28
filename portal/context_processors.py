"""Template context every page shares: engine name, public URL, the warning that functions run
unsandboxed, and the top bar's tenant list."""

from django.conf import settings
from django.utils.functional import SimpleLazyObject

UNSANDBOXED_WARNING = ("Functions are not isolated: the local engine runs them without a sandbox "
                       "(NIMBUS_LOCAL_SANDBOX=none).")


def unsandboxed_warning() -> str | None:
    """The banner's sentence while the local engine runs functions without a sandbox, else None."""
    # Lower case as the local engine reads the mode (sandbox.resolve_mode): "NONE" runs unsandboxed too.
    mode = str(getattr(settings, "NIMBUS_LOCAL", {}).get("SANDBOX") or "bwrap").lower()
    if settings.NIMBUS_ENGINE == "local" and mode == "none":
        return UNSANDBOXED_WARNING
    return None


def nimbus(request):
    # Every page, the admin's and the login page included: whoever signs in should know that a
    # tenant's code can reach the host.
    context = {"NIMBUS_ENGINE": settings.NIMBUS_ENGINE, "NIMBUS_PUBLIC_URL": settings.NIMBUS_PUBLIC_URL,
               "NIMBUS_UNSANDBOXED_WARNING": unsandboxed_warning()}
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        from tenancy.selectors import tenants_for_user

        # Lazy: only pages that draw the top bar pay for the query.
        context["nav_tenants"] = SimpleLazyObject(lambda: list(tenants_for_user(user).only("slug", "name")))
    return context
