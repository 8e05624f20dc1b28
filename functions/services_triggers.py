"""Every write for event-driven functions: triggers (cron, event), retry policy, async calls,
published CloudEvents, dead letters (replay, discard) and sequences."""

from __future__ import annotations

import logging
import uuid

from django.db import IntegrityError, transaction
from django.utils import timezone

from functions import outbound
from functions.engines import get_engine
from functions.models import Delivery, Function, RetryPolicy, Sequence, SequenceStep, Trigger
from functions.selectors import user_can_function
from functions.triggers import cron, events, queue
from functions.triggers.worker import notify
from portal.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from portal.text import unstorable
from tenancy.models import ApiToken
from tenancy.selectors import user_can_tenant
from tenancy.services import audit_record, full_clean_or_raise

log = logging.getLogger(__name__)

TRIGGER_FIELDS = ("enabled", "schedule", "time_zone", "filters")
POLICY_FIELDS = ("max_attempts", "backoff_seconds", "backoff_max_seconds", "max_event_age_seconds", "callback_url")
CALLBACK_URL_MAX = 2000


def _require(user, function: Function, action: str) -> None:
    if not user_can_function(user, function, action):
        raise PermissionDenied(f"You may not {action} this function.")


def _require_storable(**fields) -> None:
    """Refuse text the database cannot store (a NUL, a lone surrogate) by the field that holds it,
    before PostgreSQL answers with an error instead of a refusal. A value is a string, or a list of
    filter objects whose keys and strings are checked one by one (``filters.<i>.<key>``)."""
    for field, value in fields.items():
        if isinstance(value, str):
            reason = unstorable(value)
            if reason:
                raise ValidationFailed(f"The {field.replace('_', ' ')} holds {reason}, which Nimbus does not "
                                       "accept.", field=field)
            continue
        for index, item in enumerate(value if isinstance(value, list) else []):
            for key, text in (item.items() if isinstance(item, dict) else ()):
                reason = unstorable(str(key))
                if reason:
                    raise ValidationFailed(f"A key of filter {index + 1} holds {reason}, which Nimbus does not "
                                           "accept.", field=f"{field}.{index}")
                reason = unstorable(text) if isinstance(text, str) else None
                if reason:
                    raise ValidationFailed(f"The {key} of filter {index + 1} holds {reason}, which Nimbus does "
                                           "not accept.", field=f"{field}.{index}.{key}")


def _clean_callback_url(url: str) -> str:
    """A callback URL the portal will post to, or DestinationRefused. The address is checked again
    when the callback is sent (functions.outbound): a name may resolve differently by then."""
    url = (url or "").strip()
    if not url:
        return ""
    _require_storable(callback_url=url)
    if len(url) > CALLBACK_URL_MAX:
        # Cutting it would post somewhere else than the user named.
        raise ValidationFailed(f"The callback URL is longer than {CALLBACK_URL_MAX} characters.",
                               field="callback_url")
    outbound.check_destination(url, field="callback_url")
    return url


def _sync_engine(function_id: int) -> None:
    """Tell the engine about the function's triggers (Knative turns them into Eventing objects)."""
    from functions.services import function_ref

    try:
        function = Function.objects.select_related("tenant").get(pk=function_id)
        get_engine().sync_triggers(function_ref(function), trigger_specs(function),
                                   policy=queue.policy_for(function_id))
    except Function.DoesNotExist:
        return
    except Exception:  # noqa: BLE001 - the database is the record; the engine is reconciled on the next change
        log.exception("syncing triggers of function %s failed", function_id)


def _sync_sequence(tenant: str, name: str, functions: list[str] | None, first_function_id: int | None) -> None:
    """Knative runs a sequence as a flows Sequence (with the first step's retry policy)."""
    try:
        policy = queue.policy_for(first_function_id) if first_function_id else None
        get_engine().sync_sequence(tenant, name, functions, policy=policy)
    except Exception:  # noqa: BLE001 - the database is the record; reconciled on the next change
        log.exception("syncing sequence %s/%s failed", tenant, name)


def trigger_specs(function: Function) -> list[dict]:
    """The function's enabled triggers as plain data for engines."""
    return [{"name": t.name, "kind": t.kind, "schedule": t.schedule, "time_zone": t.time_zone,
             "filters": list(t.filters or [])}
            for t in Trigger.objects.filter(function=function, enabled=True).order_by("name")]


def _clean_trigger(trigger: Trigger) -> None:
    if trigger.kind == Trigger.Kind.CRON:
        trigger.schedule = cron.validate_schedule(trigger.schedule, trigger.time_zone or "UTC")
        trigger.filters = []
        trigger.next_run_at = cron.next_run(trigger.schedule, trigger.time_zone, timezone.now()) \
            if trigger.enabled else None
    elif trigger.kind == Trigger.Kind.EVENT:
        trigger.filters = events.validate_filters(trigger.filters)
        trigger.schedule, trigger.next_run_at = "", None
    else:
        trigger.schedule, trigger.filters, trigger.next_run_at = "", [], None


def trigger_create(*, acting_user, function: Function, name: str, kind: str, enabled: bool = True,
                   schedule: str = "", time_zone: str = "UTC", filters: list | None = None) -> Trigger:
    _require(acting_user, function, "change")
    _require_storable(name=name, schedule=schedule or "", time_zone=time_zone or "", filters=filters or [])
    if kind not in Trigger.Kind.values:
        raise ValidationFailed(f"Trigger kind '{kind}': use one of {', '.join(Trigger.Kind.values)}.", field="kind")
    trigger = Trigger(function=function, name=name, kind=kind, enabled=enabled, schedule=schedule or "",
                      time_zone=time_zone or "UTC", filters=filters or [], created_by=acting_user)
    full_clean_or_raise(trigger, exclude=["function", "created_by", "filters", "next_run_at"])
    _clean_trigger(trigger)
    with transaction.atomic():
        try:
            with transaction.atomic():
                trigger.save()
        except IntegrityError:
            raise Conflict(f"The function already has a trigger named '{name}'.", field="name") from None
        audit_record(actor=acting_user, action="trigger.create", tenant=function.tenant, target=function,
                     details={"trigger": name, "kind": kind, "schedule": trigger.schedule,
                              "time_zone": trigger.time_zone, "filters": trigger.filters, "enabled": enabled})
        transaction.on_commit(lambda: _sync_engine(function.pk))
    return trigger


def trigger_update(*, acting_user, trigger: Trigger, **changes) -> Trigger:
    function = trigger.function
    _require(acting_user, function, "change")
    unknown = set(changes) - set(TRIGGER_FIELDS)
    if unknown:
        raise ValidationFailed(f"Unknown setting(s): {', '.join(sorted(unknown))}.")
    _require_storable(**{f: v for f, v in changes.items() if f != "enabled" and v is not None})
    before = {f: getattr(trigger, f) for f in changes}
    for field, value in changes.items():
        setattr(trigger, field, value)
    full_clean_or_raise(trigger, exclude=["function", "created_by", "filters", "next_run_at"])
    _clean_trigger(trigger)
    diff = {f: [before[f], getattr(trigger, f)] for f in changes if before[f] != getattr(trigger, f)}
    with transaction.atomic():
        trigger.save()
        if diff:
            action = "trigger.update"
            if set(diff) == {"enabled"}:
                action = "trigger.enable" if trigger.enabled else "trigger.disable"
            audit_record(actor=acting_user, action=action, tenant=function.tenant, target=function,
                         details={"trigger": trigger.name, **diff})
        transaction.on_commit(lambda: _sync_engine(function.pk))
    return trigger


def trigger_delete(*, acting_user, trigger: Trigger) -> None:
    function = trigger.function
    _require(acting_user, function, "change")
    with transaction.atomic():
        audit_record(actor=acting_user, action="trigger.delete", tenant=function.tenant, target=function,
                     details={"trigger": trigger.name, "kind": trigger.kind})
        trigger.delete()
        transaction.on_commit(lambda: _sync_engine(function.pk))


def retry_policy_set(*, acting_user, function: Function, **changes) -> RetryPolicy:
    _require(acting_user, function, "change")
    unknown = set(changes) - set(POLICY_FIELDS)
    if unknown:
        raise ValidationFailed(f"Unknown setting(s): {', '.join(sorted(unknown))}.")
    _require_storable(**{f: v for f, v in changes.items() if isinstance(v, str)})
    with transaction.atomic():
        policy, _ = RetryPolicy.objects.select_for_update().get_or_create(function=function)
        diff = {}
        for field, value in changes.items():
            if getattr(policy, field) != value:
                diff[field] = [getattr(policy, field), value]
                setattr(policy, field, value)
        full_clean_or_raise(policy, exclude=["function"])
        if policy.backoff_max_seconds < policy.backoff_seconds:
            raise ValidationFailed("The longest backoff cannot be shorter than the first one.",
                                   field="backoff_max_seconds")
        if "callback_url" in diff:
            policy.callback_url = _clean_callback_url(policy.callback_url)
        policy.save()
        if diff:
            audit_record(actor=acting_user, action="function.retry_policy", tenant=function.tenant,
                         target=function, details=diff)
        if set(diff) - {"callback_url"}:  # the engines know retries, not where the portal posts results
            transaction.on_commit(lambda: _sync_engine(function.pk))
    return policy


# ---- async calls and published events -------------------------------------------------------------------

def _require_callback_caller(caller: ApiToken | None, tenant_id: int, function_id: int) -> None:
    """A callback makes the portal send a request where the caller says, so naming one takes an
    authenticated caller of the function's tenant who may run the function (INVOKE_PERM, as a
    token-auth function asks at the gateway), even where the function itself is public: a viewer's
    token may carry the invoke scope, for the functions shared with them to run, and no others."""
    from functions.invoke_access import access_of_token

    if caller is None:
        raise PermissionDenied("Naming a callback (X-Nimbus-Callback-Url) needs a valid API token with the "
                               "invoke scope (Authorization: Bearer …); anonymous callers may not name one.",
                               field="callback_url")
    if caller.tenant_id != tenant_id:
        raise PermissionDenied("Naming a callback (X-Nimbus-Callback-Url) needs an API token of the function's "
                               "own tenant.", field="callback_url")
    if not caller.has_scope(ApiToken.Scope.INVOKE):
        raise PermissionDenied("Naming a callback (X-Nimbus-Callback-Url) needs the invoke scope, which the API "
                               "token lacks.", field="callback_url")
    if not access_of_token(caller).may_invoke(function_id):
        raise PermissionDenied("Naming a callback (X-Nimbus-Callback-Url) needs an API token whose user may run "
                               "this function: viewers read only, unless the function is shared with them to "
                               "edit or deploy.", field="callback_url")


def async_invocation_accept(*, function_id: int, method: str, path: str, headers: list, body: bytes,
                            tag: str = "", callback_url: str = "", caller: ApiToken | None = None) -> Delivery:
    """Store an async call (the gateway answers 202 only after this commits). The caller was already
    authorised to invoke by the gateway, as for a synchronous call. ``caller`` is the API token the
    call came with, if any: a callback URL of the caller's own needs one (see _require_callback_caller);
    without it the function's fixed destination, if its developers set one, receives the result."""
    function = (Function.objects.filter(pk=function_id)
                .values("tenant_id", "retry_policy__callback_url").first())
    if function is None:
        raise NotFound("There is no such function.")
    if callback_url:
        _require_callback_caller(caller, function["tenant_id"], function_id)
        callback_url = _clean_callback_url(callback_url)
    else:
        callback_url = function["retry_policy__callback_url"] or ""
    with transaction.atomic():
        delivery = queue.enqueue(function=function_id, source=Delivery.Source.ASYNC, method=method, path=path,
                                 headers=headers, body=body, tag=tag, callback_url=callback_url)
        transaction.on_commit(notify)
    return delivery


def events_publish(*, token, tenant, request_headers: dict[str, str], body: bytes) -> list[events.Fanout]:
    """Accept the CloudEvents of one ingress request for ``tenant`` (token checked by the caller)."""
    parsed = events.parse_request(request_headers, body)
    fanouts = events.deliver_events(tenant, parsed)
    if any(f.deliveries for f in fanouts):
        transaction.on_commit(notify) if transaction.get_connection().in_atomic_block else notify()
    return fanouts


# ---- dead letters ----------------------------------------------------------------------------------------

def dead_letter_replay(*, acting_user, delivery: Delivery) -> Delivery:
    function = delivery.function
    _require(acting_user, function, "deploy")
    with transaction.atomic():
        if not queue.replay(delivery):
            raise Conflict("Only a dead letter can be replayed.")
        audit_record(actor=acting_user, action="dead_letter.replay", tenant=function.tenant, target=function,
                     details={"delivery": str(delivery.pk), "source": delivery.source})
        transaction.on_commit(notify)
    delivery.refresh_from_db()
    return delivery


def dead_letter_discard(*, acting_user, delivery: Delivery) -> None:
    function = delivery.function
    _require(acting_user, function, "deploy")
    with transaction.atomic():
        if not queue.discard(delivery):
            raise Conflict("Only a dead letter can be discarded.")
        audit_record(actor=acting_user, action="dead_letter.discard", tenant=function.tenant, target=function,
                     details={"delivery": str(delivery.pk), "source": delivery.source})


# ---- sequences -----------------------------------------------------------------------------------------

def sequence_create(*, acting_user, tenant, name: str, functions: list[str], description: str = "") -> Sequence:
    if not user_can_tenant(acting_user, tenant, "create_function"):
        raise PermissionDenied("You may not create sequences in this tenant.")
    _require_storable(name=name, description=description or "")
    for index, step in enumerate(functions or []):
        if isinstance(step, str) and unstorable(step):
            raise ValidationFailed(f"Step {index + 1} holds {unstorable(step)}, which Nimbus does not accept.",
                                   field=f"functions.{index}")
    if not functions:
        raise ValidationFailed("A sequence needs at least one function.", field="functions")
    if len(functions) > 20:
        raise ValidationFailed("A sequence has at most 20 steps.", field="functions")
    found = {f.name: f for f in Function.objects.filter(tenant=tenant, name__in=functions)}
    missing = [n for n in functions if n not in found]
    if missing:
        raise ValidationFailed(f"No function named {', '.join(missing)} in {tenant.slug}.", field="functions")
    for function in found.values():
        _require(acting_user, function, "view")
    sequence = Sequence(tenant=tenant, name=name, description=description, created_by=acting_user)
    full_clean_or_raise(sequence, exclude=["tenant", "created_by"])
    with transaction.atomic():
        try:
            with transaction.atomic():
                sequence.save()
        except IntegrityError:
            raise Conflict(f"A sequence named '{name}' already exists in {tenant.slug}.", field="name") from None
        SequenceStep.objects.bulk_create([SequenceStep(sequence=sequence, position=i, function=found[n])
                                          for i, n in enumerate(functions)])
        audit_record(actor=acting_user, action="sequence.create", tenant=tenant, target=sequence,
                     details={"functions": functions})
        first = found[functions[0]].pk
        transaction.on_commit(lambda: _sync_sequence(tenant.slug, name, list(functions), first))
    return sequence


def sequence_delete(*, acting_user, sequence: Sequence) -> None:
    if not user_can_tenant(acting_user, sequence.tenant, "create_function"):
        raise PermissionDenied("You may not delete sequences in this tenant.")
    with transaction.atomic():
        audit_record(actor=acting_user, action="sequence.delete", tenant=sequence.tenant, target=sequence)
        slug, name = sequence.tenant.slug, sequence.name
        sequence.delete()
        transaction.on_commit(lambda: _sync_sequence(slug, name, None, None))


def sequence_start(*, acting_user, sequence: Sequence, body: bytes = b"", content_type: str = "application/json",
                   callback_url: str = "") -> Delivery:
    """Queue the first step; each step's output becomes the next one's input."""
    if not user_can_tenant(acting_user, sequence.tenant, "create_function"):
        raise PermissionDenied("You may not run sequences in this tenant.")
    first = sequence.steps.select_related("function").first()
    if first is None:
        raise NotFound("The sequence has no steps.")
    for step in sequence.steps.select_related("function"):
        _require(acting_user, step.function, "view")
    callback_url = _clean_callback_url(callback_url)
    run_id = uuid.uuid4()
    # One trace for the whole run: every step carries this traceparent on, so each step's invocation
    # is a span of it and the trace page shows the run end to end.
    traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    with transaction.atomic():
        delivery = queue.enqueue(function=first.function, source=Delivery.Source.SEQUENCE,
                                 headers=[("content-type", content_type), ("traceparent", traceparent)],
                                 body=body, sequence=sequence,
                                 step=first.position, run_id=run_id, callback_url=callback_url)
        audit_record(actor=acting_user, action="sequence.start", tenant=sequence.tenant, target=sequence,
                     details={"run": str(run_id)})
        transaction.on_commit(notify)
    return delivery
