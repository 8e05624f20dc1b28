"""The IDE's socket on the Redis channel layer survives idling: the layer's blocking receive must not
outlast redis-py's socket timeout (it did, and every idle socket closed with 1011 after 5–6 s)."""

import asyncio
import os

import pytest
from django.conf import settings

from tests.webide.conftest import ide_session

IDLE_SECONDS = float(os.environ.get("NIMBUS_TEST_IDLE_SECONDS", "600"))

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(not getattr(settings, "REDIS_URL", ""), reason="needs Redis (REDIS_URL; CI sets it)"),
]


async def test_an_idle_ide_socket_on_redis_stays_open_and_hears_saves(function, cookies):
    async with ide_session(cookies["developer"]) as mine, ide_session(cookies["admin"]) as theirs:
        await theirs.ask("open", "opened")
        await mine.ask("open", "opened")
        await asyncio.sleep(IDLE_SECONDS)
        # Still connected: the consumer did not die on a socket timeout meanwhile.
        assert not theirs.communicator.future.done(), theirs.communicator.future
        saved = await mine.ask("save", "saved", path="handler.py", content="def handle(e, c):\n    return 2\n",
                               base_version=1)
        assert saved["version"] == 2
        event = await theirs.expect(lambda m: m["type"] == "event" and m["event"]["kind"] == "source.saved")
        assert event["event"]["version"] == 2
