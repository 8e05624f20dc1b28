"""Request-scoped context (client address) that services read when they write audit events, and
the refusal of addresses whose text the database cannot store."""

import contextvars

from django.http import JsonResponse

from portal.errors import ValidationFailed
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
