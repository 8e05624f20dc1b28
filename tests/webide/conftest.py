"""Fixtures for the IDE's tests: a deploy-progress engine double, session cookies for WebSocket
clients, and a helper that connects a WebsocketCommunicator the way a browser would."""

import asyncio
import contextlib

import pytest
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from functions.engines import set_engine
from functions.engines.base import DeployEvent, FunctionStatus
from portal.errors import EngineError

ORIGIN = (b"origin", b"http://testserver")


class ProgressEngine:
    """Engine double that reports each deploy step through ``progress`` like a real engine would."""

    def __init__(self):
        self.name = settings.NIMBUS_ENGINE  # get_engine() keeps an engine whose name matches the setting
        self.deployed = []
        self.traffic = []
        self.fail_deploy = None

    def ensure_tenant(self, tenant):
        pass

    def deploy(self, spec, *, traffic, progress):
        self.deployed.append((spec.function.name, spec.number, dict(spec.files)))
        progress(DeployEvent("dependencies", "running", "Installing requirements"))
        progress(DeployEvent("dependencies", "ok", "Requirements installed", output="Successfully installed nothing"))
        progress(DeployEvent("instance", "ok", "Instance started"))
        if self.fail_deploy:
            raise EngineError(self.fail_deploy)
        progress(DeployEvent("health", "ok", "Health check passed"))

    def set_traffic(self, function, traffic):
        self.traffic.append([(t.revision, t.percent) for t in traffic])

    def set_offline(self, function, offline):
        pass

    def delete(self, function):
        pass

    def status(self, function):
        return FunctionStatus(ready=True)

    def logs(self, function, **kwargs):
        return iter(())


@pytest.fixture
def engine():
    double = ProgressEngine()
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

    headers = [origin] if origin else []
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
