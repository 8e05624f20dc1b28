"""ASGI entry point: the gateway on /fn/ (lean path, no session or CSRF), Django for the rest,
and WebSockets (authenticated, origin-checked) for the IDE."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up first)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from functions.engines.local.gateway import gateway_app  # noqa: E402
from portal.asgi_limits import BodyLimit  # noqa: E402
from portal.origins import SameOriginWebSockets  # noqa: E402
from webide.routing import websocket_urlpatterns  # noqa: E402

GATEWAY_PREFIX = "/fn/"
# Django's handler reads a whole body before its middleware runs: the body limit stands in front of it
# (portal/asgi_limits.py). The gateway keeps its own, the engine's.
django_http_app = BodyLimit(django_asgi_app)


async def http_app(scope, receive, send):
    if scope["path"].startswith(GATEWAY_PREFIX):
        await gateway_app(scope, receive, send)
    else:
        await django_http_app(scope, receive, send)


# The delivery worker (async calls, CloudEvents, cron) runs in the portal process unless
# NIMBUS_WORKER=external; never in tests or in other management commands (they do not load this module).
from functions.triggers.worker import start_in_process  # noqa: E402

start_in_process()

application = ProtocolTypeRouter({
    "http": http_app,
    # Scheme, host and port of the page against the portal's own origins (portal/origins.py).
    "websocket": SameOriginWebSockets(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
})
