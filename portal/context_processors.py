"""Template context every page shares: engine name, public URL, and the top bar's tenant list."""

from django.conf import settings
from django.utils.functional import SimpleLazyObject


def nimbus(request):
    context = {"NIMBUS_ENGINE": settings.NIMBUS_ENGINE, "NIMBUS_PUBLIC_URL": settings.NIMBUS_PUBLIC_URL}
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        from tenancy.selectors import tenants_for_user

        # Lazy: only pages that draw the top bar pay for the query.
        context["nav_tenants"] = SimpleLazyObject(lambda: list(tenants_for_user(user).only("slug", "name")))
    return context
