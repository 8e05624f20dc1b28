import pytest

from functions.engines import set_engine
from functions.engines.base import FunctionStatus
from portal.errors import EngineError


class RecordingEngine:
    """A test double that records what services ask of the engine; ``fail_deploy`` makes deploys fail."""

    name = "local"

    def __init__(self):
        self.calls = []
        self.fail_deploy = None

    def ensure_tenant(self, tenant):
        self.calls.append(("ensure_tenant", tenant.slug))

    def deploy(self, spec, *, traffic, progress):
        self.calls.append(("deploy", spec, list(traffic)))
        if self.fail_deploy:
            raise EngineError(self.fail_deploy)
        from functions.engines.base import DeployEvent

        progress(DeployEvent("instance", "ok", "started"))

    def set_traffic(self, function, traffic):
        self.calls.append(("set_traffic", function, list(traffic)))

    def set_offline(self, function, offline):
        self.calls.append(("set_offline", function, offline))

    def delete(self, function):
        self.calls.append(("delete", function))

    def status(self, function):
        return FunctionStatus(ready=False)

    def logs(self, function, **kwargs):
        return iter(())

    def named(self, method):
        return [c for c in self.calls if c[0] == method]


@pytest.fixture
def engine():
    recording = RecordingEngine()
    set_engine(recording)
    yield recording
    set_engine(None)
