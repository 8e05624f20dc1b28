"""Function pages: the tenant's function list, and one function's overview, configuration, files,
revisions (deploy, rollback), traffic, environment and secrets, sharing, invocations and deletion."""

import shlex
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse

from functions.forms import (
    DeleteFunctionForm,
    DeployForm,
    EnvVarForm,
    FunctionConfigForm,
    FunctionCreateForm,
    FunctionFilterForm,
    SecretForm,
    ShareForm,
    starter_choices,
)
from functions.models import Function, Revision
from functions.selectors import (
    function_direct_grants,
    function_for_user,
    function_permissions,
    functions_for_user,
    env_vars_for_function,
    invocations_for_function,
    revisions_for_function,
    secrets_for_function,
    source_file_for_function,
    source_files_for_function,
    traffic_for_function,
)
from functions.services import (
    CONFIG_FIELDS,
    function_bring_online,
    function_create,
    function_delete,
    function_deploy,
    function_env_delete,
    function_env_set,
    function_secret_delete,
    function_secret_set,
    function_share,
    function_take_offline,
    function_traffic_set,
    function_unshare,
    function_update,
    revision_rollback,
)
from portal.errors import NimbusError, NotFound, PermissionDenied
from portal.views import nimbus_page, refusal_on
from tenancy.permissions import SHARE_LEVELS
from tenancy.views import tenant_context, tenant_page

FUNCTIONS_PAGE_SIZE = 25
INVOCATIONS_PAGE_SIZE = 50
BUSY_STATUSES = (Revision.Status.PENDING, Revision.Status.DEPLOYING)


# ---- the tenant's functions ----------------------------------------------------------------

@tenant_page
def function_list(request, tenant):
    user = request.user
    create_form = FunctionCreateForm(request.POST or None)
    if request.method == "POST":
        if create_form.is_valid():
            data = create_form.cleaned_data
            with refusal_on(create_form):
                function = function_create(acting_user=user, tenant=tenant, name=data["name"],
                                           runtime=data["runtime"], starter=data["starter"])
                messages.success(request, f"Function {function.name} created from the {data['starter']} starter.")
                return redirect("function_detail", tenant=tenant.slug, function=function.name)
    # Its own ids: the create form beside it has a "runtime" field too.
    filters = FunctionFilterForm(request.GET or None, auto_id="filter-%s")
    functions = functions_for_user(user, tenant=tenant).order_by("name")
    if filters.is_valid():
        data = filters.cleaned_data
        if data["q"]:
            functions = functions.filter(Q(name__icontains=data["q"]) | Q(description__icontains=data["q"]))
        if data["state"]:
            functions = functions.filter(state=data["state"])
        if data["runtime"]:
            functions = functions.filter(runtime=data["runtime"])
    page = Paginator(functions, FUNCTIONS_PAGE_SIZE).get_page(request.GET.get("page"))
    rows = list(page.object_list)
    perms = function_permissions(user, rows)
    context = tenant_context(
        user, tenant, "functions", page=page, rows=[(f, perms.get(f.pk, set())) for f in rows],
        filters=filters, create_form=create_form, filtered=bool(request.GET.get("q") or request.GET.get("state")
                                                                 or request.GET.get("runtime")))
    return render(request, "functions/list.html", context)


@tenant_page
def starter_options(request, tenant):
    """The <option>s of the starter select for a runtime (htmx swaps them in when the runtime changes)."""
    return render(request, "functions/_starter_options.html",
                  {"choices": starter_choices(request.GET.get("runtime", ""))})


# ---- one function --------------------------------------------------------------------------

def function_page(view):
    """Resolve ``<tenant>/<function>`` through the selector (404 for others) and pass the Function."""

    @nimbus_page
    @wraps(view)
    def wrapper(request, tenant, function, *args, **kwargs):
        return view(request, function_for_user(request.user, tenant, function), *args, **kwargs)

    return wrapper


def invoke_url(function: Function) -> str:
    return f"{settings.NIMBUS_PUBLIC_URL}/fn/{function.tenant.slug}/{function.name}/"


def curl_line(function: Function) -> str:
    parts = ["curl", "-sS", "-X", "POST", invoke_url(function), "-H", "Content-Type: application/json"]
    line = " ".join(shlex.quote(p) for p in parts)
    if function.invoke_auth == Function.InvokeAuth.TOKEN:
        # Double quotes so the shell expands the variable holding the user's token.
        line += ' -H "Authorization: Bearer $NIMBUS_TOKEN"'
    return line + " -d '{\"name\": \"Nimbus\"}'"


def function_context(request, function: Function, active: str, **extra) -> dict:
    perms = function_permissions(request.user, [function])[function.pk]
    return {
        "tenant": function.tenant,
        "function": function,
        "can": {action: action in perms for action in ("view", "change", "deploy", "delete", "share")},
        "active_tab": active,
        "invoke_url": invoke_url(function),
        "ide_url": reverse("webide:editor", kwargs={"tenant": function.tenant.slug, "function": function.name}),
        **extra,
    }


def _back(function: Function, name: str = "function_detail"):
    return redirect(name, tenant=function.tenant.slug, function=function.name)


def _url(function: Function, name: str) -> str:
    return reverse(name, kwargs={"tenant": function.tenant.slug, "function": function.name})


def _require(request, function: Function, action: str) -> None:
    if not function_permissions(request.user, [function])[function.pk] & {action}:
        raise PermissionDenied(f"You may not {action} this function.")


def _act(request, call, success) -> None:
    """Run a confirmed action's service: a refusal becomes an error message (a missing right still
    answers 403); ``success`` (text, or a callable read after the call) becomes a success message."""
    try:
        call()
    except PermissionDenied:
        raise
    except NimbusError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, success() if callable(success) else success)


@function_page
def function_detail(request, function):
    traffic = traffic_for_function(function)
    revisions = list(revisions_for_function(function)[:5])
    invocations = list(invocations_for_function(function)[:5])
    return render(request, "functions/detail.html", function_context(
        request, function, "overview", traffic=traffic, revisions=revisions, invocations=invocations,
        curl=curl_line(function), busy=any(r.status in BUSY_STATUSES for r in revisions)))


@function_page
def function_state(request, function):
    """Take the function offline (GET asks first: it stops serving) or bring it back online."""
    if request.method != "POST":
        _require(request, function, "deploy")
        if function.state == Function.State.OFFLINE:
            return _back(function)
        return render(request, "confirm.html", function_context(
            request, function, "overview", title=f"Take {function.name} offline?",
            body="Its instances stop and every call answers 404 until you bring it back online. "
                 "Revisions, traffic and configuration are kept.",
            confirm_label="Take offline", cancel_url=_url(function, "function_detail")))
    if request.method == "POST":
        service = function_bring_online if request.POST.get("online") else function_take_offline
        _act(request, lambda: service(acting_user=request.user, function=function),
             lambda: f"{function.name} is {function.get_state_display().lower()}.")
    return _back(function)


@function_page
def function_config(request, function):
    initial = {field: getattr(function, field) for field in CONFIG_FIELDS}
    form = FunctionConfigForm(request.POST or None, initial=initial)
    if request.method == "POST":
        _require(request, function, "change")
        if form.is_valid():
            with refusal_on(form):
                function_update(acting_user=request.user, function=function, **form.cleaned_data)
                messages.success(request, "Configuration saved. Instance settings apply from the next deploy.")
                return _back(function, "function_config")
            function.refresh_from_db()  # refused: show the saved configuration beside the errors
    return render(request, "functions/config.html", function_context(request, function, "config", form=form))


@function_page
def function_files(request, function):
    files = list(source_files_for_function(function).only("path", "content", "updated_at"))
    return render(request, "functions/files.html", function_context(request, function, "files", files=files))


@function_page
def function_file(request, function, path):
    try:
        source = source_file_for_function(function, path)
    except NotFound:
        raise Http404("No such file.") from None
    return render(request, "functions/file.html", function_context(request, function, "files", source=source))


# ---- revisions, deploy, rollback, traffic --------------------------------------------------

def _revisions_context(request, function: Function, **extra) -> dict:
    revisions = list(revisions_for_function(function))
    serving = {t.revision_id: t for t in traffic_for_function(function)}
    for revision in revisions:
        revision.target = serving.get(revision.pk)
    return function_context(
        request, function, "revisions", revisions=revisions,
        busy=any(r.status in BUSY_STATUSES for r in revisions), **extra)


@function_page
def function_revisions(request, function):
    return render(request, "functions/revisions.html",
                  _revisions_context(request, function, deploy_form=DeployForm()))


@function_page
def function_revisions_table(request, function):
    """The revisions table alone, polled by htmx while a deploy is pending or deploying."""
    return render(request, "functions/_revisions_table.html", _revisions_context(request, function))


@function_page
def function_deploy_view(request, function):
    if request.method != "POST":
        return _back(function, "function_revisions")
    _require(request, function, "deploy")
    form = DeployForm(request.POST)
    if form.is_valid():
        with refusal_on(form):
            revision = function_deploy(acting_user=request.user, function=function,
                                       message=form.cleaned_data["message"], promote=form.cleaned_data["promote"])
            messages.success(request, f"Revision {revision.number} is deploying.")
            return _back(function, "function_revisions")
    return render(request, "functions/revisions.html",
                  _revisions_context(request, function, deploy_form=form), status=400)


@function_page
def revision_rollback_view(request, function, number):
    _require(request, function, "deploy")
    revision = revisions_for_function(function).filter(number=number).first()
    if revision is None:
        raise Http404("No such revision.")
    if request.method == "POST":
        _act(request, lambda: revision_rollback(acting_user=request.user, function=function, number=number),
             f"All traffic goes to revision {number} again.")
        return _back(function, "function_revisions")
    return render(request, "confirm.html", function_context(
        request, function, "revisions",
        title=f"Roll back {function.name} to revision {number}?",
        body=f"Revision {number} ({revision.message or 'no message'}) takes 100% of the traffic at once. "
             "Tagged revisions keep their tags.",
        confirm_label=f"Roll back to {number}", cancel_url=_url(function, "function_revisions")))


@function_page
def function_traffic(request, function):
    ready = list(revisions_for_function(function).filter(status=Revision.Status.READY))
    current = {t.revision_id: t for t in traffic_for_function(function)}
    error = None
    if request.method == "POST":
        _require(request, function, "deploy")
        targets = [{"revision": r.number, "percent": request.POST.get(f"percent-{r.number}", "0") or "0",
                    "tag": request.POST.get(f"tag-{r.number}", "")} for r in ready]
        try:
            function_traffic_set(acting_user=request.user, function=function, targets=targets)
        except PermissionDenied:
            raise
        except NimbusError as exc:
            error = exc.message
        else:
            messages.success(request, "Traffic split saved.")
            return _back(function, "function_traffic")
    rows = []
    for revision in ready:
        target = current.get(revision.pk)
        rows.append({
            "revision": revision,
            "percent": request.POST.get(f"percent-{revision.number}") if error else (target.percent if target else 0),
            "tag": request.POST.get(f"tag-{revision.number}") if error else (target.tag if target else ""),
        })
    return render(request, "functions/traffic.html", function_context(
        request, function, "traffic", rows=rows, error=error), status=400 if error else 200)


# ---- environment and secrets ---------------------------------------------------------------

@function_page
def function_env(request, function):
    env_form, secret_form = EnvVarForm(prefix="env"), SecretForm(prefix="secret")
    if request.method == "POST":
        _require(request, function, "change")
        kind = request.POST.get("kind")
        form = EnvVarForm(request.POST, prefix="env") if kind == "env" else SecretForm(request.POST, prefix="secret")
        service = function_env_set if kind == "env" else function_secret_set
        if form.is_valid():
            with refusal_on(form):
                service(acting_user=request.user, function=function, **form.cleaned_data)
                label = "Variable" if kind == "env" else "Secret"
                messages.success(request, f"{label} {form.cleaned_data['name']} saved; it applies from the next deploy.")
                return _back(function, "function_env")
        if kind == "env":
            env_form = form
        else:
            secret_form = form
    return render(request, "functions/env.html", function_context(
        request, function, "env", env_vars=env_vars_for_function(function),
        secrets=secrets_for_function(function),
        env_form=env_form, secret_form=secret_form))


@function_page
def function_env_remove(request, function, kind, name):
    if kind not in ("env", "secret"):
        raise Http404("No such kind of variable.")
    _require(request, function, "change")
    variables = env_vars_for_function(function) if kind == "env" else secrets_for_function(function)
    if not variables.filter(name=name).exists():
        raise Http404("No such variable.")
    label = "variable" if kind == "env" else "secret"
    if request.method == "POST":
        service = function_env_delete if kind == "env" else function_secret_delete
        _act(request, lambda: service(acting_user=request.user, function=function, name=name),
             f"The {label} {name} is removed; it applies from the next deploy.")
        return _back(function, "function_env")
    return render(request, "confirm.html", function_context(
        request, function, "env", title=f"Remove the {label} {name}?",
        body=f"The next deploy of {function.name} runs without {name}. Running revisions keep it.",
        confirm_label=f"Remove {label}", cancel_url=_url(function, "function_env")))


# ---- sharing -------------------------------------------------------------------------------

def _share_level(perms) -> str:
    for level in ("deploy", "edit", "view"):
        if set(SHARE_LEVELS[level]) <= set(perms):
            return level
    return "view"


@function_page
def function_sharing(request, function):
    form = ShareForm(request.POST or None)
    if request.method == "POST":
        _require(request, function, "share")
        if form.is_valid():
            with refusal_on(form):
                function_share(acting_user=request.user, function=function, **form.cleaned_data)
                messages.success(request, f"{form.cleaned_data['username']} now has {form.cleaned_data['level']} "
                                          f"access to {function.name}.")
                return _back(function, "function_sharing")
    grants = sorted(((user, _share_level(perms)) for user, perms in function_direct_grants(function).items()),
                    key=lambda pair: pair[0].username)
    return render(request, "functions/sharing.html", function_context(
        request, function, "sharing", grants=grants, form=form))


@function_page
def function_unshare_view(request, function, username):
    _require(request, function, "share")
    if username not in {user.username for user in function_direct_grants(function)}:
        raise Http404("No such grant.")
    if request.method == "POST":
        _act(request, lambda: function_unshare(acting_user=request.user, function=function, username=username),
             f"{username} no longer has direct access to {function.name}.")
        return _back(function, "function_sharing")
    return render(request, "confirm.html", function_context(
        request, function, "sharing", title=f"Stop sharing {function.name} with {username}?",
        body=f"{username} keeps only what their role in {function.tenant.slug} allows, if any.",
        confirm_label="Remove access", cancel_url=_url(function, "function_sharing")))


# ---- invocations and deletion --------------------------------------------------------------

@function_page
def function_invocations(request, function):
    page = Paginator(invocations_for_function(function), INVOCATIONS_PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "functions/invocations.html", function_context(
        request, function, "invocations", page=page))


@function_page
def function_delete_view(request, function):
    _require(request, function, "delete")
    form = DeleteFunctionForm(request.POST or None, function=function)
    if request.method == "POST" and form.is_valid():
        tenant_slug = function.tenant.slug
        with refusal_on(form):
            function_delete(acting_user=request.user, function=function)
            messages.success(request, f"Function {form.cleaned_data['confirm_name']} is deleted.")
            return redirect("tenant_functions", tenant=tenant_slug)
    return render(request, "functions/delete.html", function_context(request, function, "delete", form=form),
                  status=400 if form.is_bound else 200)
