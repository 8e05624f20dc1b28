"""The WebSocket origin check compares scheme, host and port: a page on another port of the
portal's host (another program, perhaps a function's own server) cannot open the IDE's socket
with the user's cookies; the portal's own origin, NIMBUS_PUBLIC_URL and CSRF_TRUSTED_ORIGINS can."""

import pytest
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from portal.origins import origin_allowed, parse_origin
from tests.webide.conftest import session_cookie

pytestmark = pytest.mark.django_db(transaction=True)


def scope(origin, host="127.0.0.1:8000", scheme="ws", extra=()):
    headers = [(b"host", host.encode())] if host is not None else []
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {"type": "websocket", "scheme": scheme, "headers": headers + list(extra)}


@override_settings(ALLOWED_HOSTS=["127.0.0.1", "portal.example.com"], CSRF_TRUSTED_ORIGINS=[],
                   NIMBUS_PUBLIC_URL="https://portal.example.com")
def test_the_port_is_part_of_the_origin():
    assert origin_allowed(scope("http://127.0.0.1:8000"))
    assert not origin_allowed(scope("http://127.0.0.1:9999"))  # the finding: same host, another port
    assert not origin_allowed(scope("http://127.0.0.1"))  # port 80 is not 8000
    assert not origin_allowed(scope("https://127.0.0.1:8000"))  # another scheme
    assert not origin_allowed(scope("http://127.0.0.1:8000", scheme="wss"))
    # Default ports are the same as none.
    assert origin_allowed(scope("http://127.0.0.1:80", host="127.0.0.1"))
    assert origin_allowed(scope("http://127.0.0.1", host="127.0.0.1:80"))
    assert origin_allowed(scope("https://portal.example.com", host="portal.example.com", scheme="wss"))
    assert origin_allowed(scope("https://portal.example.com:443", host="portal.example.com", scheme="wss"))
    # The public URL is trusted from any address the socket arrives on; its port is compared too.
    assert origin_allowed(scope("https://portal.example.com"))
    assert not origin_allowed(scope("https://portal.example.com:8443"))
    assert not origin_allowed(scope("http://portal.example.com"))


@override_settings(ALLOWED_HOSTS=["127.0.0.1"], NIMBUS_PUBLIC_URL="http://127.0.0.1:8000")
def test_refused_origins_and_hosts():
    for origin in (None, "", "null", "file://", "http://", "http://127.0.0.1:notaport", "ws://127.0.0.1:8000",
                   "http://evil.example", "http://127.0.0.1.evil.example:8000", "http://127.0.0.1:8000\x00"):
        assert not origin_allowed(scope(origin, host="127.0.0.1:7000")), origin
    # A Host that is not an allowed host does not make its own origin allowed.
    assert not origin_allowed(scope("http://evil.example:7000", host="evil.example:7000"))
    assert not origin_allowed(scope("http://127.0.0.1:7000", host=None))
    assert not origin_allowed(scope("http://127.0.0.1:7000", host="127.0.0.1:7000",
                                    extra=[(b"origin", b"http://127.0.0.1:7000")]))  # two Origin headers


@override_settings(ALLOWED_HOSTS=["127.0.0.1", "localhost"], NIMBUS_PUBLIC_URL="http://127.0.0.1:8000",
                   CSRF_TRUSTED_ORIGINS=["https://ide.example.com", "https://*.tools.example.com:8443"])
def test_csrf_trusted_origins_are_whole_origins():
    assert origin_allowed(scope("https://ide.example.com"))
    assert not origin_allowed(scope("https://ide.example.com:444"))
    assert not origin_allowed(scope("http://ide.example.com"))
    assert origin_allowed(scope("https://a.tools.example.com:8443"))
    assert not origin_allowed(scope("https://a.tools.example.com"))
    assert not origin_allowed(scope("https://tools.example.com.evil:8443"))


@override_settings(ALLOWED_HOSTS=["portal.example.com"], NIMBUS_PUBLIC_URL="http://127.0.0.1:8000",
                   SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"))
def test_behind_a_tls_proxy_the_forwarded_scheme_counts():
    proxied = [(b"x-forwarded-proto", b"https")]
    assert origin_allowed(scope("https://portal.example.com", host="portal.example.com", extra=proxied))
    assert not origin_allowed(scope("https://portal.example.com", host="portal.example.com"))
    assert not origin_allowed(scope("http://portal.example.com", host="portal.example.com", extra=proxied))


def test_parse_origin():
    assert parse_origin("HTTP://Example.COM") == ("http", "example.com", 80)
    assert parse_origin("https://[::1]:8443") == ("https", "[::1]", 8443)
    assert parse_origin("http://x:99999") is None


@override_settings(ALLOWED_HOSTS=["127.0.0.1"], NIMBUS_PUBLIC_URL="http://127.0.0.1:8000", CSRF_TRUSTED_ORIGINS=[])
async def test_through_the_portal_stack(function, members):
    from asgiref.sync import sync_to_async

    from portal.asgi import application

    cookie = await sync_to_async(session_cookie)(members["developer"])

    async def opens(origin, host):
        communicator = WebsocketCommunicator(application, "/ws/ide/acme/hello/", headers=[
            (b"host", host), (b"origin", origin), (b"cookie", cookie)])
        try:
            connected, _ = await communicator.connect(timeout=5)
            return connected
        finally:
            await communicator.disconnect()

    assert await opens(b"http://127.0.0.1:8000", b"127.0.0.1:8000")
    assert not await opens(b"http://127.0.0.1:9999", b"127.0.0.1:8000")
    assert await opens(b"http://127.0.0.1:9999", b"127.0.0.1:9999")  # the portal itself served on 9999
    assert not await opens(b"http://127.0.0.1:9999", b"evil.example:9999")
