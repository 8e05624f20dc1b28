"""Cron triggers: schedule validation, the next run times, and firing what is due.

Firing is a compare-and-set on ``next_run_at``: of several workers ticking at once only the one
that moves it on enqueues the run, so a schedule fires once per slot however many workers run.
A worker that was down for several slots fires once on return, not once per missed slot.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone as dt_timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterNotAlphaError, croniter
from django.db import transaction
from django.utils import timezone

from functions.models import Delivery, Function, Trigger
from functions.triggers import queue
from portal.errors import ValidationFailed

log = logging.getLogger(__name__)

CRON_EVENT_TYPE = "dev.nimbus.cron"


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationFailed(f"'{name}' is not a known time zone; use an IANA name such as 'UTC' or "
                               f"'Europe/Berlin'.", field="time_zone") from None


def validate_schedule(expression: str, time_zone: str = "UTC") -> str:
    """The normalised expression, or ValidationFailed saying what is wrong with it."""
    expression = " ".join((expression or "").split())
    if not expression:
        raise ValidationFailed("A cron trigger needs a schedule, e.g. '*/5 * * * *' (every five minutes).",
                               field="schedule")
    fields = expression.split(" ")
    if len(fields) != 5 and not expression.startswith("@"):
        raise ValidationFailed(
            f"'{expression}' has {len(fields)} fields; a schedule has five: minute hour day-of-month month "
            f"day-of-week (e.g. '0 3 * * 1-5' is 03:00 on weekdays).", field="schedule")
    zone(time_zone)
    try:
        croniter(expression, datetime.now(dt_timezone.utc)).get_next(datetime)
    except (CroniterBadCronError, CroniterBadDateError, CroniterNotAlphaError, ValueError, KeyError) as exc:
        raise ValidationFailed(f"'{expression}' is not a valid cron schedule: {exc}.", field="schedule") from None
    return expression


def next_runs(expression: str, time_zone: str = "UTC", *, after: datetime | None = None,
              count: int = 5) -> list[datetime]:
    """The next ``count`` run times after ``after`` (aware datetimes in the schedule's zone)."""
    tz = zone(time_zone)
    start = (after or timezone.now()).astimezone(tz)
    runs = croniter(expression, start)
    return [runs.get_next(datetime) for _ in range(count)]


def next_run(expression: str, time_zone: str, after: datetime) -> datetime:
    return next_runs(expression, time_zone, after=after, count=1)[0].astimezone(dt_timezone.utc)


def fire_due(now: datetime | None = None) -> int:
    """Enqueue one delivery for every enabled cron trigger whose run time has come. Returns how many."""
    now = now or timezone.now()
    due = list(Trigger.objects.filter(kind=Trigger.Kind.CRON, enabled=True, next_run_at__lte=now)
               .exclude(function__state=Function.State.OFFLINE)
               .select_related("function__tenant").order_by("next_run_at")[:500])
    fired = 0
    for trigger in due:
        scheduled = trigger.next_run_at
        try:
            following = next_run(trigger.schedule, trigger.time_zone, now)
        except Exception:  # noqa: BLE001 - a schedule that no longer parses is switched off, loudly
            log.exception("cron trigger %s has an invalid schedule; disabling it", trigger)
            Trigger.objects.filter(pk=trigger.pk).update(enabled=False, next_run_at=None)
            continue
        with transaction.atomic():
            won = Trigger.objects.filter(pk=trigger.pk, next_run_at=scheduled, enabled=True).update(
                next_run_at=following)
            if not won:
                continue  # another worker fired this slot
            delivery_id = uuid.uuid4()
            function = trigger.function
            headers = [
                ("ce-specversion", "1.0"), ("ce-type", CRON_EVENT_TYPE), ("ce-id", str(delivery_id)),
                ("ce-source", f"/nimbus/{function.tenant.slug}/{function.name}/triggers/{trigger.name}"),
                ("ce-time", scheduled.astimezone(dt_timezone.utc).isoformat().replace("+00:00", "Z")),
                ("content-type", "application/json"),
            ]
            body = ('{"schedule": "%s", "time_zone": "%s", "scheduled": "%s"}'
                    % (trigger.schedule, trigger.time_zone, scheduled.isoformat())).encode()
            queue.enqueue(function=function, source=Delivery.Source.CRON, headers=headers, body=body,
                          trigger=trigger)
            fired += 1
    return fired
