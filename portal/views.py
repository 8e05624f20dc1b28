"""The portal's own pages (login, dashboard, health) and the one place where page views turn the
domain's refusals into HTTP answers (``nimbus_page``) or form errors (``form_error_from``)."""

from contextlib import contextmanager
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied as HttpForbidden
from django.db import connection
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render

from functions.models import Revision
from functions.selectors import functions_for_user
from portal.errors import NimbusError, NotFound, PermissionDenied
from tenancy.forms import TenantCreateForm
from tenancy.models import Membership
from tenancy.selectors import tenants_for_user
from tenancy.services import tenant_create


def nimbus_page(view):
    """Login required; another tenant's object (NotFound) is a 404, a visible object the user may
    not act on (PermissionDenied) a 403. Other NimbusErrors are the view's to show on its form."""

    @login_required
    @wraps(view)
    def signed_in(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except NotFound as exc:
            raise Http404(exc.message) from exc
        except PermissionDenied as exc:
            raise HttpForbidden(exc.message) from exc

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_authenticated and request.headers.get("HX-Request"):
            # An htmx swap (e.g. the polled revisions table) would put the login page inside the
            # table; send the whole window there instead.
            return HttpResponse(status=204, headers={"HX-Redirect": redirect_to_login(request.get_full_path()).url})
        return signed_in(request, *args, **kwargs)

    return wrapper


def form_error_from(form, exc: NimbusError) -> None:
    """Put a service's refusal on the field it names when the form has that field, else on top."""
    field = exc.field if exc.field in form.fields else None
    form.add_error(field, exc.message)


@contextmanager
def refusal_on(form):
    """Around a form's service call and its success answer: a refusal (NimbusError) ends the block
    and lands on the form, so the view goes on to show the form again; PermissionDenied goes on up
    (nimbus_page answers 403)."""
    try:
        yield
    except PermissionDenied:
        raise
    except NimbusError as exc:
        form_error_from(form, exc)


class LoginView(auth_views.LoginView):
    template_name = "portal/login.html"
    redirect_authenticated_user = True


class LogoutView(auth_views.LogoutView):
    pass


@nimbus_page
def home(request):
    """Dashboard: my tenants with my role, recent functions and deploys, and a new-tenant form."""
    user = request.user
    # Mirrors tenant_create's own check, so nobody is offered a form that will refuse them.
    can_create_tenant = user.is_superuser or getattr(settings, "NIMBUS_SELF_SERVICE_TENANTS", True)
    if request.method == "POST" and not can_create_tenant:
        raise HttpForbidden("Only platform operators can create tenants.")
    form = TenantCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            tenant = tenant_create(acting_user=user, slug=form.cleaned_data["slug"], name=form.cleaned_data["name"])
        except NimbusError as exc:
            form_error_from(form, exc)
        else:
            messages.success(request, f"Tenant {tenant.slug} created. Create its first function below.")
            return redirect("tenant_functions", tenant=tenant.slug)
    tenants = list(tenants_for_user(user).order_by("slug"))
    roles = dict(Membership.objects.filter(user=user, tenant__in=tenants).values_list("tenant_id", "role"))
    visible = functions_for_user(user)
    recent_functions = list(visible.order_by("-updated_at")[:8])
    recent_deploys = list(
        Revision.objects.filter(function__in=visible.values("pk"))
        .select_related("function__tenant", "author").defer("files", "config").order_by("-created_at")[:10])
    return render(request, "portal/home.html", {
        "tenant_rows": [(t, roles.get(t.pk)) for t in tenants],
        "recent_functions": recent_functions,
        "recent_deploys": recent_deploys,
        "form": form,
        "can_create_tenant": can_create_tenant,
    })


def livez(request):
    """Liveness: the process answers requests. It reads no database, so a busy pool or a database
    outage (which /healthz reports, for readiness) never gets a healthy process restarted."""
    return JsonResponse({"status": "ok"})


def healthz(request):
    """Readiness: the process answers and gets a database connection (503 with Retry-After when none
    comes free in time)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})
