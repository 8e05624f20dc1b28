"""Which pages may open the portal's WebSockets: the portal's own origin (the scheme, host and port
the socket was opened on, its host one of ALLOWED_HOSTS), NIMBUS_PUBLIC_URL's, and
CSRF_TRUSTED_ORIGINS, each compared whole, as Django's CSRF check compares a form's Origin. A page
on another port of the same host is another origin (another program, perhaps a function's)."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import split_domain_port, validate_host

DEFAULT_PORTS = {"http": 80, "https": 443}
SOCKET_SCHEMES = {"ws": "http", "wss": "https", "http": "http", "https": "https"}

Origin = tuple[str, str, int]  # scheme, host (lower case, IPv6 in brackets), port


def parse_origin(value: str) -> Origin | None:
    """(scheme, host, port) of an origin or URL, the default port filled in; None when it is not an
    http(s) origin with a host (``null``, ``file://``, garbage)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return scheme, host, port or DEFAULT_PORTS[scheme]


def _header(scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope.get("headers") or [] if k == name]


def _scheme(scope) -> str:
    """http or https, as the browser saw it: behind a TLS proxy, SECURE_PROXY_SSL_HEADER says so."""
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy:
        header, secure_value = proxy
        name = header.removeprefix("HTTP_").lower().replace("_", "-").encode()
        values = _header(scope, name)
        if values:
            return "https" if values[0].split(",", 1)[0].strip() == secure_value else "http"
    return SOCKET_SCHEMES.get(str(scope.get("scheme") or "ws").lower(), "http")


def own_origin(scope) -> Origin | None:
    """The origin of the socket's own address (Host header), when that host is an allowed one."""
    hosts = _header(scope, b"host")
    if len(hosts) != 1:
        return None
    domain, port = split_domain_port(hosts[0].strip().lower())
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]  # as Django's own request.get_host()
    if not domain or not validate_host(domain, allowed):
        return None
    scheme = _scheme(scope)
    try:
        number = int(port) if port else DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    return scheme, domain, number


def _trusted(origin: Origin) -> bool:
    for entry in [settings.NIMBUS_PUBLIC_URL, *settings.CSRF_TRUSTED_ORIGINS]:
        wildcard = "://*." in entry
        trusted = parse_origin(entry.replace("://*.", "://", 1) if wildcard else entry)
        if trusted is None:
            continue
        if trusted == origin:
            return True
        # "https://*.example.com": any subdomain, same scheme and port (as CSRF_TRUSTED_ORIGINS means it).
        if (wildcard and origin[0] == trusted[0] and origin[2] == trusted[2]
                and origin[1].endswith("." + trusted[1])):
            return True
    return False


def origin_allowed(scope) -> bool:
    values = _header(scope, b"origin")
    if len(values) != 1:
        return False
    origin = parse_origin(values[0])
    if origin is None:
        return False
    return origin == own_origin(scope) or _trusted(origin)


class SameOriginWebSockets:
    """Refuses a WebSocket whose Origin is not one of the portal's (see the module docstring)."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            # Refused at the handshake (the server answers 403), without a consumer: nothing of a
            # refused socket touches the channel layer.
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
            return None
        return await self.application(scope, receive, send)
