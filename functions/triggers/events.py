"""CloudEvents: reading them from an HTTP request (binary, structured and batched mode, through
the ``cloudevents`` SDK), event-trigger filters, and fan-out of each event to every matching
trigger's function through the delivery queue."""

from __future__ import annotations

import json
from dataclasses import dataclass

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event
from cloudevents.core.exceptions import BaseCloudEventException
from django.db import transaction

from functions.models import Delivery, Function, Trigger
from functions.triggers import queue
from portal.errors import ValidationFailed

REQUIRED = ("specversion", "id", "source", "type")
BATCH_TYPE = "application/cloudevents-batch+json"
STRUCTURED_TYPE = "application/cloudevents+json"
MAX_BATCH = 1000
FILTER_ATTRIBUTES = ("type", "source", "subject")  # plus any extension name
MATCHES = ("exact", "prefix")


def _missing(present) -> list[str]:
    return [name for name in REQUIRED if not present(name)]


def _refuse(missing: list[str], where: str) -> ValidationFailed:
    return ValidationFailed(
        f"The CloudEvent lacks the required attribute(s) {', '.join(missing)}{where}. CloudEvents 1.0 needs "
        f"specversion, id, source and type (binary mode: ce-* headers; structured mode: JSON members).",
        field=missing[0], errors={"attributes": missing})


def _parse_one(headers: dict[str, str], body: bytes) -> BaseCloudEvent:
    try:
        return from_http_event(HTTPMessage(headers=headers, body=body))
    except BaseCloudEventException as exc:
        raise ValidationFailed(f"Not a valid CloudEvent: {exc}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ValidationFailed(f"Not a valid CloudEvent: {type(exc).__name__}: {exc}") from None
    except RecursionError:  # JSON data nested past what Python's decoder can follow
        raise ValidationFailed("Not a valid CloudEvent: its JSON data is nested too deeply.") from None


def parse_request(headers: dict[str, str], body: bytes) -> list[BaseCloudEvent]:
    """The CloudEvents in one HTTP request. ``headers`` are lower-cased. ValidationFailed otherwise."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if any(name.startswith("ce-") for name in headers):
        missing = _missing(lambda name: headers.get(f"ce-{name}", "").strip())
        if missing:
            raise _refuse(missing, " (binary mode: as ce-* headers)")
        return [_parse_one(headers, body)]
    if content_type == BATCH_TYPE:
        try:
            items = json.loads(body or b"null")
        except ValueError as exc:
            raise ValidationFailed(f"The batch is not valid JSON: {exc}.") from None
        except RecursionError:
            raise ValidationFailed("The batch's JSON is nested too deeply.") from None
        if not isinstance(items, list):
            raise ValidationFailed("A batch is a JSON array of structured CloudEvents.")
        if len(items) > MAX_BATCH:
            raise ValidationFailed(f"A batch holds at most {MAX_BATCH} events.")
        events = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValidationFailed(f"Batch item {index} is not a JSON object.")
            missing = _missing(lambda name, item=item: str(item.get(name) or "").strip())
            if missing:
                raise _refuse(missing, f" (batch item {index})")
            events.append(_parse_one({"content-type": STRUCTURED_TYPE}, json.dumps(item).encode()))
        return events
    if content_type == STRUCTURED_TYPE:
        try:
            document = json.loads(body or b"null")
        except ValueError as exc:
            raise ValidationFailed(f"The structured CloudEvent is not valid JSON: {exc}.") from None
        except RecursionError:
            raise ValidationFailed("The structured CloudEvent's JSON is nested too deeply.") from None
        if not isinstance(document, dict):
            raise ValidationFailed("A structured CloudEvent is a JSON object.")
        missing = _missing(lambda name: str(document.get(name) or "").strip())
        if missing:
            raise _refuse(missing, " (structured mode)")
        return [_parse_one(headers, body)]
    raise ValidationFailed(
        "Send a CloudEvent: binary mode (ce-specversion, ce-id, ce-source, ce-type headers), structured mode "
        f"(Content-Type: {STRUCTURED_TYPE}) or a batch (Content-Type: {BATCH_TYPE}).")


# ---- filters ------------------------------------------------------------------------------------

def validate_filters(filters) -> list[dict]:
    """Normalised filters: ``[{"attribute", "value", "match": exact|prefix}]``, all of which must match."""
    if filters in (None, ""):
        return []
    if not isinstance(filters, list):
        raise ValidationFailed("Filters are a list of {attribute, value, match}.", field="filters")
    clean = []
    for item in filters:
        if not isinstance(item, dict):
            raise ValidationFailed("Each filter is an object with attribute, value and match.", field="filters")
        attribute = str(item.get("attribute") or "").strip().lower()
        value = str(item.get("value") or "")
        match = str(item.get("match") or "exact").strip().lower()
        if not attribute or not attribute.isalnum() or len(attribute) > 20:
            raise ValidationFailed(
                f"Filter attribute '{attribute}': use type, source, subject or an extension name "
                f"(lowercase letters and digits, at most 20).", field="filters")
        if attribute in ("id", "specversion", "time", "data"):
            raise ValidationFailed(f"Filtering on '{attribute}' is not supported.", field="filters")
        if not value:
            raise ValidationFailed(f"The filter on '{attribute}' needs a value.", field="filters")
        if match not in MATCHES:
            raise ValidationFailed(f"Filter match '{match}': use exact or prefix.", field="filters")
        clean.append({"attribute": attribute, "value": value, "match": match})
    return clean


def matches(filters: list[dict], attributes: dict) -> bool:
    for item in filters:
        actual = attributes.get(item["attribute"])
        if actual is None:
            return False
        actual = str(actual)
        if item["match"] == "prefix":
            if not actual.startswith(item["value"]):
                return False
        elif actual != item["value"]:
            return False
    return True


# ---- fan-out -----------------------------------------------------------------------------------

@dataclass
class Fanout:
    event_id: str
    type: str
    deliveries: list[tuple[str, str]]  # (function name, delivery id)


def delivery_request(event: BaseCloudEvent) -> tuple[list[tuple[str, str]], bytes]:
    """The event in binary mode, as the function receives it."""
    message = to_binary_event(event)
    headers = [(k.lower(), str(v)) for k, v in message.headers.items()]
    data = event.get_data()
    if not any(k == "content-type" for k, _ in headers):
        headers.append(("content-type", "application/json" if isinstance(data, (dict, list)) else
                        "application/octet-stream" if isinstance(data, bytes) else "text/plain; charset=utf-8"))
    # Opaque data goes on as it came (the JSON format would write bytes as their repr).
    body = data if isinstance(data, bytes) else message.body or b""
    return headers, body


def deliver_events(tenant, events: list[BaseCloudEvent]) -> list[Fanout]:
    """Enqueue each event for every enabled event trigger of the tenant that matches it, in one
    transaction (all stored, or none)."""
    triggers = list(Trigger.objects.filter(kind=Trigger.Kind.EVENT, enabled=True, function__tenant=tenant)
                    .exclude(function__state=Function.State.OFFLINE).select_related("function"))
    results = []
    with transaction.atomic():
        for event in events:
            attributes = event.get_attributes()
            headers, body = delivery_request(event)
            fanout = Fanout(event_id=str(attributes.get("id")), type=str(attributes.get("type")), deliveries=[])
            for trigger in triggers:
                if matches(trigger.filters or [], attributes):
                    delivery = queue.enqueue(function=trigger.function, source=Delivery.Source.EVENT,
                                             headers=headers, body=body, trigger=trigger)
                    fanout.deliveries.append((trigger.function.name, str(delivery.pk)))
            results.append(fanout)
    return results
