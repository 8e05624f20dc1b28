"""An account turned off anywhere, not only through tenancy.services.user_deactivate (Django's admin
saves the user, a script calls ``user.save()``), closes its open editors at once; an editor whose close
message never came (the account turned off by a bulk update, which sends no signal) still reads the
account again on its next action and is refused."""

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model

from tests.webide.conftest import ide_session
from tests.webide.test_access_revoked import closed_for_access

pytestmark = pytest.mark.django_db(transaction=True)


@sync_to_async
def turn_off(user):
    user.is_active = False
    user.save()


async def test_saving_a_user_inactive_closes_their_editors(function, cookies, members):
    async with ide_session(cookies["developer"]) as deactivated, ide_session(cookies["admin"]) as stays:
        await deactivated.ask("open", "opened")
        await stays.ask("open", "opened")
        await turn_off(members["developer"])
        closing = await closed_for_access(deactivated)
        assert "your account was deactivated" in closing["detail"]
        assert (await stays.ask("ping", "pong"))["type"] == "pong"


async def test_saving_an_active_user_leaves_their_editor_open(function, cookies, members):
    async with ide_session(cookies["developer"]) as editor:
        await editor.ask("open", "opened")
        user = members["developer"]
        user.first_name = "Dev"
        await sync_to_async(user.save)()
        assert (await editor.ask("open", "opened"))["type"] == "opened"
        assert await editor.communicator.receive_nothing(timeout=0.5)


async def test_an_editor_reads_the_account_again_on_each_action(function, cookies, members):
    async with ide_session(cookies["developer"]) as editor:
        opened = await editor.ask("open", "opened")
        # No signal, so no close message: the editor's own check must catch it.
        await sync_to_async(get_user_model().objects.filter(pk=members["developer"].pk).update)(is_active=False)
        refused = await editor.ask("save", "saved", path="handler.py", content="def handle(e, c):\n    return 1\n",
                                   base_version=opened["source_version"])
        assert refused["type"] == "error" and refused["code"] == "permission_denied", refused
        assert "deactivated" in refused["detail"]
        assert (await editor.ask("open", "opened"))["type"] == "error"
