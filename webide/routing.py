"""WebSocket routes of the IDE (wired in portal/asgi.py behind origin validation and session auth)."""

from django.urls import path

from webide.consumers import IdeConsumer

websocket_urlpatterns = [
    path("ws/ide/<slug:tenant>/<slug:function>/", IdeConsumer.as_asgi()),
]
