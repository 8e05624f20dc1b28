"""Open IDE sockets follow membership changes at once: a removed, downgraded or deactivated member's
editor is told why and closed (4403), and hears nothing more of the function; everybody else's stays.
Runs on the in-memory channel layer, and on Redis when REDIS_URL is set."""

import pytest
from asgiref.sync import sync_to_async

from functions.services import function_create
from tenancy.models import Membership, Tenant
from tenancy.services import (
    tenant_create,
    tenant_member_add,
    tenant_member_change_role,
    tenant_member_leave,
    tenant_member_remove,
    user_deactivate,
)
from tests.webide.conftest import connect, ide_session

pytestmark = pytest.mark.django_db(transaction=True)

CLOSE_ACCESS_REVOKED = 4403


@sync_to_async
def membership(user, slug="acme"):
    return Membership.objects.get(user=user, tenant__slug=slug)


async def closed_for_access(ide):
    """The socket's last words: a ``closing`` message naming why, then the 4403 close."""
    closing = await ide.expect_type("closing")
    assert closing["code"] == "access_revoked"
    assert (await ide.communicator.receive_output(timeout=5)) == {"type": "websocket.close",
                                                                   "code": CLOSE_ACCESS_REVOKED}
    return closing


async def save(ide, content):
    opened = await ide.ask("open", "opened")
    reply = await ide.ask("save", "saved", path="handler.py", content=content,
                          base_version=opened["source_version"])
    assert reply["type"] == "saved", reply


async def test_a_removed_members_socket_is_closed_and_hears_no_more_saves(function, cookies, members):
    async with ide_session(cookies["developer"]) as removed, ide_session(cookies["admin"]) as stays:
        await removed.ask("open", "opened")
        await stays.ask("open", "opened")
        await sync_to_async(tenant_member_remove)(acting_user=members["owner"],
                                                  membership=await membership(members["developer"]))
        closing = await closed_for_access(removed)
        assert "no longer belong to acme" in closing["detail"]
        await save(stays, "def handle(event, context):\n    return 'after'\n")
        saved = await stays.expect(lambda m: m["type"] == "event" and m["event"]["kind"] == "source.saved")
        assert saved["event"]["mine"] is True
        assert await removed.communicator.receive_nothing(timeout=0.5)
    # And it cannot come back.
    communicator, connected, code = await connect(cookies["developer"])
    await communicator.disconnect()
    assert not connected and code == 4404


async def test_a_downgraded_members_socket_is_closed(function, cookies, members):
    async with ide_session(cookies["developer"]) as downgraded:
        await downgraded.ask("open", "opened")
        await sync_to_async(tenant_member_change_role)(acting_user=members["owner"],
                                                       membership=await membership(members["developer"]),
                                                       role="viewer")
        closing = await closed_for_access(downgraded)
        assert "from developer to viewer" in closing["detail"]
    # Reopened, the editor has what a viewer has: no test signature, no change.
    async with ide_session(cookies["developer"]) as reopened:
        opened = await reopened.ask("open", "opened")
        assert opened["permissions"] == ["view"] and "test_signature" not in opened


async def test_a_promoted_members_socket_stays_open(function, cookies, members):
    async with ide_session(cookies["viewer"]) as promoted:
        await promoted.ask("open", "opened")
        await sync_to_async(tenant_member_change_role)(acting_user=members["owner"],
                                                       membership=await membership(members["viewer"]),
                                                       role="developer")
        assert (await promoted.ask("ping", "pong"))["type"] == "pong"


async def test_a_member_who_leaves_and_a_deactivated_user_are_closed(function, cookies, members, operator):
    async with ide_session(cookies["viewer"]) as leaving, ide_session(cookies["developer"]) as deactivated:
        await leaving.ask("open", "opened")
        await deactivated.ask("open", "opened")
        await sync_to_async(tenant_member_leave)(acting_user=members["viewer"], tenant=function.tenant)
        await closed_for_access(leaving)
        assert (await deactivated.ask("ping", "pong"))["type"] == "pong"  # not them
        await sync_to_async(user_deactivate)(acting_user=operator, user=members["developer"])
        await closed_for_access(deactivated)


@sync_to_async
def second_tenant_with(developer):
    owner = developer.__class__.objects.create_user("initech-owner", password="pw-initech-owner")
    tenant = tenant_create(acting_user=owner, slug="initech", name="Initech")
    tenant_member_add(acting_user=owner, tenant=tenant, username=developer.username, role="developer")
    function_create(acting_user=owner, tenant=tenant, name="tps", starter="hello")
    return Tenant.objects.get(slug="initech")


async def test_removal_from_one_tenant_leaves_the_editors_of_another_open(function, cookies, members):
    await second_tenant_with(members["developer"])
    async with ide_session(cookies["developer"]) as acme, \
            ide_session(cookies["developer"], path="/ws/ide/initech/tps/") as initech:
        await acme.ask("open", "opened")
        await initech.ask("open", "opened")
        await sync_to_async(tenant_member_remove)(acting_user=members["owner"],
                                                  membership=await membership(members["developer"]))
        await closed_for_access(acme)
        assert (await initech.ask("open", "opened"))["type"] == "opened"


async def test_unsharing_closes_the_editor_of_the_user_it_was_shared_with(function, cookies, members):
    from functions.services import function_share, function_unshare
    from tests.conftest import make_user
    from tests.webide.conftest import session_cookie

    friend = await sync_to_async(make_user)("friend")
    await sync_to_async(function_share)(acting_user=members["admin"], function=function, username="friend",
                                        level="edit")
    async with ide_session(await sync_to_async(session_cookie)(friend)) as shared:
        assert "test_signature" in await shared.ask("open", "opened")
        await sync_to_async(function_unshare)(acting_user=members["admin"], function=function, username="friend")
        closing = await closed_for_access(shared)
        assert "no longer shared with you" in closing["detail"]
