"""The one engine double the service, API, page and IDE tests share.

It records every call as plain data (function names, revision numbers, traffic as
``(revision, percent, tag)``), keeps each deploy's ``RevisionSpec`` for tests that look inside it,
and reports deploy progress the way a real engine does. Tests that need a real engine use
``get_engine()`` (tests/conftest.py shuts it down after each test).
"""

from __future__ import annotations

from django.conf import settings

from functions.engines.base import DeployEvent, FunctionStatus, InvokeResult
from portal.errors import EngineError


def _routes(traffic) -> list[tuple[int, int, str]]:
    return [(t.revision, t.percent, t.tag) for t in traffic]


class RecordingEngine:
    """Records what the services ask of the engine (trigger and sequence syncs in ``synced``, calls
    through ``invoke`` in ``invoked``; neither in ``calls``).

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
        self.runs_cron = False
        self.synced: list[tuple] = []
        self.invoked: list[tuple] = []

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

    async def invoke(self, *, tenant, name, tag="", method="POST", path="/", headers=None, body=b"",
                     trigger="async", invocation_id=None):
        # Nothing runs behind the double: the call is recorded and the function is unavailable.
        self.invoked.append((tenant, name, tag, method, path, trigger))
        return InvokeResult(404, outcome="unavailable", error="the recording engine runs nothing")

    def sync_triggers(self, function, triggers, *, policy=None):
        self.synced.append(("sync_triggers", function.name, [t["name"] for t in triggers]))

    def sync_sequence(self, tenant, name, functions, *, policy=None):
        self.synced.append(("sync_sequence", name, functions))

    def named(self, method: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == method]
