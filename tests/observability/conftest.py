"""Fixtures for observability tests: synthetic invocation records, and the local engine's fixtures
(a real engine and an in-process gateway) for the end-to-end ones."""

import uuid
from datetime import datetime, timezone

import pytest

from tests.engines.local.conftest import _stop_engines, deploy, engine, gateway, make_engine  # noqa: F401


@pytest.fixture
def record(function):
    """record(started_at, duration_ms, **fields) → an unsaved-then-stored Invocation of ``function``."""
    from functions.models import Invocation

    def make(started_at: datetime, duration_ms: float, **fields):
        fields.setdefault("status", "success")
        fields.setdefault("http_status", 200 if fields["status"] == "success" else 500)
        fields.setdefault("trace_id", uuid.uuid4().hex)
        row = Invocation(id=uuid.uuid4(), function=fields.pop("function", function), started_at=started_at,
                         duration_ms=duration_ms, billed_gb_seconds=0.125 * duration_ms / 1000, **fields)
        row.save()
        return row

    return make


@pytest.fixture
def minute():
    """The start of the current UTC minute (tests place records inside it)."""
    return datetime.now(timezone.utc).replace(second=0, microsecond=0)
