"""The function's Triggers page: cron and event triggers (with the next five run times), the
retry policy, recent deliveries and the dead-letter list with replay and discard."""

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import render

from functions import services_triggers as services
from functions.models import Delivery
from functions.selectors import deliveries_for_function, delivery_for_function, retry_policy_for_function, \
    trigger_for_function, triggers_for_function
from functions.triggers import cron
from functions.views import _back, _require, _url, function_context, function_page
from portal.errors import NimbusError, PermissionDenied

PAGE = "function_triggers"


def _filters_from(post) -> list[dict]:
    """Up to three filter rows from the form (attribute, value, match)."""
    rows = []
    for i in range(3):
        attribute = post.get(f"filter_attribute_{i}", "").strip()
        value = post.get(f"filter_value_{i}", "").strip()
        if attribute or value:
            rows.append({"attribute": attribute, "value": value, "match": post.get(f"filter_match_{i}", "exact")})
    return rows


def _rows(function):
    rows = []
    for trigger in triggers_for_function(function):
        runs = []
        if trigger.kind == "cron" and trigger.enabled:
            try:
                runs = cron.next_runs(trigger.schedule, trigger.time_zone)
            except NimbusError:
                runs = []
        rows.append({"trigger": trigger, "next_runs": runs})
    return rows


@function_page
def function_triggers(request, function):
    if request.method == "POST":
        _require(request, function, "change")
        action = request.POST.get("action", "add")
        try:
            if action == "add":
                services.trigger_create(
                    acting_user=request.user, function=function, name=request.POST.get("name", "").strip(),
                    kind=request.POST.get("kind", "cron"), schedule=request.POST.get("schedule", ""),
                    time_zone=request.POST.get("time_zone", "UTC").strip() or "UTC",
                    filters=_filters_from(request.POST))
                messages.success(request, "Trigger added.")
            elif action == "policy":
                services.retry_policy_set(
                    acting_user=request.user, function=function,
                    max_attempts=int(request.POST.get("max_attempts") or 3),
                    backoff_seconds=float(request.POST.get("backoff_seconds") or 1),
                    backoff_max_seconds=float(request.POST.get("backoff_max_seconds") or 300),
                    max_event_age_seconds=int(request.POST.get("max_event_age_seconds") or 86400))
                messages.success(request, "Retry policy saved.")
            elif action in ("enable", "disable"):
                trigger = trigger_for_function(function, request.POST.get("trigger", ""))
                services.trigger_update(acting_user=request.user, trigger=trigger, enabled=action == "enable")
                messages.success(request, f"Trigger {trigger.name} {action}d.")
        except PermissionDenied:
            raise
        except (NimbusError, ValueError) as exc:
            messages.error(request, getattr(exc, "message", None) or f"Check the numbers: {exc}")
        return _back(function, PAGE)
    dead = Paginator(deliveries_for_function(function, state=Delivery.State.DEAD).select_related("trigger"), 20)
    recent = list(deliveries_for_function(function).select_related("trigger")[:10])
    policy = retry_policy_for_function(function)
    return render(request, "functions/triggers.html", function_context(
        request, function, "triggers", rows=_rows(function), policy=policy, recent=recent,
        dead=dead.get_page(request.GET.get("page")), curl_event=_curl_event(function)))


def _curl_event(function) -> str:
    from django.conf import settings

    return (f"curl -X POST {settings.NIMBUS_PUBLIC_URL}/events/{function.tenant.slug}/ "
            f"-H 'Authorization: Bearer $NIMBUS_TOKEN' -H 'ce-specversion: 1.0' -H 'ce-id: 1' "
            f"-H 'ce-source: /my/app' -H 'ce-type: com.example.order.created' "
            f"-H 'Content-Type: application/json' -d '{{\"order\": 1}}'")


@function_page
def trigger_delete_view(request, function, name):
    _require(request, function, "change")
    trigger = trigger_for_function(function, name)
    if request.method != "POST":
        return render(request, "confirm.html", function_context(
            request, function, "triggers", title=f"Remove trigger {trigger.name}?",
            body="It stops starting the function. Deliveries already queued are still delivered.",
            confirm_label="Remove trigger", cancel_url=_url(function, PAGE)))
    services.trigger_delete(acting_user=request.user, trigger=trigger)
    messages.success(request, f"Trigger {name} removed.")
    return _back(function, PAGE)


@function_page
def dead_letter_view(request, function, delivery_id, verb):
    if verb not in ("replay", "discard"):
        raise Http404("Use replay or discard.")
    _require(request, function, "deploy")
    delivery = delivery_for_function(function, delivery_id)
    if verb == "discard" and request.method != "POST":
        return render(request, "confirm.html", function_context(
            request, function, "triggers", title="Discard this dead letter?",
            body="Its request is dropped for good; it cannot be replayed afterwards.",
            confirm_label="Discard", cancel_url=_url(function, PAGE)))
    if request.method == "POST":
        try:
            if verb == "replay":
                services.dead_letter_replay(acting_user=request.user, delivery=delivery)
                messages.success(request, "Queued again; its attempts start over.")
            else:
                services.dead_letter_discard(acting_user=request.user, delivery=delivery)
                messages.success(request, "Dead letter discarded.")
        except NimbusError as exc:
            messages.error(request, exc.message)
    return _back(function, PAGE)
