"""The one place where refusals become JSON API responses.

Every refusal has the same shape, so a client needs one error path:
``{"code": "...", "detail": "a sentence for a human", "field": "...", "errors": {...}}``
(``field`` and ``errors`` only where they apply, plus extras such as ``current_version`` on a
stale save).
"""

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from portal.errors import NimbusError, ValidationFailed

NON_FIELD_KEYS = ("non_field_errors", "__all__")


def _plain(errors):
    """DRF's ErrorDetail tree as plain strings, dicts and lists."""
    if isinstance(errors, dict):
        return {str(key): _plain(value) for key, value in errors.items()}
    if isinstance(errors, list | tuple):
        return [_plain(item) for item in errors]
    return str(errors)


def _first_error(errors, path=()):
    """(dotted field path, first message) of a validation error tree, depth first."""
    if isinstance(errors, dict):
        for key, value in errors.items():
            found = _first_error(value, (*path, str(key)))
            if found:
                return found
        return None
    if isinstance(errors, list):
        for index, item in enumerate(errors):
            # A list of messages belongs to the field itself; a list of dicts is a list of items.
            found = _first_error(item, (*path, str(index)) if isinstance(item, dict | list) else path)
            if found:
                return found
        return None
    if errors in ("", None):
        return None
    return ".".join(p for p in path if p not in NON_FIELD_KEYS), str(errors)


def validation_body(errors) -> dict:
    errors = _plain(errors)
    if not isinstance(errors, dict):
        errors = {"non_field_errors": errors if isinstance(errors, list) else [errors]}
    field, message = _first_error(errors) or ("", "Invalid input.")
    body = {"code": "invalid", "detail": f"{field}: {message}" if field else message, "errors": errors}
    if field:
        body["field"] = field
    return body


def exception_handler(exc, context):
    if isinstance(exc, NimbusError):
        body = exc.as_dict()
        if isinstance(exc, ValidationFailed) and exc.errors and "errors" not in body:
            # Same shape as a serializer's refusal, so a form can put the message by its field.
            body["errors"] = exc.errors
        return Response(body, status=exc.http_status)
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
