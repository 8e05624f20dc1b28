"""Reads of functions and their parts that depend on who asks (the tenancy chokepoint).

A function the user may not see is a NotFound (404); one they see but may not change raises
PermissionDenied (403), since its existence is no secret to them.
"""

from django.db.models import QuerySet
from guardian.core import ObjectPermissionChecker
from guardian.shortcuts import get_objects_for_user, get_users_with_perms

from functions.models import EnvVar, Function, Invocation, Revision, Secret, SourceFile, TrafficTarget
from portal.errors import NotFound, PermissionDenied

ACTIONS = ("view", "change", "deploy", "delete", "share")


def functions_for_user(user, action: str = "view", *, tenant=None) -> QuerySet[Function]:
    if action not in ACTIONS:
        raise ValueError(f"unknown function action {action!r}")
    if not user or not user.is_authenticated:
        return Function.objects.none()
    qs = Function.objects.select_related("tenant")
    if tenant is not None:
        qs = qs.filter(tenant=tenant)
    return get_objects_for_user(user, f"functions.{action}_function", klass=qs, accept_global_perms=False)


def user_can_function(user, function: Function, action: str, checker: ObjectPermissionChecker | None = None) -> bool:
    if not user.is_authenticated:
        return False
    if user.is_superuser:
        return True
    if checker is not None:
        return checker.has_perm(f"{action}_function", function)
    return user.has_perm(f"functions.{action}_function", function)


def function_for_user(user, tenant_slug: str, name: str, action: str = "view") -> Function:
    function = functions_for_user(user).filter(tenant__slug=tenant_slug, name=name).first()
    if function is None:
        raise NotFound("Function not found.")
    if action != "view" and not user_can_function(user, function, action):
        raise PermissionDenied(f"You may not {action} this function.")
    return function


def function_by_id_for_user(user, function_id: int, action: str = "view") -> Function:
    function = functions_for_user(user).filter(pk=function_id).first()
    if function is None:
        raise NotFound("Function not found.")
    if action != "view" and not user_can_function(user, function, action):
        raise PermissionDenied(f"You may not {action} this function.")
    return function


def function_permissions(user, functions) -> dict[int, set[str]]:
    """{function id: {"view", "change", ...}} for many functions in a constant number of queries."""
    functions = list(functions)
    if user.is_superuser:
        return {f.pk: set(ACTIONS) for f in functions}
    checker = ObjectPermissionChecker(user)
    if functions:
        checker.prefetch_perms(functions)
    return {f.pk: {a for a in ACTIONS if checker.has_perm(f"{a}_function", f)} for f in functions}


def source_files_for_function(function: Function) -> QuerySet[SourceFile]:
    """The draft's files, by path (a caller that only needs names should add ``.only("path")``)."""
    return SourceFile.objects.filter(function=function)


def source_file_for_function(function: Function, path: str) -> SourceFile:
    source = SourceFile.objects.filter(function=function, path=path).first()
    if source is None:
        raise NotFound(f"The function has no file '{path}'.")
    return source


def env_vars_for_function(function: Function) -> QuerySet[EnvVar]:
    return EnvVar.objects.filter(function=function)


def secrets_for_function(function: Function) -> QuerySet[Secret]:
    """Secret names and times only: values never leave the services."""
    return Secret.objects.filter(function=function).only("name", "updated_at")


def retry_policy_for_function(function: Function):
    """The function's retry policy, or an unsaved one with the defaults."""
    from functions.models import RetryPolicy

    return RetryPolicy.objects.filter(function=function).first() or RetryPolicy(function=function)


def revisions_for_function(function: Function) -> QuerySet[Revision]:
    return Revision.objects.filter(function=function).select_related("author").defer("files")


def revision_for_function(function: Function, number: int) -> Revision:
    revision = Revision.objects.filter(function=function, number=number).select_related("author").first()
    if revision is None:
        raise NotFound(f"Revision {number} not found.")
    return revision


def traffic_for_function(function: Function) -> list[TrafficTarget]:
    return list(TrafficTarget.objects.filter(function=function).select_related("revision")
                .defer("revision__files", "revision__config"))


def invocations_for_function(function: Function) -> QuerySet[Invocation]:
    return Invocation.objects.filter(function=function).select_related("revision").defer(
        "revision__files", "revision__config")


def function_direct_grants(function: Function) -> dict:
    """{user: [perm codenames]} granted to single users on this function (sharing), not through roles."""
    return get_users_with_perms(function, attach_perms=True, with_group_users=False, with_superusers=False)


# ---- triggers, deliveries and sequences (issue 6) -------------------------------------------------------

def triggers_for_function(function: Function):
    from functions.models import Trigger

    return Trigger.objects.filter(function=function).order_by("name")


def trigger_for_function(function: Function, name: str):
    trigger = triggers_for_function(function).filter(name=name).select_related("function__tenant").first()
    if trigger is None:
        raise NotFound(f"The function has no trigger '{name}'.")
    return trigger


def deliveries_for_function(function: Function, *, state: str | None = None):
    from functions.models import Delivery

    qs = Delivery.objects.filter(function=function).select_related("function").defer("body", "result_body")
    return qs.filter(state=state) if state else qs


def delivery_for_function(function: Function, delivery_id):
    from functions.models import Delivery

    delivery = Delivery.objects.filter(function=function, pk=delivery_id).select_related("function__tenant").first()
    if delivery is None:
        raise NotFound("Delivery not found.")
    return delivery


def sequences_for_tenant(user, tenant):
    """The tenant's sequences (the caller reached the tenant through tenant_for_user)."""
    from django.db.models import Prefetch

    from functions.models import Sequence, SequenceStep

    return Sequence.objects.filter(tenant=tenant).prefetch_related(
        Prefetch("steps", queryset=SequenceStep.objects.select_related("function").order_by("position")))


def sequence_for_tenant(user, tenant, name: str):
    sequence = sequences_for_tenant(user, tenant).filter(name=name).first()
    if sequence is None:
        raise NotFound(f"There is no sequence '{name}'.")
    return sequence


def sequence_runs(sequence):
    """One row per run of the sequence, ``{"run_id", "started"}``, newest first (paginate it, then
    read the runs' steps with ``deliveries_of_runs``)."""
    from django.db.models import Min

    from functions.models import Delivery

    return (Delivery.objects.filter(sequence=sequence, run_id__isnull=False).values("run_id")
            .annotate(started=Min("created_at")).order_by("-started", "run_id"))


def sequences_last_run_ids(sequences) -> dict[int, object]:
    """{sequence id: run id of its newest run} for a page of sequences, in one query."""
    from django.db.models import Min, OuterRef, Subquery

    from functions.models import Delivery, Sequence

    newest = (Delivery.objects.filter(sequence=OuterRef("pk"), run_id__isnull=False).values("run_id")
              .annotate(started=Min("created_at")).order_by("-started").values("run_id")[:1])
    ids = [s.pk for s in sequences]
    return {pk: run_id for pk, run_id in Sequence.objects.filter(pk__in=ids).annotate(last_run=Subquery(newest))
            .values_list("pk", "last_run") if run_id}


def delivery_results(tenant, delivery_ids) -> dict:
    """{delivery id: result body} for these deliveries of the tenant (bodies are deferred elsewhere)."""
    from functions.models import Delivery

    return dict(Delivery.objects.filter(function__tenant=tenant, pk__in=list(delivery_ids))
                .values_list("pk", "result_body"))


def deliveries_of_runs(tenant, run_ids):
    """The deliveries (one per step reached) of these sequence runs of the tenant, by run and step."""
    from functions.models import Delivery

    return (Delivery.objects.filter(function__tenant=tenant, run_id__in=list(run_ids))
            .select_related("function").defer("body", "result_body").order_by("run_id", "step"))
