"""The IDE's ``open`` payload lists the function's triggers."""

import pytest
from asgiref.sync import sync_to_async

from tests.webide.conftest import cookies, ide_session  # noqa: F401 - fixture reused as it is

pytestmark = pytest.mark.django_db(transaction=True)


async def test_open_lists_triggers(function, members, cookies):  # noqa: F811
    from functions.services_triggers import trigger_create

    await sync_to_async(trigger_create)(acting_user=members["developer"], function=function, name="nightly",
                                        kind="cron", schedule="0 3 * * *", time_zone="Europe/Berlin")
    async with ide_session(cookies["developer"]) as ide:
        opened = await ide.ask("open", "opened")
    assert opened["triggers"] == [{"name": "nightly", "kind": "cron", "enabled": True, "schedule": "0 3 * * *",
                                   "time_zone": "Europe/Berlin", "filters": []}]
