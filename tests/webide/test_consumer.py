"""The IDE's WebSocket consumer through the whole ASGI stack (origin check, session auth, routing)."""

import uuid

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from functions.models import Function, Invocation, InvocationLog, Revision, SourceFile
from tests.webide.conftest import connect, ide_session, session_cookie
from webide.models import TestEvent

pytestmark = pytest.mark.django_db(transaction=True)

BROKEN = "def handle(event, context):\n    return {'ok': True\n"


@sync_to_async
def file_content(path="handler.py"):
    return SourceFile.objects.get(function__name="hello", path=path).content


@sync_to_async
def source_version():
    return Function.objects.get(name="hello").source_version


# ---- who may connect ----------------------------------------------------------------------------

async def test_anonymous_is_refused(function):
    communicator, connected, code = await connect(None)
    try:
        assert not connected
        assert code == 4401
    finally:
        await communicator.disconnect()


async def test_other_tenant_is_refused_like_a_missing_function(function, cookies):
    communicator, connected, code = await connect(cookies["outsider"])
    try:
        assert (connected, code) == (False, 4404)
    finally:
        await communicator.disconnect()
    communicator, connected, code = await connect(cookies["developer"], "/ws/ide/acme/no-such-function/")
    try:
        assert (connected, code) == (False, 4404)
    finally:
        await communicator.disconnect()


async def test_foreign_origin_is_refused(function, cookies):
    communicator, connected, _ = await connect(cookies["developer"], origin=(b"origin", b"http://evil.example"))
    try:
        assert not connected
    finally:
        await communicator.disconnect()


# ---- open and save ------------------------------------------------------------------------------

async def test_open_sends_files_version_permissions_and_signature(function, cookies):
    async with ide_session(cookies["developer"]) as ide:
        opened = await ide.ask("open", "opened")
    assert opened["source_version"] == 1
    paths = [f["path"] for f in opened["files"]]
    assert "handler.py" in paths
    assert {"view", "change", "deploy"} <= set(opened["permissions"])
    assert "delete" not in opened["permissions"]
    assert opened["function"]["invoke_path"] == "/fn/acme/hello/"
    assert opened["test_signature"]
    assert any(s["name"] == "hello" for s in opened["starters"])
    assert opened["markers"] == []


async def test_save_bumps_the_version_and_tells_the_others(function, cookies, members):
    async with ide_session(cookies["developer"]) as mine, ide_session(cookies["admin"]) as theirs:
        await theirs.ask("open", "opened")
        saved = await mine.ask("save", "saved", path="handler.py", content="def handle(e, c):\n    return 'v2'\n",
                               base_version=1)
        assert saved["version"] == 2
        own_event = await mine.expect(lambda m: m["type"] == "event" and m["event"]["kind"] == "source.saved")
        assert own_event["event"]["mine"] is True
        event = await theirs.expect(lambda m: m["type"] == "event" and m["event"]["kind"] == "source.saved")
        assert event["event"] == {"kind": "source.saved", "version": 2, "paths": ["handler.py"],
                                  "by": "acme-developer", "mine": False}
    assert await file_content() == "def handle(e, c):\n    return 'v2'\n"


async def test_stale_save_is_a_conflict_with_their_content(function, cookies):
    async with ide_session(cookies["developer"]) as first, ide_session(cookies["admin"]) as second:
        await first.ask("save", "saved", path="handler.py", content="# theirs\n", base_version=1)
        conflict = await second.ask("save", "conflict", path="handler.py", content="# mine\n", base_version=1)
        assert conflict["type"] == "conflict"
        assert conflict["current_version"] == 2
        assert conflict["theirs"] == "# theirs\n"
        assert conflict["mine"] == "# mine\n"
        assert await file_content() == "# theirs\n"
        # "Overwrite with mine": save again on the version they produced.
        saved = await second.ask("save", "saved", path="handler.py", content="# mine\n", base_version=2)
        assert saved["version"] == 3
    assert await file_content() == "# mine\n"


async def test_save_sends_syntax_markers_for_the_file(function, cookies):
    async with ide_session(cookies["developer"]) as ide:
        request_id = await ide.send("save", path="handler.py", content=BROKEN, base_version=1)
        markers = await ide.expect(lambda m: m["type"] == "markers" and m["reply_to"] == request_id)
    assert markers["paths"] == ["handler.py"]
    (marker,) = markers["markers"]
    assert marker["path"] == "handler.py" and marker["line"] == 2


async def test_syntax_checks_unsaved_buffers(function, cookies):
    async with ide_session(cookies["viewer"]) as ide:
        markers = await ide.ask("syntax", "markers", files={"handler.py": BROKEN})
    assert [m["line"] for m in markers["markers"]] == [2]


async def test_create_rename_delete_files(function, cookies):
    async with ide_session(cookies["developer"]) as ide:
        created = await ide.ask("create", "created", path="lib/util.py", content="X = 1\n", base_version=1)
        assert created["version"] == 2
        duplicate = await ide.ask("create", "created", path="lib/util.py", base_version=2)
        assert duplicate["type"] == "error" and "already exists" in duplicate["detail"]
        renamed = await ide.ask("rename", "renamed", path="lib/util.py", new_path="lib/helpers.py", base_version=2)
        assert (renamed["new_path"], renamed["version"]) == ("lib/helpers.py", 3)
        traversal = await ide.ask("create", "created", path="../escape.py", base_version=3)
        assert traversal["type"] == "error" and traversal["code"] == "invalid_source"
        deleted = await ide.ask("delete", "deleted", path="lib/helpers.py", base_version=3)
        assert deleted["version"] == 4
        stale = await ide.ask("delete", "deleted", path="handler.py", base_version=1)
        assert stale["type"] == "error" and stale["code"] == "stale_version"
        files = await ide.ask("files", "files")
    assert files["source_version"] == 4
    assert "lib/helpers.py" not in [f["path"] for f in files["files"]]


async def test_unknown_action_is_one_error_shape(function, cookies):
    async with ide_session(cookies["developer"]) as ide:
        reply = await ide.ask("explode", "never")
        bad = await ide.ask("save", "saved", path="handler.py", content="x", base_version="one")
    assert reply["type"] == "error" and reply["code"] == "invalid" and reply["action"] == "explode"
    assert bad["type"] == "error" and bad["field"] == "base_version"


# ---- deploy -------------------------------------------------------------------------------------

async def test_deploy_streams_progress_then_answers(function, cookies, engine):
    async with ide_session(cookies["developer"]) as ide, ide_session(cookies["viewer"]) as watcher:
        request_id = await ide.send("deploy", message="from the IDE")
        steps = []
        while True:
            message = await ide.expect(lambda m: m["type"] == "event" and m["event"]["kind"] == "deploy.progress")
            steps.append((message["event"]["step"], message["event"]["status"]))
            if message["event"]["step"] == "done":
                break
        deployed = await ide.expect(lambda m: m.get("reply_to") == request_id and m["type"] == "deployed")
        # Everyone with the function open sees the progress, read-only viewers included.
        seen = await watcher.expect(lambda m: m["type"] == "event" and m["event"]["step"] == "done")
    assert steps == [("frozen", "ok"), ("dependencies", "running"), ("dependencies", "ok"), ("instance", "ok"),
                     ("health", "ok"), ("done", "ok")]
    assert deployed["revision"] == 1 and deployed["status"] == "ready"
    assert seen["event"]["revision"] == 1
    assert engine.named("deploy")[0][1:3] == ("hello", 1)


async def test_failed_deploy_reports_the_engine_error(function, cookies, engine):
    engine.fail_deploy = "instance exited with status 1"
    async with ide_session(cookies["developer"]) as ide:
        request_id = await ide.send("deploy")
        done = await ide.expect(lambda m: m["type"] == "event" and m["event"]["step"] == "done")
        deployed = await ide.expect(lambda m: m.get("reply_to") == request_id and m["type"] == "deployed")
    assert done["event"]["status"] == "failed"
    assert "instance exited" in done["event"]["message"]
    assert deployed["status"] == "failed"


async def test_deploy_with_a_syntax_error_is_refused_with_markers(function, cookies, engine):
    async with ide_session(cookies["developer"]) as ide:
        await ide.ask("save", "saved", path="handler.py", content=BROKEN, base_version=1)
        request_id = await ide.send("deploy")
        markers = await ide.expect(lambda m: m["type"] == "markers" and m.get("source") == "deploy")
        error = await ide.expect(lambda m: m.get("reply_to") == request_id and m["type"] == "error")
    assert markers["markers"][0]["line"] == 2
    assert error["code"] == "invalid_source"
    assert engine.named("deploy") == []
    assert not await sync_to_async(Revision.objects.exists)()


async def test_revisions_diff_and_rollback(function, cookies, engine):
    async with ide_session(cookies["developer"]) as ide:
        await ide.ask("deploy", "deployed")
        await ide.ask("save", "saved", path="handler.py", content="def handle(e, c):\n    return 'v2'\n",
                      base_version=1)
        await ide.ask("deploy", "deployed")
        revisions = await ide.ask("revisions", "revisions")
        assert [(r["number"], r["author"], r["status"], r["percent"]) for r in revisions["revisions"]] == [
            (2, "acme-developer", "ready", 100), (1, "acme-developer", "ready", 0)]
        old = await ide.ask("revision", "revision", number=1)
        assert "return 'v2'" not in old["files"]["handler.py"]
        missing = await ide.ask("revision", "revision", number=9)
        assert missing["type"] == "error" and missing["code"] == "not_found"
        request_id = await ide.send("rollback", number=1)
        rolled = await ide.expect(lambda m: m.get("reply_to") == request_id and m["type"] == "rolled_back")
        assert rolled["revision"] == 1
        after = await ide.expect(lambda m: m.get("reply_to") == request_id and m["type"] == "revisions")
    assert [(r["number"], r["percent"]) for r in after["revisions"]] == [(2, 0), (1, 100)]
    assert engine.named("set_traffic")[-1][2] == [(1, 100, "")]


# ---- permissions --------------------------------------------------------------------------------

async def test_viewer_gets_a_read_only_editor(function, cookies, engine):
    async with ide_session(cookies["viewer"]) as ide:
        opened = await ide.ask("open", "opened")
        assert opened["permissions"] == ["view"]
        assert "test_signature" not in opened
        save = await ide.ask("save", "saved", path="handler.py", content="# no\n", base_version=1)
        deploy = await ide.ask("deploy", "deployed")
        rollback = await ide.ask("rollback", "rolled_back", number=1)
        event = await ide.ask("test_event_save", "test_event_saved", name="nope")
        signature = await ide.ask("test_signature", "test_signature")
    for reply in (save, deploy, rollback, event, signature):
        assert reply["type"] == "error"
        assert reply["code"] == "permission_denied"
    assert await file_content() != "# no\n"
    assert engine.named("deploy") == []


async def test_access_withdrawn_while_open_is_refused(function, cookies, members):
    from tenancy.models import Membership
    from tenancy.services import tenant_member_remove

    async with ide_session(cookies["viewer"]) as ide:
        await ide.ask("open", "opened")
        membership = await sync_to_async(Membership.objects.get)(user=members["viewer"], tenant=function.tenant_id)
        await sync_to_async(tenant_member_remove)(acting_user=members["owner"], membership=membership)
        # The socket is told why and closed (tests/webide/test_access_revoked.py has the rest).
        closing = await ide.expect_type("closing")
        assert closing["code"] == "access_revoked"
        assert (await ide.communicator.receive_output(timeout=5)) == {"type": "websocket.close", "code": 4403}


# ---- presence -----------------------------------------------------------------------------------

async def test_presence_join_and_leave(function, cookies):
    async with ide_session(cookies["developer"]) as first:
        alone = await first.expect_type("presence")
        assert alone["users"] == [{"user": "acme-developer", "editors": 1, "me": True}]
        second_communicator, connected, _ = await connect(cookies["admin"])
        assert connected
        try:
            both = await first.expect(lambda m: m["type"] == "presence" and len(m["users"]) == 2)
            assert both["users"] == [{"user": "acme-admin", "editors": 1, "me": False},
                                     {"user": "acme-developer", "editors": 1, "me": True}]
            # The newcomer learns who was already there from their answers.
            while True:
                seen = await second_communicator.receive_json_from(timeout=5)
                if seen["type"] == "presence" and len(seen["users"]) == 2:
                    break
            assert {u["user"]: u["me"] for u in seen["users"]} == {"acme-admin": True, "acme-developer": False}
        finally:
            await second_communicator.disconnect()
        left = await first.expect(lambda m: m["type"] == "presence" and len(m["users"]) == 1)
    assert left["users"][0]["user"] == "acme-developer"


# ---- test events --------------------------------------------------------------------------------

async def test_test_events_crud(function, cookies):
    async with ide_session(cookies["developer"]) as ide:
        saved = await ide.ask("test_event_save", "test_event_saved", name="create order", method="post",
                              path="/orders", query="?dry=1", headers={"X-Trace": "1"}, body='{"n": 2}')
        event = saved["test_event"]
        assert (event["method"], event["path"], event["query"], event["headers"]) == (
            "POST", "orders", "dry=1", {"X-Trace": "1"})
        duplicate = await ide.ask("test_event_save", "test_event_saved", name="create order")
        assert duplicate["type"] == "error" and duplicate["code"] == "conflict"
        bad = await ide.ask("test_event_save", "test_event_saved", name="x", headers={"Bad Header": "1"})
        assert bad["type"] == "error" and bad["field"] == "headers"
        renamed = await ide.ask("test_event_save", "test_event_saved", event_id=event["id"], name="order",
                                method="POST", path="orders", body='{"n": 3}')
        assert renamed["test_event"]["name"] == "order"
        listed = await ide.ask("test_events", "test_events")
        assert [e["name"] for e in listed["test_events"]] == ["order"]
        deleted = await ide.ask("test_event_delete", "test_event_deleted", event_id=event["id"])
        assert deleted["event_id"] == event["id"]
        again = await ide.ask("test_event_delete", "test_event_deleted", event_id=event["id"])
        assert again["type"] == "error" and again["code"] == "not_found"
    assert not await sync_to_async(TestEvent.objects.exists)()


async def test_test_events_of_another_function_are_not_reachable(function, cookies, members):
    from functions.services import function_create
    from webide.services import test_event_save

    @sync_to_async
    def other_event():
        other = function_create(acting_user=members["developer"], tenant=function.tenant, name="other")
        return test_event_save(acting_user=members["developer"], function=other, name="theirs").pk

    event_id = await other_event()
    async with ide_session(cookies["developer"]) as ide:
        reply = await ide.ask("test_event_delete", "test_event_deleted", event_id=event_id)
        listed = await ide.ask("test_events", "test_events")
    assert reply["type"] == "error" and reply["code"] == "not_found"
    assert listed["test_events"] == []


# ---- logs ---------------------------------------------------------------------------------------

@sync_to_async
def write_invocation(function, lines):
    invocation = Invocation.objects.create(function=function, started_at=timezone.now(), status="success",
                                           http_status=200, duration_ms=3.5, cold_start=True)
    for level, message in lines:
        InvocationLog.objects.create(invocation=invocation, time=timezone.now(), level=level, message=message)
    return str(invocation.pk)


async def test_log_tail_filters_pauses_and_resumes(function, cookies):
    await write_invocation(function, [("INFO", "old line"), ("ERROR", "old failure")])
    async with ide_session(cookies["viewer"]) as ide:
        first = await ide.ask("logs", "logs", op="subscribe", level="ERROR")
        assert first["reset"] is True
        assert [line["message"] for line in first["lines"]] == ["old failure"]
        await ide.expect(lambda m: m["type"] == "logs_state" and m["running"] is True)
        await write_invocation(function, [("INFO", "new info"), ("ERROR", "new failure")])
        live = await ide.expect(lambda m: m["type"] == "logs" and not m.get("reset"), timeout=10)
        assert [line["message"] for line in live["lines"]] == ["new failure"]

        text = await ide.ask("logs", "logs", op="subscribe", text="NEW")
        assert [line["message"] for line in text["lines"]] == ["new info", "new failure"]
        paused = await ide.ask("logs", "logs_state", op="pause")
        assert paused["running"] is False
        await write_invocation(function, [("INFO", "new while paused")])
        resumed = await ide.ask("logs", "logs_state", op="resume")
        assert resumed["running"] is True
        caught_up = await ide.expect(lambda m: m["type"] == "logs", timeout=10)
    assert [line["message"] for line in caught_up["lines"]] == ["new while paused"]


async def test_invocation_record_and_its_lines(function, cookies):
    invocation_id = await write_invocation(function, [("INFO", "hello from the handler")])
    async with ide_session(cookies["developer"]) as ide:
        reply = await ide.ask("invocation", "invocation", invocation_id=invocation_id)
        missing = await ide.ask("invocation", "invocation", invocation_id=str(uuid.uuid4()))
        garbage = await ide.ask("invocation", "invocation", invocation_id="not-a-uuid")
    assert reply["invocation"]["cold_start"] is True and reply["invocation"]["http_status"] == 200
    assert [line["message"] for line in reply["lines"]] == ["hello from the handler"]
    assert missing["type"] == garbage["type"] == "error"


async def test_logs_of_another_tenants_function_do_not_leak(function, cookies, outsider):
    from functions.services import function_create
    from tenancy.models import Tenant

    @sync_to_async
    def globex_function():
        return function_create(acting_user=outsider, tenant=Tenant.objects.get(slug="globex"), name="hello")

    theirs = await globex_function()
    await write_invocation(theirs, [("INFO", "globex secret")])
    async with ide_session(cookies["developer"]) as ide:
        reply = await ide.ask("logs", "logs", op="subscribe")
    assert all("globex" not in line["message"] for line in reply["lines"])


def test_session_cookie_helper_logs_in(members):
    # The helper every test above relies on: a real session row for the user.
    from django.contrib.sessions.models import Session

    cookie = session_cookie(members["viewer"]).decode()
    key = cookie.split("=", 1)[1]
    assert Session.objects.get(session_key=key).get_decoded()["_auth_user_id"] == str(members["viewer"].pk)


async def test_an_editor_whose_process_died_leaves_the_presence_list(function, cookies, settings):
    """A join with no goodbye and no beats (its process was killed) drops out after a few beats."""
    from channels.layers import get_channel_layer

    from functions.events import function_group

    settings.NIMBUS_IDE_PRESENCE_BEAT = 0.1
    async with ide_session(cookies["developer"]) as ide, ide_session(cookies["admin"]) as other:
        await ide.expect(lambda m: m["type"] == "presence" and len(m["users"]) == 2)
        layer = get_channel_layer()
        ghost = await layer.new_channel()
        await layer.group_send(function_group(function.pk), {
            "type": "presence.join", "channel": ghost, "user": "acme-owner"})
        joined = await ide.expect(lambda m: m["type"] == "presence" and len(m["users"]) == 3)
        assert {u["user"] for u in joined["users"]} == {"acme-admin", "acme-developer", "acme-owner"}
        # The live editor keeps beating and stays; the ghost is forgotten.
        gone = await ide.expect(lambda m: m["type"] == "presence" and len(m["users"]) == 2)
        assert {u["user"] for u in gone["users"]} == {"acme-admin", "acme-developer"}
        await other.ask("open", "opened")


async def test_a_log_watcher_is_not_listed_as_an_editor(function, cookies):
    """The function page's live tail connects with ?presence=0: it tails logs but nobody sees it."""
    async with ide_session(cookies["developer"]) as editor:
        alone = await editor.expect_type("presence")
        assert [u["user"] for u in alone["users"]] == ["acme-developer"]
        async with ide_session(cookies["admin"], "/ws/ide/acme/hello/?presence=0") as watcher:
            subscribed = await watcher.ask("logs", "logs", op="subscribe", text="", level="")
            assert subscribed["type"] == "logs"
            # The editor opens a second tab: its presence answers list one user, never the watcher.
            async with ide_session(cookies["developer"]) as second:
                both = await second.expect(lambda m: m["type"] == "presence" and m["users"][0]["editors"] == 2)
                assert [u["user"] for u in both["users"]] == ["acme-developer"]
            seen = list(watcher.backlog)
            while not await watcher.communicator.receive_nothing(timeout=0.5):
                seen.append(await watcher.communicator.receive_json_from())
            assert not [m for m in seen if m["type"] == "presence"]
