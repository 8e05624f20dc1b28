"""The gateway's async path: ``Prefer: respond-async`` turns a call into a queued delivery and a
202 with the delivery's id and status URL."""

from __future__ import annotations

import json

from django.conf import settings
from django.urls import reverse

from portal.errors import NimbusError

# Headers that belong to the caller's connection or to the async request itself, not to the function.
DROPPED = {"prefer", "x-nimbus-async", "x-nimbus-callback-url", "host", "content-length", "connection",
           "authorization", "cookie", "x-nimbus-test-signature"}


def accept_async(scope, route, tag, sub_path, headers, body) -> tuple[int, bytes, list]:
    from functions.services_triggers import async_invocation_accept

    callback = next((v.decode("latin-1") for k, v in headers if k == b"x-nimbus-callback-url"), "").strip()
    forward = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
               if k.decode("latin-1").lower() not in DROPPED]
    query = scope.get("query_string", b"").decode("latin-1")
    path = sub_path + ("?" + query if query else "")
    try:
        delivery = async_invocation_accept(function_id=route.function_id, method=scope["method"], path=path,
                                           headers=forward, body=body, tag=tag or "", callback_url=callback)
    except NimbusError as exc:
        return exc.http_status, json.dumps(exc.as_dict()).encode(), []
    status_url = settings.NIMBUS_PUBLIC_URL.rstrip("/") + reverse(
        "functions-api:delivery-detail",
        kwargs={"tenant_slug": route.tenant, "function_name": route.name, "delivery_id": delivery.pk})
    payload = {"id": str(delivery.pk), "state": delivery.state, "status_url": status_url}
    return 202, json.dumps(payload).encode(), [(b"location", status_url.encode()),
                                              (b"x-nimbus-delivery-id", str(delivery.pk).encode())]
