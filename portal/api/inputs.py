"""How the API reads what a client sends, so that what it takes is what the schema publishes.

- JSON bodies: each value must have the type its field declares. DRF alone takes "5" for an
  integer, 5 for a string and "yes" for a boolean; the schema promises JSON types, so a value of
  another type is refused and named, like any other invalid input.
- Partial updates (PATCH, and PUT of the retry policy): only the fields sent change, and a field the
  operation does not take is refused by name (read-only, or unknown) instead of being ignored.
- Query parameters: a value that is not of the parameter's type or not one of its choices is a
  400 naming the parameter; an empty value of a typed parameter is not "no filter" but garbage.
"""

from collections.abc import Mapping
from datetime import UTC, datetime

from django.http import QueryDict
from rest_framework import serializers
from rest_framework.exceptions import ValidationError

# ---- JSON types of body values -------------------------------------------------------------------------

_STRING_FIELDS = (serializers.CharField, serializers.ChoiceField, serializers.DateTimeField, serializers.DateField,
                  serializers.TimeField, serializers.UUIDField)


def _mistyped(field, value):
    """What is wrong with the JSON types in ``value`` for ``field``, as DRF shapes its errors (a list of
    messages, or a dict by key or index for what is inside), or None."""
    if value is None or field.read_only:
        return None  # DRF says whether null is allowed; read-only fields are refused elsewhere
    if isinstance(field, serializers.JSONField):
        return None
    if isinstance(field, serializers.ListSerializer | serializers.ListField):
        if not isinstance(value, list):
            return ["Expected a list."]
        errors = {str(i): e for i, item in enumerate(value) if (e := _mistyped(field.child, item))}
        return errors or None
    if isinstance(field, serializers.DictField):
        if not isinstance(value, dict):
            return ["Expected an object."]
        errors = {str(key): e for key, item in value.items() if (e := _mistyped(field.child, item))}
        return errors or None
    if isinstance(field, serializers.Serializer):
        if not isinstance(value, Mapping):
            return ["Expected an object."]
        errors = {name: e for name, inner in field.fields.items()
                  if name in value and (e := _mistyped(inner, value[name]))}
        return errors or None
    if isinstance(field, serializers.BooleanField):
        return None if isinstance(value, bool) else ["Expected a boolean (true or false)."]
    if isinstance(field, serializers.IntegerField):
        return None if isinstance(value, int) and not isinstance(value, bool) else ["Expected an integer."]
    if isinstance(field, serializers.FloatField | serializers.DecimalField):
        return None if isinstance(value, int | float) and not isinstance(value, bool) else ["Expected a number."]
    if isinstance(field, _STRING_FIELDS):
        return None if isinstance(value, str) else ["Expected a string."]
    return None


def valid_body(serializer_class, data, **kwargs):
    """``serializer_class``'s validated data for ``data`` (a parsed request body), or a
    ValidationError naming every field at fault: wrong JSON types first, then the serializer's own
    rules. A form body (a QueryDict: every value a string) is left to the serializer."""
    serializer = serializer_class(data=data, **kwargs)
    if not isinstance(data, QueryDict):
        errors = _mistyped(serializer, data)
        if errors:
            raise ValidationError(errors)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class ClosedInputSerializer(serializers.Serializer):
    """An input that names what it does not take. A field the answer shows but this input cannot
    change (``read_only_names``) is "read-only"; any other unknown field is "unknown". Used by every
    partial update, so a client never believes a change was made that was silently dropped."""

    read_only_names: tuple[str, ...] = ()
    unknown_message = "Unknown field."
    read_only_message = "This field is read-only: it cannot be changed here."

    def to_internal_value(self, data):
        if isinstance(data, Mapping):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            refused = {str(name): [self.read_only_message if name in self.read_only_names else self.unknown_message]
                       for name in data if name not in writable}
            if refused:
                raise ValidationError(refused)
        return super().to_internal_value(data)


# ---- query parameters ----------------------------------------------------------------------------------

def refuse_parameter(name: str, message: str):
    raise ValidationError({name: [message]})


def query_choice(request, name: str, choices, *, default=None):
    """The value of query parameter ``name``, one of ``choices``; ``default`` when absent."""
    if name not in request.query_params:
        return default
    value = request.query_params[name]
    if value not in choices:
        refuse_parameter(name, f"'{value}' is not one of: {', '.join(choices)}.")
    return value


def query_positive_int(request, name: str, *, default=None, maximum: int | None = None):
    """The value of query parameter ``name`` as an integer from 1 (to ``maximum``); ``default`` when absent."""
    if name not in request.query_params:
        return default
    raw = request.query_params[name]
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        refuse_parameter(name, f"'{raw}' is not a whole number from 1.")
    value = int(raw)
    if maximum is not None and value > maximum:
        refuse_parameter(name, f"{value} is more than the most allowed, {maximum}.")
    return value


def in_utc(moment: datetime | None) -> datetime | None:
    """An aware date-time as UTC, the form the database compares. An ISO 8601 offset may be up to
    ±23:59, beyond what PostgreSQL accepts (±15:59), so a moment is never sent with its own; None
    for one that has no UTC equivalent Python can hold (year 1 at +05:00)."""
    if moment is None or moment.tzinfo is None:
        return moment
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return None


OUT_OF_RANGE = "This date-time is out of the range Nimbus can store."
