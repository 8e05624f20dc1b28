"""Reads the IDE makes for a function the caller has already resolved through functions.selectors."""

import uuid

from django.db.models import QuerySet

from functions.models import Function, Invocation, InvocationLog
from webide.models import TestEvent

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def test_events_for_function(function: Function) -> QuerySet[TestEvent]:
    return TestEvent.objects.filter(function=function).order_by("name")


def log_lines_for_function(function: Function, *, after_id: int | None = None, text: str = "",
                           level: str = "", invocation_id: str | None = None, limit: int = 200) -> list[dict]:
    """Log lines of the function's invocations, oldest first. Without ``after_id``, the last ``limit`` lines.

    ``level`` keeps that level and the more severe ones (like a logger's threshold).
    """
    qs = InvocationLog.objects.filter(invocation__function=function)
    if invocation_id:
        qs = qs.filter(invocation_id=invocation_id)
    if text:
        qs = qs.filter(message__icontains=text)
    if level and level.upper() in LEVELS:
        qs = qs.filter(level__in=LEVELS[LEVELS.index(level.upper()):])
    qs = qs.values("id", "time", "level", "message", "invocation_id")
    if after_id is None:
        rows = list(qs.order_by("-id")[:limit])[::-1]
    else:
        rows = list(qs.filter(id__gt=after_id).order_by("id")[:limit])
    return [{"id": r["id"], "time": r["time"].isoformat(), "level": r["level"], "message": r["message"],
             "invocation": str(r["invocation_id"])} for r in rows]


def last_log_id(function: Function) -> int:
    last = InvocationLog.objects.filter(invocation__function=function).order_by("-id").values_list("id", flat=True)
    return last.first() or 0


def invocation_for_function(function: Function, invocation_id: str) -> Invocation | None:
    try:
        key = uuid.UUID(str(invocation_id))
    except ValueError:
        return None  # a malformed id from the client is simply not found
    return Invocation.objects.filter(function=function, pk=key).select_related("revision").first()
