"""Request-scoped context (client address) that services read when they write audit events."""

import contextvars

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
