"""The one place where refusals become JSON API responses.

Every refusal has the same shape, so a client needs one error path:
``{"code": "...", "detail": "a sentence for a human", "field": "...", "errors": {"path": ["..."]}}``
(``field`` and ``errors`` only where they apply, ``errors`` always flat by dotted input path, plus
extras such as ``current_version`` on a stale save). portal/api/schema.py publishes the same shape.
"""

from collections.abc import Mapping

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from portal.errors import BodyTooLarge, DatabaseBusy, NimbusError, ValidationFailed

NON_FIELD_KEYS = ("non_field_errors", "__all__")
NON_FIELD = "non_field_errors"


def flat_errors(errors) -> dict[str, list[str]]:
    """Every message of a validation error tree (DRF's, a form's, a service's) under the dotted
    path of the input it is about: ``{"filters.0.value": ["This field is required."]}``, ``"0.percent"``
    for an item of a list body, ``non_field_errors`` for the input as a whole. One level, always a
    list of strings, whatever the nesting of the serializer: the shape the schema publishes."""
    flat: dict[str, list[str]] = {}

    def visit(node, path):
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, path if str(key) in NON_FIELD_KEYS else (*path, str(key)))
        elif isinstance(node, list | tuple):
            for index, item in enumerate(node):
                # A list of messages belongs to the field itself; a list of dicts is a list of items.
                visit(item, (*path, str(index)) if isinstance(item, Mapping | list | tuple) else path)
        elif node not in ("", None):
            flat.setdefault(".".join(path) or NON_FIELD, []).append(str(node))

    visit(errors, ())
    return flat


def validation_body(errors) -> dict:
    errors = flat_errors(errors)
    field, messages = next(iter(errors.items()), (NON_FIELD, ["Invalid input."]))
    if field == NON_FIELD:
        return {"code": "invalid", "detail": messages[0], "errors": errors or {NON_FIELD: messages}}
    return {"code": "invalid", "detail": f"{field}: {messages[0]}", "field": field, "errors": errors}


def exception_handler(exc, context):
    if isinstance(exc, RequestDataTooBig):
        exc = BodyTooLarge(settings.NIMBUS_MAX_BODY_BYTES)
    elif not isinstance(exc, NimbusError) and DatabaseBusy.caused(exc):
        exc = DatabaseBusy()
    if isinstance(exc, NimbusError):
        body = exc.as_dict()
        if isinstance(exc, ValidationFailed) and exc.errors and "errors" not in body:
            # Same shape as a serializer's refusal, so a form can put the message by its field.
            body["errors"] = exc.errors
        if "errors" in body:
            body["errors"] = flat_errors(body["errors"])
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return Response(body, status=exc.http_status, headers=headers)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # an unexpected error: Django's 500 handling (and logging) takes over
    if isinstance(exc, exceptions.ValidationError):
        response.data = validation_body(exc.detail)
        response.status_code = status.HTTP_400_BAD_REQUEST
        return response
    detail = exc.detail if isinstance(exc, exceptions.APIException) else response.data
    if isinstance(detail, dict) and "detail" in detail:
        detail = detail["detail"]
    code = getattr(detail, "code", None) or getattr(exc, "default_code", None) or "error"
    response.data = {"code": code, "detail": str(detail)}
    return response


@csrf_exempt  # it changes nothing, and a POST to a wrong address should still learn it is wrong
def endpoint_not_found(request, *args, **kwargs):
    """Unknown addresses under /api/v1/ answer in the same JSON shape as every other refusal."""
    body = {"code": "not_found", "detail": "There is no API endpoint at this address."}
    if not request.path.endswith("/"):
        try:
            match = resolve(request.path + "/")
        except Resolver404:
            match = None
        if match is not None and match.func is not endpoint_not_found:
            body["detail"] += f" Did you mean {request.path}/ ?"
    return JsonResponse(body, status=status.HTTP_404_NOT_FOUND)
