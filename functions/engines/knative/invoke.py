"""Calls of functions on Knative from the portal: the gateway's ``/fn/`` requests and the delivery
queue's deliveries go to the function's Knative Service at its cluster-local address
(``NIMBUS_KNATIVE["INTERNAL_URL"]``), and each leaves an invocation record as a local call does.

Routes (function id, revisions, offline, invoke auth, timeout, memory) come from the database and
are cached briefly, as the local gateway's are. Knative picks the revision of an untagged call by
its own traffic split; the runtime shim names the one that answered (``X-Nimbus-Revision``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone as dt_timezone

import aiohttp
import yarl

from functions.engines.base import InvokeResult
from functions.engines.concurrency import routed_call
from functions.engines.local.gateway import (
    HOP_HEADERS,
    INSTANCE_REPORT_HEADERS,
    PREFIX,
    TEST_SIGNATURE_HEADER,
    TRACE_LINK_HEADER,
    _note_runtime_trace,
    _problem,
    _random,
    _respond,
    _trace,
    _trace_link,
)
from functions.engines.local.routes import Route, RouteTable

from . import names

DEFAULT_INTERNAL_URL = "http://{service}.{namespace}.svc.cluster.local"
# Beyond the function's timeout: Knative's queue-proxy answers 504 itself at timeoutSeconds, and a
# scale-from-zero adds the pod's start to the first request.
DEFAULT_TIMEOUT_MARGIN = 5.0
CONNECTIONS = 256  # kept-alive connections to Services, across all functions
KEEPALIVE_SECONDS = 30.0
HOP = {name.decode() for name in HOP_HEADERS}
NOT_FORWARDED = HOP | {"traceparent", "x-nimbus-invocation-id", "x-nimbus-trigger", TEST_SIGNATURE_HEADER.decode(),
                       TRACE_LINK_HEADER.decode()}
# Said by the delivery worker only: a direct call through the gateway may not claim to be a delivery.
DELIVERY_ONLY = {"x-nimbus-delivery-id", "x-nimbus-attempt"}
# The shim's report on its instance (cold start, handler time) goes into the record; the caller gets
# the portal's own X-Nimbus-Cold-Start and X-Nimbus-Duration-Ms.
INSTANCE_REPORT = set(INSTANCE_REPORT_HEADERS)
NOT_RETURNED = HOP | INSTANCE_REPORT | {"x-nimbus-invocation-id", "x-nimbus-revision"}


@dataclass
class KnativeRoute(Route):
    # The longest timeout of the revisions taking traffic (the one answering is Knative's choice).
    timeout_seconds: int = 30
    tag_timeouts: dict[str, int] = field(default_factory=dict)
    revision_ids: dict[int, int] = field(default_factory=dict)  # number → id, every ready revision

    def timeout_for(self, tag: str | None) -> int:
        return self.tag_timeouts.get(tag, self.timeout_seconds) if tag else self.timeout_seconds


class KnativeRouteTable(RouteTable):
    """The local engine's route table, plus what a call on Knative needs: revision ids by number
    and the revisions' timeouts."""

    def _load(self) -> dict[tuple[str, str], KnativeRoute]:
        from functions.models import Revision

        routes = super()._load()
        revisions: dict[int, dict[int, tuple[int, int]]] = {}
        rows = (Revision.objects.filter(function_id__in={r.function_id for r in routes.values()},
                                        status=Revision.Status.READY)
                .values_list("function_id", "number", "id", "config"))
        for function_id, number, revision_id, config in rows:
            timeout = int((config or {}).get("timeout_seconds") or 30)
            revisions.setdefault(function_id, {})[number] = (revision_id, timeout)
        result = {}
        for key, route in routes.items():
            known = revisions.get(route.function_id, {})
            timeouts = {t.revision: known.get(t.revision, (0, 30))[1] for t in route.targets}
            result[key] = KnativeRoute(
                function_id=route.function_id, tenant=route.tenant, tenant_id=route.tenant_id, name=route.name,
                invoke_auth=route.invoke_auth, offline=route.offline, memory_mb=route.memory_mb,
                targets=route.targets, max_concurrent=route.max_concurrent,
                timeout_seconds=max((timeouts[t.revision] for t in route.targets if t.percent > 0), default=30),
                tag_timeouts={t.tag: timeouts[t.revision] for t in route.targets if t.tag},
                revision_ids={number: revision_id for number, (revision_id, _) in known.items()})
        return result


class ServiceClient:
    """One HTTP client session per process, with kept-alive connections to the Services, on its
    own event loop thread: the gateway (the server's loop) and the delivery worker (its own loop)
    share it, and the engine's shutdown closes it."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.session: aiohttp.ClientSession | None = None
        self.lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self.lock:
            if self.loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run():
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self.thread = threading.Thread(target=run, name="nimbus-knative-client", daemon=True)
                self.thread.start()
                ready.wait()
                self.loop = loop
            return self.loop

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CONNECTIONS, keepalive_timeout=KEEPALIVE_SECONDS),
                # A proxy passes bodies as they are, sends no headers of its own, keeps no cookies
                # (one jar would mix tenants) and follows no redirects.
                auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"),
                cookie_jar=aiohttp.DummyCookieJar(),
                # Each request has its own deadline (the function's timeout); no session-wide cap.
                timeout=aiohttp.ClientTimeout(total=None))
        return self.session

    async def _request(self, method, url, headers, body, timeout):
        async with asyncio.timeout(timeout):
            async with self._session().request(method, yarl.URL(url, encoded=True), headers=headers, data=body,
                                               allow_redirects=False) as response:
                payload = await response.read()
                return response.status, [(k.decode("latin-1"), v.decode("latin-1"))
                                         for k, v in response.raw_headers], payload

    async def request(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes,
                      timeout: float) -> tuple[int, list[tuple[str, str]], bytes]:
        """(status, headers, body); raises asyncio.TimeoutError after ``timeout`` seconds and
        aiohttp.ClientError when the Service cannot be reached or drops the connection."""
        future = asyncio.run_coroutine_threadsafe(self._request(method, url, headers, body or None, timeout),
                                                  self._ensure())
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        with self.lock:
            loop, self.loop = self.loop, None
        if loop is None:
            return

        async def finish():
            if self.session is not None:
                await self.session.close()

        try:
            asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout=5)
        except Exception:  # noqa: BLE001 - shutting down: nothing left to report to
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self.thread is not None:
            self.thread.join(timeout=5)
        loop.close()
        self.session = None


@dataclass
class Answer:
    """How one call went: the Invocation status and what to tell the caller."""

    outcome: str  # success | error | timeout
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    revision: int | None
    error: str = ""
    # What the instance said about itself; handler_ms is None when no shim answered.
    cold_start: bool = False
    init_ms: float = 0.0
    handler_ms: float | None = None


def service_url(values: dict, namespace: str, function: str, tag: str | None) -> str:
    """The Service's cluster-local address; a tag's own route is ``<tag>-<service>`` (Knative's
    default tag template ``{{.Tag}}-{{.Name}}``)."""
    service = names.service(function)
    if tag:
        service = f"{tag}-{service}"
    template = values.get("INTERNAL_URL") or DEFAULT_INTERNAL_URL
    return template.format(service=service, namespace=namespace, function=function).rstrip("/")


async def exchange(engine, route: KnativeRoute, tag: str | None, method: str, path: str,
                   headers: list[tuple[str, str]], body: bytes) -> Answer:
    """Send one request to the function's Service and classify the answer."""
    timeout = route.timeout_for(tag) + engine.timeout_margin
    url = service_url(engine.values, engine.namespace(route.tenant), route.name, tag) + (path or "/")
    try:
        status, out_headers, out_body = await engine.service_client.request(method, url, headers, body, timeout)
    except asyncio.TimeoutError:
        return Answer("timeout", 504, [], b"", None, f"no answer within {timeout:g} s")
    except (aiohttp.ClientError, OSError) as exc:
        return Answer("error", 502, [], b"", None,
                      f"the function's Service at {url.split('?')[0]} could not be reached: {str(exc) or type(exc).__name__}")
    lowered = {k.lower(): v for k, v in out_headers}
    answered = lowered.get("x-nimbus-revision", "")
    revision = int(answered) if answered.isdigit() else None
    if "x-nimbus-invocation-id" not in lowered and status == 504:
        # Knative's queue-proxy gave up at the revision's timeoutSeconds before the shim answered.
        return Answer("timeout", 504, [], b"", revision, "Knative timed the request out")
    if "x-nimbus-invocation-id" not in lowered and status in (502, 503):
        # Knative's activator or ingress, not the function: no instance answered.
        return Answer("error", status, out_headers, out_body, revision,
                      f"Knative answered {status} (no instance of the function answered)")
    error_kind = lowered.get("x-nimbus-error")
    error = ""
    if error_kind == "memory":
        error = "out of memory; the instance was restarted"
    elif error_kind:
        error = "the handler raised an exception (see the logs)"
    cold = lowered.get("x-nimbus-cold-start") == "1"
    init_ms = (_milliseconds(lowered.get("x-nimbus-init-ms")) or 0.0) if cold else 0.0
    return Answer("error" if error_kind else "success", status, out_headers, out_body, revision, error,
                  cold_start=cold, init_ms=init_ms, handler_ms=_milliseconds(lowered.get("x-nimbus-handler-ms")))


def _milliseconds(value: str | None) -> float | None:
    """A duration the shim reported, or None when it is missing or not a plausible number."""
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and 0 <= number < 1e9 else None


def _revision_id(route: KnativeRoute, target, tag: str | None, answered: int | None) -> int | None:
    if answered is not None:
        return route.revision_ids.get(answered)
    if tag:
        return target.revision_id
    weighted = [t for t in route.targets if t.percent > 0]
    return weighted[0].revision_id if len(weighted) == 1 else None


def _finish(engine, record: dict, route: KnativeRoute, answer: Answer, started: float, round_trip_ms: float) -> None:
    # The handler's own time is the invocation's duration; the rest of the round trip was spent in
    # Knative's activator and queue-proxy and on the network, with the pod's start on a cold start
    # (its init_ms is part of that wait, as on the local engine).
    if answer.handler_ms is not None:
        duration_ms, queue_ms = answer.handler_ms, max(0.0, round_trip_ms - answer.handler_ms)
    else:
        duration_ms, queue_ms = round_trip_ms, 0.0
    record.update(status=answer.outcome, http_status=answer.status, instance="", cold_start=answer.cold_start,
                  init_ms=round(answer.init_ms, 3), queue_ms=round(queue_ms, 3), duration_ms=round(duration_ms, 3),
                  billed_gb_seconds=route.memory_mb / 1024 * max(duration_ms, 1.0) / 1000, error=answer.error[:2000])
    record.setdefault("trace", {})["total_ms"] = (time.monotonic() - started) * 1000
    engine.records.submit(record)


async def call(engine, route: KnativeRoute, target, tag: str | None, *, method: str, path: str,
               headers: list[tuple[str, str]], body: bytes, trigger: str, raw_headers,
               invocation_id: uuid.UUID | None = None) -> tuple[Answer, uuid.UUID, float]:
    """One recorded call: forwards ``headers`` (already stripped of the caller's credentials) with
    the platform's own (invocation id, trigger, traceparent continuing the caller's trace)."""
    started = time.monotonic()
    invocation_id = invocation_id or uuid.UUID(int=_random.getrandbits(128), version=4)
    trace_id, caller_span, gateway_span, traceparent = _trace(raw_headers)
    record = {"id": invocation_id, "function_id": route.function_id, "revision_id": None,
              "started_at": datetime.now(dt_timezone.utc), "trace_id": trace_id, "trigger": trigger,
              "trace": {"caller_span": caller_span, "gateway_span": gateway_span,
                        "link": _trace_link(raw_headers)}}
    forward = [(k, v) for k, v in headers if k.lower() not in NOT_FORWARDED]
    forward += [("X-Nimbus-Invocation-Id", str(invocation_id)), ("X-Nimbus-Trigger", trigger),
                ("traceparent", traceparent)]
    call_started = time.monotonic()
    answer = await exchange(engine, route, tag, method, path, forward, body)
    duration_ms = (time.monotonic() - call_started) * 1000
    record["revision_id"] = _revision_id(route, target, tag, answer.revision)
    _note_runtime_trace(record, answer.headers)
    _finish(engine, record, route, answer, started, duration_ms)
    return answer, invocation_id, duration_ms


# ---- the delivery queue's path (Engine.invoke) -----------------------------------------------------

async def invoke(engine, *, tenant: str, name: str, tag: str = "", method: str = "POST", path: str = "/",
                 headers: list[tuple[str, str]] | None = None, body: bytes = b"", trigger: str = "async",
                 invocation_id: uuid.UUID | None = None) -> InvokeResult:
    headers = [(str(k), str(v)) for k, v in (headers or [])]
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers]
    forward = [(k, v) for k, v in headers if k.lower() != "authorization"]

    async def one(route: KnativeRoute, target) -> InvokeResult:
        answer, recorded_id, _ = await call(engine, route, target, tag or None, method=method, path=path or "/",
                                            headers=forward, body=body, trigger=trigger, raw_headers=raw,
                                            invocation_id=invocation_id)
        out_headers = [(k, v) for k, v in answer.headers if k.lower() not in HOP and k.lower() not in INSTANCE_REPORT]
        return InvokeResult(answer.status, answer.body, out_headers, str(recorded_id), answer.outcome, answer.error)

    return await routed_call(engine, tenant, name, tag, one)


# ---- the gateway's path (/fn/ on the Knative engine) -------------------------------------------------

async def respond(engine, scope, send, route: KnativeRoute, target, tag: str | None, sub_path: str, headers,
                  body: bytes) -> None:
    """Answer one authorised gateway request (functions/engines/local/gateway.py did the parsing,
    auth, body limit and async hand-off) by calling the function's Service."""
    forward = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
               if not (k == b"authorization" and route.invoke_auth == "token")
               and k.decode("latin-1") not in DELIVERY_ONLY]
    client_addr = scope.get("client")
    if client_addr:
        forward.append(("X-Forwarded-For", str(client_addr[0])))
    raw_path = scope.get("raw_path")
    if raw_path:
        raw = raw_path.decode("latin-1")[len(PREFIX) + len(route.tenant) + 1:]
        target_path = "/" + raw.split("/", 1)[1] if "/" in raw else "/"
    else:
        target_path = sub_path
    query = scope.get("query_string", b"").decode("latin-1")
    if query:
        target_path += "?" + query
    answer, invocation_id, duration_ms = await call(
        engine, route, target, tag, method=scope["method"], path=target_path, headers=forward, body=body,
        trigger="http", raw_headers=headers)
    revision = answer.revision if answer.revision is not None else (target.revision if tag else None)
    nimbus = [(b"x-nimbus-invocation-id", str(invocation_id).encode()),
              (b"x-nimbus-cold-start", b"yes" if answer.cold_start else b"no"),
              (b"x-nimbus-duration-ms", f"{duration_ms:.2f}".encode())]
    if revision is not None:
        nimbus.append((b"x-nimbus-revision", str(revision).encode()))
    if answer.outcome == "timeout":
        await _respond(send, 504, _problem("timeout", f"The function did not answer within "
                                                      f"{route.timeout_for(tag)} s."), nimbus)
        return
    if answer.outcome == "error" and not answer.headers:
        await _respond(send, 502, _problem("unreachable", "The function's Knative Service could not be reached; "
                                                          "retry, or check the function's status."), nimbus)
        return
    out = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers
           if k.lower() not in NOT_RETURNED]
    await _respond(send, answer.status, answer.body, out + nimbus)
