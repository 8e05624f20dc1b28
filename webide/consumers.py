"""The IDE's WebSocket: one connection per open editor, forwarding the editor's requests to the
function services and the function's events (deploy progress, saves, presence) back to the editor.

Client → server: ``{"action": "<name>", "id": <request id>, ...}``. Every answer carries
``reply_to`` with that id; refusals are one ``{"type": "error", "code", "detail", ...}`` shape.
When the user's access to the tenant is taken away or narrowed (removed, downgraded, deactivated),
the server sends ``{"type": "closing", "code": "access_revoked", "detail"}`` and closes with 4403.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection

from functions import services as function_services
from functions.events import function_group
from functions.selectors import (
    function_by_id_for_user,
    function_for_user,
    function_permissions,
    revision_for_function,
    revisions_for_function,
    traffic_for_function,
    triggers_for_function,
)
from functions.starters import starters_for
from functions.test_invoke import test_signature
from portal.errors import NimbusError, NotFound, PermissionDenied, StaleVersion, ValidationFailed
from tenancy.revocation import member_group
from webide import selectors as ide_selectors
from webide import services as ide_services
from webide.presence import Presence

log = logging.getLogger(__name__)

# Close codes (4000-4999 are the application's): like HTTP 401, 403 and 404. 4403: the user's access
# to the tenant was taken away or narrowed while the editor was open (removed, downgraded,
# deactivated); the client says why and offers to reload.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_ACCESS_REVOKED = 4403
CLOSE_NOT_FOUND = 4404
LOG_POLL_SECONDS = 1.0


def _int(value, field: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValidationFailed(f"'{field}' must be a number.", field=field) from None


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationFailed(f"'{field}' must be text.", field=field)
    return value


class IdeConsumer(AsyncJsonWebsocketConsumer):
    """ws/ide/<tenant>/<function>/ — thin: selectors in connect, services for every action."""

    function_id: int | None = None
    member_group: str | None = None
    presence: Presence | None = None
    tail_task: asyncio.Task | None = None
    heartbeat_task: asyncio.Task | None = None
    listed = True  # an editor in the presence list (a log watcher is not)

    # ---- lifecycle ------------------------------------------------------------------------------

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        kwargs = self.scope["url_route"]["kwargs"]
        try:
            function = await database_sync_to_async(function_for_user)(user, kwargs["tenant"], kwargs["function"])
        except NimbusError:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.user = user
        self.function_id = function.pk
        self.group = function_group(function.pk)
        # Where tenancy.services tell this user's sockets in the tenant that their access changed.
        self.member_group = member_group(function.tenant_id, user.pk)
        self.own_versions: set[int] = set()
        self.deploy_tasks: set[asyncio.Task] = set()
        self.log_filter = {"text": "", "level": ""}
        self.log_after = 0
        self.presence = Presence(self.channel_name, user.get_username())
        # ?presence=0: a watcher (the function page's live log tail), not an editor — it neither
        # appears in nor follows the "who else is here" list.
        self.listed = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get("presence") != ["0"]
        await self.channel_layer.group_add(self.member_group, self.channel_name)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        if self.listed:
            await self.channel_layer.group_send(self.group, {
                "type": "presence.join", "channel": self.channel_name, "user": self.presence.username})
            self.heartbeat_task = asyncio.create_task(self.heartbeat())

    async def disconnect(self, code):
        if self.tail_task is not None:
            self.tail_task.cancel()
        if self.heartbeat_task is not None:
            self.heartbeat_task.cancel()
        if self.function_id is None:
            return
        if self.listed:
            await self.channel_layer.group_send(self.group, {"type": "presence.leave", "channel": self.channel_name})
        await self.channel_layer.group_discard(self.group, self.channel_name)
        await self.channel_layer.group_discard(self.member_group, self.channel_name)

    # ---- group messages -------------------------------------------------------------------------

    async def access_revoked(self, message):
        """The user was removed from the tenant, downgraded or deactivated: say why and close, so the
        editor neither acts nor hears the function's saves and deploys with access it no longer has."""
        await self.channel_layer.group_discard(self.group, self.channel_name)
        await self.send_json({"type": "closing", "code": "access_revoked",
                              "detail": f"This editor was closed: {message.get('reason', 'your access changed')}. "
                                        "Reload to continue with the access you have now."})
        await self.close(code=CLOSE_ACCESS_REVOKED)

    async def function_event(self, message):
        event = dict(message["event"])
        if event.get("kind") == "source.saved":
            event["mine"] = event.get("version") in self.own_versions
        await self.send_json({"type": "event", "event": event})

    async def presence_join(self, message):
        if not self.listed:
            return
        if self.presence.join(message["channel"], message["user"]):
            await self.channel_layer.send(message["channel"], {
                "type": "presence.here", "channel": self.channel_name, "user": self.presence.username})
        await self.send_presence()

    async def presence_here(self, message):
        if self.listed and self.presence.join(message["channel"], message["user"]):
            await self.send_presence()

    async def presence_beat(self, message):
        if self.listed and self.presence.join(message["channel"], message["user"]):
            await self.send_presence()

    async def heartbeat(self):
        """Tell the others this editor is still open; forget those that went quiet (a dead process)."""
        interval = settings.NIMBUS_IDE_PRESENCE_BEAT
        while True:
            await asyncio.sleep(interval)
            try:
                await self.channel_layer.group_send(self.group, {
                    "type": "presence.beat", "channel": self.channel_name, "user": self.presence.username})
                if self.presence.expire(interval):
                    await self.send_presence()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a layer hiccup costs one beat, not the connection
                log.warning("IDE presence heartbeat failed", exc_info=True)

    async def presence_leave(self, message):
        if self.listed and self.presence.leave(message["channel"]):
            await self.send_presence()

    async def send_presence(self):
        await self.send_json({"type": "presence", "users": self.presence.snapshot()})

    # ---- client messages ------------------------------------------------------------------------

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        # Decoded here, not in the base class, so that a message which is not JSON (or nests deeper
        # than the decoder follows) is answered like any refusal instead of closing the editor's socket.
        if not text_data:
            refusal = ValidationFailed("Send JSON objects as text messages.")
        else:
            try:
                content = await self.decode_json(text_data)
            except ValueError as exc:
                refusal = ValidationFailed(f"The message is not valid JSON: {exc}.")
            except RecursionError:
                refusal = ValidationFailed("The message is nested too deeply.")
            else:
                await self.receive_json(content, **kwargs)
                return
        await self.send_json({"type": "error", **refusal.as_dict()})

    async def receive_json(self, content, **kwargs):
        if not isinstance(content, dict):
            await self.send_json({"type": "error", "code": "invalid", "detail": "Send JSON objects."})
            return
        action = str(content.get("action", ""))
        request_id = content.get("id")
        try:
            if action == "deploy":
                # A deploy can take a while: run it beside this connection's message loop so progress
                # events (and everything else) keep flowing, in a thread of its own.
                task = asyncio.create_task(self.run_deploy(content, request_id))
                # The loop keeps only a weak reference to tasks.
                self.deploy_tasks.add(task)
                task.add_done_callback(self.deploy_tasks.discard)
                return
            if action == "logs":
                replies = await self.act_logs(content)
            else:
                handler = getattr(self, f"act_{action}", None) if action.isidentifier() else None
                if handler is None:
                    raise ValidationFailed(f"Unknown action '{action[:40]}'.", field="action")
                replies = await database_sync_to_async(handler)(content)
        except NimbusError as exc:
            replies = self.refusal(exc, action)
        except Exception:  # noqa: BLE001 - one failed request (a save) must not close the editor's socket
            log.exception("IDE action %r failed", action)
            replies = [{"type": "error", "action": action, "code": "error",
                        "detail": "The server failed to carry this out; reload the editor to see what is saved."}]
        for reply in replies:
            reply.setdefault("reply_to", request_id)
            await self.send_json(reply)

    def refusal(self, exc: NimbusError, action: str) -> list[dict]:
        """The one place where a domain error becomes WebSocket messages."""
        replies = []
        markers = exc.details.get("markers")
        if markers:
            replies.append({"type": "markers", "markers": markers, "source": action})
        replies.append({"type": "error", "action": action, **exc.as_dict()})
        return replies

    async def run_deploy(self, content: dict, request_id):
        try:
            replies = await database_sync_to_async(self.deploy_in_own_thread, thread_sensitive=False)(content)
        except NimbusError as exc:
            replies = self.refusal(exc, "deploy")
        except Exception:  # noqa: BLE001 - the task has nobody else to report to
            log.exception("deploy from the IDE failed")
            replies = [{"type": "error", "action": "deploy", "code": "error", "detail": "The deploy failed to start."}]
        for reply in replies:
            reply.setdefault("reply_to", request_id)
            await self.send_json(reply)

    # The act_* methods run in a worker thread (database_sync_to_async) and return replies.

    def function(self, action: str = "view"):
        # Resolve again on every request: access can be withdrawn while the editor is open. The account
        # too is read again, not taken from the scope as it was at connect: one turned off since (in the
        # admin, by a script) acts no more, whether or not its close message arrived.
        user = get_user_model().objects.filter(pk=self.user.pk, is_active=True).first()
        if user is None:
            raise PermissionDenied("Your account was deactivated; this editor can do nothing more.")
        self.user = user
        return function_by_id_for_user(user, self.function_id, action)

    def act_ping(self, content):
        return [{"type": "pong"}]

    def act_open(self, content):
        function = self.function()
        files = function_services.function_files(function)
        perms = sorted(function_permissions(self.user, [function])[function.pk])
        reply = {
            "type": "opened",
            "function": {"tenant": function.tenant.slug, "name": function.name, "runtime": function.runtime,
                         "handler": function.handler, "state": function.state, "invoke_auth": function.invoke_auth,
                         "invoke_path": f"/fn/{function.tenant.slug}/{function.name}/"},
            "files": [{"path": p, "content": files[p]} for p in sorted(files)],
            "source_version": function.source_version,
            "permissions": perms,
            "user": self.presence.username,
            "starters": [{"name": n, "title": t} for n, t in starters_for(function.runtime)],
            "revisions": self.revision_rows(function),
            "test_events": [e.as_dict() for e in ide_selectors.test_events_for_function(function)],
            "markers": function_services.syntax_errors(function.runtime, files),
            "triggers": [{"name": t.name, "kind": t.kind, "enabled": t.enabled, "schedule": t.schedule,
                          "time_zone": t.time_zone, "filters": t.filters}
                         for t in triggers_for_function(function)],
        }
        if "change" in perms:
            reply["test_signature"] = test_signature(user_id=self.user.pk, function_id=function.pk)
        return [reply]

    def act_files(self, content):
        function = self.function()
        files = function_services.function_files(function)
        return [{"type": "files", "files": [{"path": p, "content": files[p]} for p in sorted(files)],
                 "source_version": function.source_version}]

    def act_test_signature(self, content):
        function = self.function("change")
        return [{"type": "test_signature", "signature": test_signature(user_id=self.user.pk, function_id=function.pk)}]

    def act_save(self, content):
        function = self.function()
        path = _text(content.get("path"), "path")
        text = _text(content.get("content"), "content")
        base = _int(content.get("base_version"), "base_version")
        try:
            version = function_services.function_file_save(
                acting_user=self.user, function=function, path=path, content=text, base_version=base)
        except StaleVersion as exc:
            current = function_services.function_files(function)
            return [{"type": "conflict", "path": path, "base_version": base,
                     "current_version": exc.details.get("current_version"),
                     "theirs": current.get(path), "mine": text, "detail": exc.message}]
        self.own_versions.add(version)
        markers = function_services.syntax_errors(function.runtime, {path: text})
        return [{"type": "saved", "path": path, "version": version},
                {"type": "markers", "markers": markers, "paths": [path], "source": "save"}]

    def act_create(self, content):
        function = self.function()
        path = function_services.validate_path(_text(content.get("path"), "path"))
        if path in function_services.function_files(function):
            raise ValidationFailed(f"'{path}' already exists.", field="path")
        text = _text(content.get("content", ""), "content")
        version = function_services.function_file_save(
            acting_user=self.user, function=function, path=path, content=text,
            base_version=_int(content.get("base_version"), "base_version"))
        self.own_versions.add(version)
        return [{"type": "created", "path": path, "content": text, "version": version}]

    def act_rename(self, content):
        function = self.function()
        path, new_path = _text(content.get("path"), "path"), _text(content.get("new_path"), "new_path")
        version = function_services.function_file_rename(
            acting_user=self.user, function=function, path=path, new_path=new_path,
            base_version=_int(content.get("base_version"), "base_version"))
        self.own_versions.add(version)
        return [{"type": "renamed", "path": path, "new_path": function_services.validate_path(new_path),
                 "version": version}]

    def act_delete(self, content):
        function = self.function()
        path = _text(content.get("path"), "path")
        version = function_services.function_file_delete(
            acting_user=self.user, function=function, path=path,
            base_version=_int(content.get("base_version"), "base_version"))
        self.own_versions.add(version)
        return [{"type": "deleted", "path": path, "version": version}]

    def act_syntax(self, content):
        """Markers for the editor's buffers as they are now (saved or not) over the saved draft."""
        function = self.function()
        files = function_services.function_files(function)
        buffers = content.get("files") or {}
        if not isinstance(buffers, dict):
            raise ValidationFailed("'files' must map paths to text.", field="files")
        files.update({str(p): str(t) for p, t in buffers.items()})
        return [{"type": "markers", "markers": function_services.syntax_errors(function.runtime, files),
                 "paths": sorted(files), "source": "syntax"}]

    def deploy_in_own_thread(self, content):
        try:
            return self.act_deploy(content)
        finally:
            # Pool threads come and go; do not leave their database connections behind. (While the
            # engine builds, the deploy holds none either: run_deploy gives it back before that step.)
            connection.close()

    def act_deploy(self, content):
        function = self.function()
        message = content.get("message") or ""
        revision = function_services.function_deploy(
            acting_user=self.user, function=function, message=str(message)[:200], inline=True)
        revision.refresh_from_db()
        return [{"type": "deployed", "revision": revision.number, "status": revision.status,
                 "status_message": revision.status_message},
                {"type": "markers", "markers": [], "paths": sorted(revision.files), "source": "deploy"},
                {"type": "revisions", "revisions": self.revision_rows(function)}]

    def revision_rows(self, function) -> list[dict]:
        percents = {t.revision.number: t.percent for t in traffic_for_function(function)}
        return [{"number": r.number, "author": r.author.get_username() if r.author else "",
                 "created_at": r.created_at.isoformat(), "status": r.status, "status_message": r.status_message,
                 "message": r.message, "hash": r.content_hash[:12], "percent": percents.get(r.number, 0)}
                for r in revisions_for_function(function)[:100]]

    def act_revisions(self, content):
        return [{"type": "revisions", "revisions": self.revision_rows(self.function())}]

    def act_revision(self, content):
        function = self.function()
        revision = revision_for_function(function, _int(content.get("number"), "number"))
        return [{"type": "revision", "number": revision.number, "files": revision.files}]

    def act_rollback(self, content):
        function = self.function()
        revision = function_services.revision_rollback(
            acting_user=self.user, function=function, number=_int(content.get("number"), "number"))
        return [{"type": "rolled_back", "revision": revision.number},
                {"type": "revisions", "revisions": self.revision_rows(function)}]

    def act_test_events(self, content):
        function = self.function()
        return [{"type": "test_events",
                 "test_events": [e.as_dict() for e in ide_selectors.test_events_for_function(function)]}]

    def act_test_event_save(self, content):
        function = self.function()
        event_id = content.get("event_id")
        headers = content.get("headers") or {}
        event = ide_services.test_event_save(
            acting_user=self.user, function=function, event_id=_int(event_id, "event_id") if event_id else None,
            name=_text(content.get("name", ""), "name"), method=_text(content.get("method", "GET"), "method"),
            path=_text(content.get("path", ""), "path"), query=_text(content.get("query", ""), "query"),
            headers=headers, body=_text(content.get("body", ""), "body"))
        return [{"type": "test_event_saved", "test_event": event.as_dict()},
                *self.act_test_events(content)]

    def act_test_event_delete(self, content):
        function = self.function()
        ide_services.test_event_delete(acting_user=self.user, function=function,
                                       event_id=_int(content.get("event_id"), "event_id"))
        return [{"type": "test_event_deleted", "event_id": content.get("event_id")},
                *self.act_test_events(content)]

    def act_invocation(self, content):
        """One invocation's record and log lines (the test panel's invocation id opens this)."""
        function = self.function()
        invocation_id = str(content.get("invocation_id", ""))
        invocation = ide_selectors.invocation_for_function(function, invocation_id)
        if invocation is None:
            raise NotFound("Invocation not found (its record may not be written yet).")
        record = {"id": str(invocation.pk), "status": invocation.status, "http_status": invocation.http_status,
                  "duration_ms": invocation.duration_ms, "cold_start": invocation.cold_start,
                  "init_ms": invocation.init_ms, "started_at": invocation.started_at.isoformat(),
                  "revision": invocation.revision.number if invocation.revision else None,
                  "trace_id": invocation.trace_id, "error": invocation.error}
        lines = ide_selectors.log_lines_for_function(function, invocation_id=invocation_id, limit=1000)
        return [{"type": "invocation", "invocation": record, "lines": lines}]

    # ---- live log tail --------------------------------------------------------------------------

    async def act_logs(self, content):
        """``op``: subscribe (with ``text``/``level`` filters; sends the recent tail), pause, resume."""
        op = content.get("op", "subscribe")
        if op == "pause":
            self.stop_tail()
            return [{"type": "logs_state", "running": False}]
        if op not in ("subscribe", "resume"):
            raise ValidationFailed(f"Unknown logs operation '{str(op)[:20]}'.", field="op")
        self.stop_tail()
        replies = []
        if op == "subscribe" or "text" in content or "level" in content:
            self.log_filter = {"text": str(content.get("text", ""))[:200], "level": str(content.get("level", ""))}
            lines, last = await database_sync_to_async(self.recent_log_lines)()
            self.log_after = last
            replies.append({"type": "logs", "lines": lines, "reset": True})
        self.tail_task = asyncio.create_task(self.tail_logs())
        replies.append({"type": "logs_state", "running": True})
        return replies

    def recent_log_lines(self):
        function = self.function()
        last = ide_selectors.last_log_id(function)
        lines = ide_selectors.log_lines_for_function(function, limit=200, **self.log_filter)
        return lines, max([last, *(line["id"] for line in lines)])

    def new_log_lines(self):
        return ide_selectors.log_lines_for_function(self.function(), after_id=self.log_after, **self.log_filter)

    def stop_tail(self):
        if self.tail_task is not None:
            self.tail_task.cancel()
            self.tail_task = None

    async def tail_logs(self):
        # Polling the rows the engine writes keeps the tail engine-agnostic and cross-process.
        try:
            while True:
                await asyncio.sleep(LOG_POLL_SECONDS)
                try:
                    lines = await database_sync_to_async(self.new_log_lines)()
                except NimbusError as exc:
                    for reply in self.refusal(exc, "logs"):
                        await self.send_json(reply)
                    return
                if lines:
                    self.log_after = lines[-1]["id"]
                    await self.send_json({"type": "logs", "lines": lines})
        except asyncio.CancelledError:
            pass

