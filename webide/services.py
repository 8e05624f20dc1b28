"""Writes of the IDE's own data: saved test events of a function."""

from __future__ import annotations

from django.db import IntegrityError, transaction

from functions.models import Function
from functions.selectors import user_can_function
from portal.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from portal.text import unstorable
from tenancy.services import audit_record, full_clean_or_raise
from webide.models import TestEvent

MAX_TEST_EVENTS = 50
MAX_BODY_CHARS = 256 * 1024


def _clean_headers(headers) -> dict[str, str]:
    if headers in (None, ""):
        return {}
    if not isinstance(headers, dict):
        raise ValidationFailed("Headers must be an object of name to value.", field="headers")
    clean = {}
    for name, value in headers.items():
        name = str(name).strip()
        if not name:
            continue
        if any(c in name for c in " :\r\n") or any(c in str(value) for c in "\r\n"):
            raise ValidationFailed(f"Header '{name[:40]}' is not a valid header.", field="headers")
        clean[name] = str(value)
    return clean


def _apply(event: TestEvent, *, name, method, path, query, headers, body) -> None:
    event.name = (name or "").strip()
    event.method = (method or "GET").upper()
    event.path = (path or "").lstrip("/")
    event.query = (query or "").lstrip("?")
    event.headers = _clean_headers(headers)
    event.body = body or ""
    if len(event.body) > MAX_BODY_CHARS:
        raise ValidationFailed(f"A saved body is limited to {MAX_BODY_CHARS // 1024} KiB.", field="body")
    texts = [("name", event.name), ("method", event.method), ("path", event.path), ("query", event.query),
             ("body", event.body), *(("headers", text) for item in event.headers.items() for text in item)]
    for field, text in texts:
        reason = unstorable(text)
        if reason:
            raise ValidationFailed(f"The test event's {field} holds {reason}, which cannot be saved.", field=field)
    full_clean_or_raise(event, exclude=["function", "created_by"])


def test_event_save(*, acting_user, function: Function, name: str, method: str = "GET", path: str = "",
                    query: str = "", headers: dict | None = None, body: str = "",
                    event_id: int | None = None) -> TestEvent:
    """Create a test event, or update (and rename) the one with ``event_id``."""
    if not user_can_function(acting_user, function, "change"):
        raise PermissionDenied("You may not change this function's test events.")
    with transaction.atomic():
        if event_id is None:
            if TestEvent.objects.filter(function=function).count() >= MAX_TEST_EVENTS:
                raise ValidationFailed(f"A function keeps at most {MAX_TEST_EVENTS} test events.")
            event = TestEvent(function=function, created_by=acting_user)
        else:
            event = TestEvent.objects.select_for_update().filter(function=function, pk=event_id).first()
            if event is None:
                raise NotFound("Test event not found.")
        _apply(event, name=name, method=method, path=path, query=query, headers=headers, body=body)
        try:
            with transaction.atomic():
                event.save()
        except IntegrityError:
            raise Conflict(f"A test event named '{event.name}' already exists.", field="name") from None
        audit_record(actor=acting_user, action="test_event.save", tenant=function.tenant, target=function,
                     details={"test_event": event.name, "created": event_id is None})
    return event


def test_event_delete(*, acting_user, function: Function, event_id: int) -> None:
    if not user_can_function(acting_user, function, "change"):
        raise PermissionDenied("You may not change this function's test events.")
    with transaction.atomic():
        event = TestEvent.objects.filter(function=function, pk=event_id).first()
        if event is None:
            raise NotFound("Test event not found.")
        audit_record(actor=acting_user, action="test_event.delete", tenant=function.tenant, target=function,
                     details={"test_event": event.name})
        event.delete()
