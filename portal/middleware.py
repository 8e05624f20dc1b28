"""Request-scoped context (client address) that services read when they write audit events, the
refusal of addresses whose text the database cannot store, of bodies over the portal's limit, and
of requests that get no database connection in time."""

import contextvars

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse

from portal.errors import BodyTooLarge, DatabaseBusy, NimbusError, ValidationFailed
from portal.text import shown, unstorable

client_ip: contextvars.ContextVar[str | None] = contextvars.ContextVar("client_ip", default=None)


def request_ip(meta) -> str | None:
    # The first X-Forwarded-For hop is only trusted behind a proxy that sets it; REMOTE_ADDR otherwise.
    forwarded = meta.get("HTTP_X_FORWARDED_FOR")
    if forwarded:
        return forwarded.split(",")[0].strip() or None
    return meta.get("REMOTE_ADDR") or None


class RequestContextMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        token = client_ip.set(request_ip(request.META))
        try:
            return self.get_response(request)
        finally:
            client_ip.reset(token)


class StorableAddressMiddleware:
    """Refuses a path or query string holding a NUL (``%00``) with a 400 in the API's error shape.
    Paths and query values reach queries as names and filters, where PostgreSQL refuses a NUL, and
    the request would end in a 500 wherever no validator happened to stand in the way. (The
    gateway on /fn/ is not Django: a function may be called with any path.)"""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        reason = unstorable(request.path)
        if reason:
            return self.refuse(f"The path holds {reason}, which Nimbus does not accept in an address.", "path")
        for key, values in request.GET.lists():
            for text in (key, *values):
                reason = unstorable(text)
                if reason:
                    return self.refuse(f"The query parameter '{shown(key)}' holds {reason}, which Nimbus does not "
                                       "accept in an address.", shown(key))
        return self.get_response(request)

    @staticmethod
    def refuse(message: str, field: str) -> JsonResponse:
        refusal = ValidationFailed(message, field=field)
        return JsonResponse(refusal.as_dict(), status=refusal.http_status)


def error_response(error: NimbusError) -> JsonResponse:
    """A refusal in the API's error shape, for answers given before or around a view."""
    response = JsonResponse(error.as_dict(), status=error.http_status)
    if error.retry_after is not None:
        response["Retry-After"] = str(error.retry_after)
    return response


class BodyLimitMiddleware:
    """Refuses a body over NIMBUS_MAX_BODY_BYTES with a 413 in the API's error shape, as the gateway
    and the event ingress do. A declared length is refused before anything reads the body (CSRF
    reads form posts); Django's own refusal (DATA_UPLOAD_MAX_MEMORY_SIZE, an HTML 400) becomes the
    same 413. Under ASGI the body is read whole before any middleware runs: the portal's ASGI app
    refuses first (portal/asgi_limits.py), declared or streamed; this stays for WSGI and the test client."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        declared = request.META.get("CONTENT_LENGTH") or ""
        if declared.isdigit() and int(declared) > settings.NIMBUS_MAX_BODY_BYTES:
            return error_response(BodyTooLarge(settings.NIMBUS_MAX_BODY_BYTES))
        return self.get_response(request)

    def process_exception(self, request, exception):
        if isinstance(exception, RequestDataTooBig):
            return error_response(BodyTooLarge(settings.NIMBUS_MAX_BODY_BYTES))
        return None


class DatabaseBusyMiddleware:
    """A request whose view, template or serializer got no database connection in time (every one of
    the pool's in use for NIMBUS_DB_POOL_TIMEOUT seconds, or the server refusing more clients)
    answers 503 with Retry-After in the API's error shape, instead of the 500 Django's handler would
    make of it. The API's exception handler answers the same for its views."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if DatabaseBusy.caused(exception):
            return error_response(DatabaseBusy())
        return None
