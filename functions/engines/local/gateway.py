"""The local gateway: ``/fn/<tenant>/<function>[@tag]/<path>`` → an instance of the routed revision
(on the Knative engine, after the same routing and auth, → the function's Knative Service).

A lean ASGI app (no Django middleware, sessions or per-request queries beyond the cached route
table and a cached token check, valid while the shared access generation stands), which records every
invocation off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
import uuid
from datetime import datetime, timezone as dt_timezone

from functions.engines.concurrency import refusal, tenant_slots
from functions.engines.local import client
from functions.engines.local.instances import InstanceFailed, PoolClosed, Saturated
from functions.engines.local.routes import with_own_connection
from functions.invoke_access import TokenAccess, token_access
from functions.test_invoke import HEADER as TEST_SIGNATURE_HEADER_NAME
from functions.test_invoke import check_test_signature, test_signer
from portal.errors import BodyTooLarge, DatabaseBusy
from tenancy.revocation import access_generation, on_access_changed

TEST_SIGNATURE_HEADER = TEST_SIGNATURE_HEADER_NAME.encode()

PREFIX = "/fn/"
# A token's access is cached with the access generation it was looked up under, and used only while
# every process's shared generation (tenancy/revocation.py; Redis) still says that: revoking a token,
# removing or downgrading a member, suspending a tenant or deactivating a user raises it, so the very
# next call in any process looks the token up again. A generation that cannot be read means no cache.
# A token reaching its expiry raises no generation: its entry ends with the expiry it carries.
TOKEN_CACHE_SECONDS = 5.0
EXIT_REASON_WAIT = 1.0
HOP_HEADERS = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"proxy-connection", b"te",
               b"trailer", b"content-length", b"host"}
# What the runtime shim reports about its instance, for the Knative engine (which cannot see the
# instance); the local engine knows it from the pool and sets its own X-Nimbus-Cold-Start.
INSTANCE_REPORT_HEADERS = ("x-nimbus-cold-start", "x-nimbus-init-ms", "x-nimbus-handler-ms")
NOT_PASSED_ON = frozenset(("x-nimbus-invocation-id", "x-nimbus-revision", *INSTANCE_REPORT_HEADERS))
# Identifiers need to be unique, not secret; os.urandom costs ~70 µs a call on some VMs.
# What a caller may not pass on to the handler: hop-by-hop headers, and what the platform itself
# says (the trace, the invocation, the trigger, a queued delivery's id and attempt, the IDE's signature).
# The caller's span context, set by the gateway only, when a caller outside the function's tenant
# sent a traceparent: the call starts a trace of its own, linked to the caller's (see _trace_headers).
TRACE_LINK_HEADER = b"x-nimbus-trace-link"
PLATFORM_HEADERS = {b"traceparent", b"x-nimbus-invocation-id", b"x-nimbus-trigger", b"x-nimbus-delivery-id",
                    b"x-nimbus-attempt", TRACE_LINK_HEADER}
NOT_FORWARDED = HOP_HEADERS | PLATFORM_HEADERS | {TEST_SIGNATURE_HEADER}
_random = random.Random()
HEX = frozenset("0123456789abcdefABCDEF")
_token_cache: dict[str, tuple[float, int, TokenAccess | None]] = {}


def _engine():
    from functions.engines import get_engine

    return get_engine()


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = list(headers or [])
    if not any(name == b"content-type" for name, _ in headers):
        headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _problem(code: str, detail: str) -> bytes:
    return json.dumps({"code": code, "detail": detail}).encode()


def _too_large(limit: int) -> bytes:
    """The 413's body, the same as the API's and the event ingress's (it names the limit)."""
    return json.dumps(BodyTooLarge(limit).as_dict()).encode()


async def _read_body(receive, limit: int) -> bytes | None:
    """The request body, or None once it exceeds ``limit``."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _drop_access_caches() -> None:
    _token_cache.clear()
    from functions import engines

    routes = getattr(engines._engine, "routes", None)
    if routes is not None:
        routes.invalidate()  # a suspended tenant's routes go too


on_access_changed(_drop_access_caches)


def _token_check(token: str, key: str, generation: int | None) -> TokenAccess | None:
    """The token's access, looked up now; kept under ``generation`` (read before the lookup began, so
    a change committed meanwhile makes the entry stale at once), unless that is None."""
    started = time.monotonic()
    access = token_access(token)
    if generation is not None:
        if len(_token_cache) > 10000:
            _token_cache.clear()
        _token_cache[key] = (started, generation, access)
    return access


async def _token_access(token: str) -> TokenAccess | None:
    key = hashlib.sha256(token.encode()).hexdigest()
    generation = await access_generation()
    cached = _token_cache.get(key) if generation is not None else None
    if (cached and cached[1] == generation and time.monotonic() - cached[0] < TOKEN_CACHE_SECONDS
            and (cached[2] is None or cached[2].usable(time.time()))):
        return cached[2]
    return await asyncio.to_thread(with_own_connection, _token_check, token, key, generation)


async def _signed_test_call(headers, function_id: int) -> bool:
    """The IDE's test panel calls private functions with a short-lived signature for this one
    function (functions/test_invoke.py) instead of an API token in the browser. Its user's right to
    run the function is looked up on every call (test calls are few), never cached."""
    value = next((v.decode("latin-1") for k, v in headers if k == TEST_SIGNATURE_HEADER), "")
    if not value or test_signer(value, function_id) is None:
        return False
    return await asyncio.to_thread(with_own_connection, check_test_signature, value, function_id)


def _parse_path(path: str) -> tuple[str, str, str | None, str] | None:
    rest = path[len(PREFIX):]
    parts = rest.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return None
    tenant, name = parts[0], parts[1]
    tag = None
    if "@" in name:
        name, tag = name.split("@", 1)
    sub = "/" + (parts[2] if len(parts) > 2 else "")
    return tenant, name, tag, sub


async def gateway_app(scope, receive, send):
    if scope["type"] != "http":
        return
    started = False

    async def tracked_send(message):
        nonlocal started
        started = True
        await send(message)

    try:
        await _serve(scope, receive, tracked_send)
    except DatabaseBusy as exc:
        # Routes, tokens and async hand-offs read the database; when it has no connection to give
        # (every one of the pool's in use), the caller is told to retry instead of the server failing.
        if started:
            raise
        await _respond(send, exc.http_status, json.dumps(exc.as_dict()).encode(),
                       [(b"retry-after", str(exc.retry_after).encode())])


async def _serve(scope, receive, send):
    engine = _engine()
    parsed = _parse_path(scope["path"])
    if parsed is None:
        await _respond(send, 404, _problem("not_found", "Use /fn/<tenant>/<function>/<path>."))
        return
    tenant, name, tag, sub_path = parsed
    route = await engine.routes.aget(tenant, name)
    if route is None or route.offline:
        await _respond(send, 404, _problem("not_found", f"There is no function {tenant}/{name}."))
        return
    headers = scope.get("headers") or []
    if route.invoke_auth == "token" and not await _signed_test_call(headers, route.function_id):
        authorization = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await _respond(send, 401, _problem("unauthenticated", "This function needs an API token with the "
                                                                  "invoke scope (Authorization: Bearer …)."),
                           [(b"www-authenticate", b'Bearer realm="nimbus"')])
            return
        access = await _token_access(token.strip())
        if access is None:
            await _respond(send, 401, _problem("unauthenticated", "The API token is invalid or expired."),
                           [(b"www-authenticate", b'Bearer realm="nimbus", error="invalid_token"')])
            return
        if access.tenant_id != route.tenant_id:
            # Another tenant's token: the function does not exist as far as it can tell.
            await _respond(send, 404, _problem("not_found", f"There is no function {tenant}/{name}."))
            return
        if "invoke" not in access.scopes:
            await _respond(send, 403, _problem("permission_denied", "The API token lacks the invoke scope (or its "
                                                                    "user's role no longer allows it)."))
            return
        if not access.may_invoke(route.function_id):
            await _respond(send, 403, _problem("permission_denied", "The API token's user may not run this function: "
                                                                    "viewers read only, unless the function is "
                                                                    "shared with them to edit or deploy."))
            return
    # Past the check above, a token function's caller is of its tenant; a public function's is anyone.
    headers = await _trace_headers(headers, route, insider=route.invoke_auth == "token")
    target = route.pick(tag)
    if target is None:
        detail = f"No revision is tagged '{tag}'." if tag else "No revision takes traffic."
        await _respond(send, 404, _problem("not_found", detail))
        return
    limit = engine.max_body_bytes
    declared = next((v for k, v in headers if k == b"content-length"), None)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _respond(send, 413, _too_large(limit), [(b"connection", b"close")])
        return
    try:
        body = await _read_body(receive, limit)
    except ConnectionAbortedError:
        return
    if body is None:
        await _respond(send, 413, _too_large(limit), [(b"connection", b"close")])
        return
    if _wants_async(headers):
        await _accept_async(send, scope, route, tag, sub_path, headers, body)
        return
    if not tenant_slots.take(route.tenant_id, route.max_concurrent):
        await _respond(send, 429, _problem("tenant_concurrency", refusal(route.tenant, route.max_concurrent)),
                       [(b"retry-after", b"1")])
        return
    try:
        if engine.name == "knative":
            # Same routes, auth, limits and async hand-off; the call goes to the function's Knative Service.
            await engine.respond(scope, send, route, target, tag, sub_path, headers, body)
        else:
            await _invoke(engine, scope, send, route, target, tag, sub_path, headers, body)
    finally:
        tenant_slots.give_back(route.tenant_id)


def _wants_async(headers) -> bool:
    """``Prefer: respond-async`` (RFC 7240) or ``X-Nimbus-Async: 1``."""
    for name, value in headers:
        if name == b"prefer" and b"respond-async" in value.lower():
            return True
        if name == b"x-nimbus-async" and value.strip().lower() in (b"1", b"true", b"yes"):
            return True
    return False


async def _accept_async(send, scope, route, tag, sub_path, headers, body) -> None:
    """Store the call in the delivery queue (functions/triggers) and answer 202 once it is durable."""
    from functions.triggers.gateway import accept_async

    status, payload, extra = await asyncio.to_thread(with_own_connection, accept_async, scope, route, tag,
                                                     sub_path, headers, body)
    await _respond(send, status, payload, extra)


def _span_context(value: str) -> tuple[str, str, str] | None:
    """(trace id, span id, flags) of a W3C traceparent, or None when it is not one. Hex only: the
    ids are stored with the invocation record, in a batch with other tenants' records."""
    parts = value.split("-")
    if (len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16 and len(parts[3]) >= 2
            and HEX.issuperset(parts[1]) and HEX.issuperset(parts[2]) and HEX.issuperset(parts[3][:2])):
        return parts[1].lower(), parts[2].lower(), parts[3][:2]
    return None


async def _same_tenant_caller(headers, route) -> bool:
    """Whether a public function's caller showed it is of the function's tenant: the IDE's test
    signature for it, or an API token of the tenant (any scope: it only decides whose trace this is)."""
    if any(k == TEST_SIGNATURE_HEADER for k, _ in headers):
        return await _signed_test_call(headers, route.function_id)
    authorization = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    access = await _token_access(token.strip())
    return access is not None and access.tenant_id == route.tenant_id


async def _trace_headers(headers, route, *, insider: bool):
    """The request's headers with its trace decided. A caller of the function's tenant (its token, its
    IDE) continues the trace its traceparent names. Anyone else (anonymous, another tenant) must not
    add spans to a trace it merely names, which may be another tenant's: the call starts a trace of
    its own, linked to the caller's span context (TRACE_LINK_HEADER, an OpenTelemetry span link)."""
    if not any(k == b"traceparent" or k == TRACE_LINK_HEADER for k, _ in headers):
        return headers
    traceparent = next((v for k, v in headers if k == b"traceparent"), b"")
    rest = [(k, v) for k, v in headers if k != b"traceparent" and k != TRACE_LINK_HEADER]
    if not traceparent:
        return rest  # a link header only the gateway may set
    if insider or await _same_tenant_caller(headers, route):
        return rest + [(b"traceparent", traceparent)]
    context = _span_context(traceparent.decode("latin-1"))
    return rest + ([(TRACE_LINK_HEADER, f"{context[0]}-{context[1]}".encode())] if context else [])


def _trace_link(headers) -> tuple[str, str]:
    """(trace id, span id) the gateway linked this call to, or ("", "")."""
    value = next((v.decode("latin-1") for k, v in headers if k == TRACE_LINK_HEADER), "")
    context = _span_context(f"00-{value}-01")
    return (context[0], context[1]) if context else ("", "")


def _trace(headers) -> tuple[str, str, str, str]:
    """(trace id, the caller's span id or "", the gateway's span id, the traceparent sent on): a
    traceparent the gateway let through continues its trace, with the gateway's span as the
    handler's parent; without one, a new trace starts."""
    value = next((v.decode("latin-1") for k, v in headers if k == b"traceparent"), "")
    context = _span_context(value)
    span_id = f"{_random.getrandbits(64):016x}"
    if context is not None:
        return context[0], context[1], span_id, f"00-{context[0]}-{span_id}-{context[2]}"
    trace_id = f"{_random.getrandbits(128):032x}"
    return trace_id, "", span_id, f"00-{trace_id}-{span_id}-01"


async def _invoke(engine, scope, send, route, target, tag, sub_path, headers, body) -> None:
    started = time.monotonic()
    started_at = datetime.now(dt_timezone.utc)
    invocation_id = uuid.UUID(int=_random.getrandbits(128), version=4)
    trace_id, caller_span, gateway_span, traceparent = _trace(headers)
    record = {"id": invocation_id, "function_id": route.function_id, "revision_id": target.revision_id,
              "started_at": started_at, "trace_id": trace_id, "trigger": "http",
              "trace": {"caller_span": caller_span, "gateway_span": gateway_span, "link": _trace_link(headers)}}

    def finish(status_name: str, http_status: int, *, instance="", cold=False, init_ms=0.0, queue_ms=0.0,
               duration_ms=0.0, error="") -> None:
        record.update(status=status_name, http_status=http_status, instance=instance[:64], cold_start=cold,
                      init_ms=round(init_ms, 3), queue_ms=round(queue_ms, 3), duration_ms=round(duration_ms, 3),
                      billed_gb_seconds=route.memory_mb / 1024 * max(duration_ms, 1.0) / 1000, error=error[:2000])
        record["trace"]["total_ms"] = (time.monotonic() - started) * 1000
        engine.records.submit(record)

    def nimbus_headers(cold: bool) -> list[tuple[bytes, bytes]]:
        return [(b"x-nimbus-invocation-id", str(invocation_id).encode()),
                (b"x-nimbus-cold-start", b"yes" if cold else b"no"),
                (b"x-nimbus-duration-ms", f"{(time.monotonic() - started) * 1000:.2f}".encode()),
                (b"x-nimbus-revision", str(target.revision).encode())]

    pool = engine.pool_for(target.revision_id)
    if pool is None:
        try:
            pool = await asyncio.to_thread(with_own_connection, engine.prepare, target.revision_id)
        except Exception as exc:  # noqa: BLE001 - the revision cannot run here: say so, record it
            finish("crashed", 503, error=f"could not prepare the revision: {exc}")
            await _respond(send, 503, _problem("unavailable", "The function could not be started."),
                           nimbus_headers(False))
            return
    for attempt in (1, 2):
        outcome = await _attempt(engine, send, route, target, pool, headers, body, scope, sub_path, record,
                                 invocation_id, traceparent, finish, nimbus_headers, retry=attempt == 1)
        if outcome != "retry":
            return
        replacement = engine.pool_for(target.revision_id)
        if replacement is None:
            # The revision's pool was retired meanwhile (traffic moved): ask the routes again.
            engine.routes.invalidate()
            fresh = await engine.routes.aget(route.tenant, route.name)
            fresh_target = fresh.pick(tag) if fresh is not None and not fresh.offline else None
            if fresh_target is None:
                break
            target, route = fresh_target, fresh
            record["revision_id"] = target.revision_id
            try:
                replacement = await asyncio.to_thread(with_own_connection, engine.prepare, target.revision_id)
            except Exception:  # noqa: BLE001 - answered below like a closed pool
                break
        pool = replacement
    finish("rejected", 503, error="the revision stopped serving")
    await _respond(send, 503, _problem("unavailable", "The revision is being replaced; retry."),
                   nimbus_headers(False) + [(b"retry-after", b"1")])


def _note_runtime_trace(record: dict, out_headers) -> None:
    """Keep the handler's span id and the user-defined spans the runtime reported (parsed later,
    off the request path, by the records writer)."""
    for name, value in out_headers:
        lowered = name.lower()
        if lowered == "traceparent":
            parts = value.split("-")
            if len(parts) == 4 and len(parts[2]) == 16:
                record["trace"]["handler_span"] = parts[2]
        elif lowered == "x-nimbus-spans":
            record["trace"]["spans_json"] = value


async def _attempt(engine, send, route, target, pool, headers, body, scope, sub_path, record, invocation_id,
                   traceparent, finish, nimbus_headers, retry: bool) -> str | None:
    try:
        inst, cold, queue_ms = await pool.acquire()
    except Saturated:
        finish("rejected", 429, error="every instance is busy and the queue is full")
        await _respond(send, 429, _problem("saturated", "The function is at capacity; retry later."),
                       nimbus_headers(False) + [(b"retry-after", b"1")])
        return
    except PoolClosed:
        return "retry"
    except InstanceFailed as exc:
        finish("crashed", 502, cold=True, error=str(exc))
        await _respond(send, 502, _problem("instance_failed", "The function's instance failed to start."),
                       nimbus_headers(True))
        return
    init_ms = inst.init_ms if cold else 0.0
    forward = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
               if k not in NOT_FORWARDED and not (k == b"authorization" and route.invoke_auth == "token")]
    client_addr = scope.get("client")
    if client_addr:
        forward.append(("X-Forwarded-For", str(client_addr[0])))
    forward += [("X-Nimbus-Invocation-Id", str(invocation_id)), ("X-Nimbus-Trigger", "http"),
                ("traceparent", traceparent)]
    query = scope.get("query_string", b"").decode("latin-1")
    raw_path = scope.get("raw_path")
    if raw_path:
        prefix_len = len(PREFIX) + len(route.tenant) + 1
        raw = raw_path.decode("latin-1")[prefix_len:]
        target_path = "/" + raw.split("/", 1)[1] if "/" in raw else "/"
    else:
        target_path = sub_path
    if query:
        target_path += "?" + query
    timeout = pool.spec.timeout_seconds
    call_started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            status, out_headers, out_body = await client.call(inst, scope["method"], target_path, forward, body)
    except asyncio.TimeoutError:
        duration = (time.monotonic() - call_started) * 1000
        pool.kill(inst, f"killed after the {timeout} s timeout")
        pool.release(inst)
        finish("timeout", 504, instance=inst.id, cold=cold, init_ms=init_ms, queue_ms=queue_ms,
               duration_ms=duration, error=f"timed out after {timeout} s; the instance was stopped")
        await _respond(send, 504, _problem("timeout", f"The function did not answer within {timeout} s."),
                       nimbus_headers(cold))
        return
    except client.InstanceGone as exc:
        duration = (time.monotonic() - call_started) * 1000
        # The fork server or the process reader tells why it ended a moment after the socket closes.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(inst.exited)), EXIT_REASON_WAIT)
        pool.kill(inst, f"connection lost: {exc}")
        pool.release(inst)
        if exc.before_request and retry:
            return "retry"  # it died before our request reached it (we had not heard yet): try another
        reason = inst.exit_reason or str(exc)
        finish("crashed", 502, instance=inst.id, cold=cold, init_ms=init_ms, queue_ms=queue_ms,
               duration_ms=duration, error=f"the instance died: {reason}")
        await _respond(send, 502, _problem("instance_died", "The function's instance died while answering."),
                       nimbus_headers(cold))
        return
    except BaseException:
        pool.release(inst)
        raise
    duration = (time.monotonic() - call_started) * 1000
    error_kind = next((v for k, v in out_headers if k.lower() == "x-nimbus-error"), None)
    _note_runtime_trace(record, out_headers)
    record["trace"]["instances"] = len(pool.instances)  # for the Monitor tab's instances chart
    if error_kind == "memory":
        pool.kill(inst, f"out of memory (limit {pool.spec.memory_mb} MB)")  # it exits; send nothing more its way
    pool.release(inst)
    error = ""
    if error_kind == "memory":
        error = f"out of memory (limit {pool.spec.memory_mb} MB); the instance was restarted"
    elif error_kind:
        error = "the handler raised an exception (see the logs)"
    finish("error" if error_kind else "success", status, instance=inst.id, cold=cold, init_ms=init_ms,
           queue_ms=queue_ms, duration_ms=duration, error=error)
    response_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in out_headers
                        if k.lower().encode("latin-1") not in HOP_HEADERS
                        and k.lower() not in NOT_PASSED_ON]
    await _respond(send, status, out_body, response_headers + nimbus_headers(cold))
