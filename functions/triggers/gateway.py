"""The gateway's async path: ``Prefer: respond-async`` turns a call into a queued delivery and a
202 with the delivery's id and status URL."""

from __future__ import annotations

import json

from django.conf import settings
from django.urls import reverse

from portal.errors import NimbusError, UriTooLong, ValidationFailed
from portal.text import shown, unstorable

# Headers that belong to the caller's connection or to the async request itself, not to the function.
DROPPED = {"prefer", "x-nimbus-async", "x-nimbus-callback-url", "host", "content-length", "connection",
           "authorization", "cookie", "x-nimbus-test-signature"}


def _caller(headers):
    """The API token the request came with (any function's caller may send one), or None."""
    from tenancy.services import token_authenticate

    authorization = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token_authenticate(token.strip())


def _check_storable(method: str, path: str, headers) -> None:
    """Refuse what the delivery queue cannot keep exactly as it came, rather than a 500 from the
    database or a call delivered later with a different address."""
    from functions.models import Delivery

    # Refused, not cut: a cut query string would run the function with other arguments.
    limit = Delivery._meta.get_field("path").max_length
    if len(path) > limit:
        raise UriTooLong(f"An async call's path and query string are at most {limit:,} characters (this one has "
                         f"{len(path):,}); send long parameters in the body, or call synchronously.", field="path")
    reason = unstorable(path)
    if reason:
        raise ValidationFailed(f"The path or query string holds {reason}, which an async call cannot carry "
                               "(a synchronous call can).", field="path")
    if len(method) > Delivery._meta.get_field("method").max_length:
        raise ValidationFailed(f"An async call cannot use the method '{method[:40]}'.", field="method")
    for name, value in headers:
        reason = unstorable(name) or unstorable(value)
        if reason:
            raise ValidationFailed(f"The header {shown(name)} holds {reason}, which an async call cannot carry.",
                                   field="headers")


def accept_async(scope, route, tag, sub_path, headers, body) -> tuple[int, bytes, list]:
    from functions.services_triggers import async_invocation_accept

    callback = next((v.decode("latin-1") for k, v in headers if k == b"x-nimbus-callback-url"), "").strip()
    # Only looked up when it matters: the gateway already authorised the call itself.
    caller = _caller(headers) if callback else None
    forward = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
               if k.decode("latin-1").lower() not in DROPPED]
    query = scope.get("query_string", b"").decode("latin-1")
    path = sub_path + ("?" + query if query else "")
    try:
        _check_storable(scope["method"], path, [*forward, ("x-nimbus-callback-url", callback)])
        delivery = async_invocation_accept(function_id=route.function_id, method=scope["method"], path=path,
                                           headers=forward, body=body, tag=tag or "", callback_url=callback,
                                           caller=caller)
    except NimbusError as exc:
        return exc.http_status, json.dumps(exc.as_dict()).encode(), []
    status_url = settings.NIMBUS_PUBLIC_URL.rstrip("/") + reverse(
        "functions-api:delivery-detail",
        kwargs={"tenant_slug": route.tenant, "function_name": route.name, "delivery_id": delivery.pk})
    payload = {"id": str(delivery.pk), "state": delivery.state, "status_url": status_url}
    return 202, json.dumps(payload).encode(), [(b"location", status_url.encode()),
                                              (b"x-nimbus-delivery-id", str(delivery.pk).encode())]
