"""Fixtures for the IDE's tests: a deploy-progress engine double, session cookies for WebSocket
clients, and a helper that connects a WebsocketCommunicator the way a browser would."""

import asyncio
import contextlib

import pytest
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from functions.engines import set_engine
from functions.engines.base import DeployEvent
from tests.doubles import RecordingEngine

ORIGIN = (b"origin", b"http://testserver")
HOST = (b"host", b"testserver")  # what a browser sends; the origin check compares the two


@pytest.fixture
def engine():
    # Reports each deploy step like a real engine would; ``fail_deploy`` fails after the instance step.
    double = RecordingEngine(
        steps=[DeployEvent("dependencies", "running", "Installing requirements"),
               DeployEvent("dependencies", "ok", "Requirements installed", output="Successfully installed nothing"),
               DeployEvent("instance", "ok", "Instance started")],
        after=[DeployEvent("health", "ok", "Health check passed")], ready=True)
    set_engine(double)
    yield double
    set_engine(None)


def session_cookie(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies[settings.SESSION_COOKIE_NAME].value}".encode()


@pytest.fixture
def cookies(members, outsider):
    """{"owner"|"admin"|"developer"|"viewer"|"outsider": b"sessionid=..."}"""
    jar = {role: session_cookie(user) for role, user in members.items()}
    jar["outsider"] = session_cookie(outsider)
    return jar


class Ide:
    """A connected IDE client: ``ask`` sends an action and returns the answers to it."""

    def __init__(self, communicator):
        self.communicator = communicator
        self.next_id = 1
        self.backlog = []

    async def send(self, action, **payload):
        request_id = self.next_id
        self.next_id += 1
        await self.communicator.send_json_to({"action": action, "id": request_id, **payload})
        return request_id

    async def receive(self, timeout=5):
        if self.backlog:
            return self.backlog.pop(0)
        return await self.communicator.receive_json_from(timeout=timeout)

    async def expect(self, predicate, timeout=5):
        """The first message matching ``predicate``; others are kept for later expectations."""
        skipped = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise AssertionError(f"no matching message; got {skipped!r}")
                message = await self.receive(timeout=remaining)
                if predicate(message):
                    return message
                skipped.append(message)
        finally:
            self.backlog[:0] = skipped

    async def expect_type(self, kind, timeout=5):
        return await self.expect(lambda m: m.get("type") == kind, timeout)

    async def ask(self, action, reply_type, **payload):
        request_id = await self.send(action, **payload)
        return await self.expect(lambda m: m.get("reply_to") == request_id and m["type"] in (reply_type, "error"))

    async def disconnect(self):
        await self.communicator.disconnect()


async def connect(cookie: bytes | None, path="/ws/ide/acme/hello/", origin=ORIGIN):
    from portal.asgi import application

    headers = [HOST, origin] if origin else [HOST]
    if cookie:
        headers.append((b"cookie", cookie))
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await communicator.connect(timeout=5)
    return communicator, connected, code


@contextlib.asynccontextmanager
async def ide_session(cookie: bytes, path="/ws/ide/acme/hello/"):
    """A connected Ide, always disconnected afterwards."""
    communicator, connected, code = await connect(cookie, path)
    assert connected, f"refused with {code}"
    ide = Ide(communicator)
    try:
        yield ide
    finally:
        await ide.disconnect()
