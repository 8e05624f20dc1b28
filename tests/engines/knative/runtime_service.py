"""Stand-ins for a function's cluster-local Knative Service: the real Python runtime shim as a
process on a TCP ``$PORT``, configured as the Knative manifest configures the container (code dir,
handler, tenant, function, revision), plus the fixtures that put the Knative engine in front of it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from functions.engines import set_engine

SHIM = Path(__file__).resolve().parents[3] / "functions" / "runtimes" / "python" / "nimbus_runtime.py"

# One handler for every function the tests deploy: the sub-path picks the behaviour.
HANDLER = '''
import time

def handle(event, context):
    if event.path == "/slow":
        time.sleep(30)
    if event.path == "/fail":
        raise RuntimeError("always fails")
    return {"path": event.path, "query": event.query, "method": event.method, "body": event.text,
            "revision": context.revision, "trigger": event.headers.get("x-nimbus-trigger"),
            "authorization": event.headers.get("authorization"),
            "traceparent": event.headers.get("traceparent"),
            "invocation": event.headers.get("x-nimbus-invocation-id"),
            "delivery": event.headers.get("x-nimbus-delivery-id"), "attempt": event.headers.get("x-nimbus-attempt"),
            "cloudevent": event.cloudevent}
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RuntimeService:
    """The runtime shim serving ``handler.py`` on 127.0.0.1:<port>."""

    def __init__(self, folder: Path, *, source: str = HANDLER, revision: int = 1, function: str = "hello",
                 tenant: str = "acme"):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = folder / "code"
        code.mkdir(parents=True, exist_ok=True)
        (code / "handler.py").write_text(source)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NIMBUS_", "DJANGO_"))}
        env.update({"PORT": str(self.port), "NIMBUS_CODE_DIR": str(code), "NIMBUS_HANDLER": "handler.handle",
                    "NIMBUS_TENANT": tenant, "NIMBUS_FUNCTION": function, "NIMBUS_REVISION": str(revision),
                    "NIMBUS_TIMEOUT_SECONDS": "30", "NIMBUS_MEMORY_MB": "256"})
        self.output = open(folder / "shim.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, str(SHIM)], env=env, stdin=subprocess.DEVNULL,
                                        stdout=self.output, stderr=subprocess.STDOUT)
        self._await_health()

    def _await_health(self, attempts: int = 300) -> None:
        for _ in range(attempts):
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url + "/_nimbus/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the runtime shim did not start: {(self.folder / 'shim.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.close()


@pytest.fixture
def runtime_service(tmp_path):
    """runtime_service(**options) → a running RuntimeService; all are stopped after the test."""
    started = []

    def start(**options):
        service = RuntimeService(tmp_path / f"service-{len(started)}", **options)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def knative(engine, stand_in, settings):
    """The Knative engine (API stand-in behind it, Knative's controllers played by FakeKnative)
    installed as the portal's engine. Point ``engine.values["INTERNAL_URL"]`` at a service."""
    from tests.engines.knative.conftest import FakeKnative

    settings.NIMBUS_ENGINE = "knative"
    stand_in.controller = FakeKnative("ready", delay=0.01)
    engine.timeout_margin = 0.5
    set_engine(engine)
    yield engine
    engine.shutdown()
    set_engine(None)


@pytest.fixture
def deploy_on_knative(knative, members, tenant):
    """deploy(name, **config) → the function, created by the developer and deployed on Knative."""
    from functions.models import Function
    from functions.services import function_create, function_deploy

    def deploy(name, **config):
        function = Function.objects.filter(tenant=tenant, name=name).first()
        if function is None:
            function = function_create(acting_user=members["developer"], tenant=tenant, name=name,
                                       files={"handler.py": HANDLER}, **config)
        revision = function_deploy(acting_user=members["developer"], function=function)
        revision.refresh_from_db()
        assert revision.status == "ready", revision.status_message
        function.refresh_from_db()
        return function, revision

    return deploy
