"""The one engine double the service, API, page and IDE tests share.

It records every call as plain data (function names, revision numbers, traffic as
``(revision, percent, tag)``), keeps each deploy's ``RevisionSpec`` for tests that look inside it,
and reports deploy progress the way a real engine does. Tests that need a real engine use
``get_engine()`` (tests/conftest.py shuts it down after each test).
"""

from __future__ import annotations

from django.conf import settings

from functions.engines.base import DeployEvent, FunctionStatus
from portal.errors import EngineError


def _routes(traffic) -> list[tuple[int, int, str]]:
    return [(t.revision, t.percent, t.tag) for t in traffic]


class RecordingEngine:
    """Records what the services ask of the engine.

    ``steps`` are reported before a deploy can fail, ``after`` once it did not; ``fail_deploy`` (a
    message) makes deploys fail after ``steps``; ``ready`` is what ``status()`` says.
    """

    def __init__(self, *, steps=None, after=(), ready=False):
        # get_engine() replaces an engine whose name differs from the configured one.
        self.name = settings.NIMBUS_ENGINE
        self.calls: list[tuple] = []
        self.specs: list[tuple] = []  # (RevisionSpec, [TrafficSpec]) per deploy
        self.steps = list(steps) if steps is not None else [DeployEvent("instance", "ok", "started")]
        self.after = list(after)
        self.ready = ready
        self.fail_deploy: str | None = None

    def ensure_tenant(self, tenant):
        self.calls.append(("ensure_tenant", tenant.slug))

    def deploy(self, spec, *, traffic, progress):
        traffic = list(traffic)
        self.specs.append((spec, traffic))
        self.calls.append(("deploy", spec.function.name, spec.number, _routes(traffic)))
        for event in self.steps:
            progress(event)
        if self.fail_deploy:
            raise EngineError(self.fail_deploy)
        for event in self.after:
            progress(event)

    def set_traffic(self, function, traffic):
        self.calls.append(("set_traffic", function.name, _routes(traffic)))

    def set_offline(self, function, offline):
        self.calls.append(("set_offline", function.name, offline))

    def delete(self, function):
        self.calls.append(("delete", function.name))

    def status(self, function):
        return FunctionStatus(ready=self.ready)

    def logs(self, function, **kwargs):
        return iter(())

    def named(self, method: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == method]
