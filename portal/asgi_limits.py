"""The body limit (NIMBUS_MAX_BODY_BYTES) in front of Django's ASGI handler. The handler reads the
whole body (spooling it to a temporary file) before any middleware runs, so BodyLimitMiddleware
alone answers only once every byte was taken, and a chunked body (no Content-Length) is not limited
at all until a view reads it. Here a declared length over the limit answers 413 before anything
reads the body, and a streamed body is counted as the handler reads it: once past the limit the
handler sees the client leave (it ends the request quietly: nothing is served, nothing logged) and
the 413 is answered here, in the API's error shape naming the limit, as the gateway answers it.

What the server takes before it calls the app is the server's to bound: daphne (Twisted) keeps a
whole request body in a temporary file before the app sees a byte of it."""

from __future__ import annotations

import json

from django.conf import settings

from portal.errors import BodyTooLarge


def declared_too_large(scope, limit: int) -> bool:
    return any(name == b"content-length" and value.isdigit() and int(value) > limit
               for name, value in scope.get("headers") or [])


async def refuse(send, limit: int) -> None:
    """413 and the end of the connection: the rest of the body is left unread on it."""
    body = json.dumps(BodyTooLarge(limit).as_dict()).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Wraps an ASGI HTTP app (Django's); the limit is read per request (tests change it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        limit = settings.NIMBUS_MAX_BODY_BYTES
        if declared_too_large(scope, limit):
            await refuse(send, limit)
            return
        size, over, started = 0, False, False

        async def counted_receive():
            nonlocal size, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    # Not passed on: to the app, the client left; the 413 is answered once it returns.
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def watched_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted_receive, watched_send)
        if over and not started:
            await refuse(send, limit)
