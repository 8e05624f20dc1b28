"""In-process invocation for the delivery queue: run one request through a function's routed
revision without HTTP in front, and record it with its trigger (``async``, ``cron``, ``event``,
``sequence``) like the gateway records ``http`` calls."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import datetime, timezone as dt_timezone

from functions.engines.base import InvokeResult
from functions.engines.concurrency import routed_call
from functions.engines.local import client
from functions.engines.local.gateway import (
    EXIT_REASON_WAIT,
    HOP_HEADERS,
    INSTANCE_REPORT_HEADERS,
    TRACE_LINK_HEADER,
    _random,
    _trace,
    _trace_link,
)
from functions.engines.local.instances import InstanceFailed, PoolClosed, Saturated
from functions.engines.local.routes import with_own_connection


async def invoke(engine, *, tenant: str, name: str, tag: str = "", method: str = "POST", path: str = "/",
                 headers: list[tuple[str, str]] | None = None, body: bytes = b"", trigger: str = "async",
                 invocation_id: uuid.UUID | None = None) -> InvokeResult:
    """One call of ``tenant/name`` (the tagged revision, or one drawn by traffic share)."""
    return await routed_call(engine, tenant, name, tag, lambda route, target: _call(
        engine, route, target, method=method, path=path, headers=headers, body=body, trigger=trigger,
        invocation_id=invocation_id))


async def _call(engine, route, target, *, method: str, path: str, headers, body: bytes, trigger: str,
                invocation_id: uuid.UUID | None) -> InvokeResult:
    headers = [(str(k), str(v)) for k, v in (headers or [])]
    raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers]
    invocation_id = invocation_id or uuid.UUID(int=_random.getrandbits(128), version=4)
    trace = _trace(raw_headers)
    trace_id, traceparent = trace[0], trace[-1]
    record = {"id": invocation_id, "function_id": route.function_id, "revision_id": target.revision_id,
              "started_at": datetime.now(dt_timezone.utc), "trace_id": trace_id, "trigger": trigger}
    if len(trace) == 4:
        # The span ids the observability records expect (caller's span, the platform's span).
        record["trace"] = {"caller_span": trace[1], "gateway_span": trace[2], "link": _trace_link(raw_headers)}

    def finish(outcome: str, status: int, *, instance="", cold=False, init_ms=0.0, queue_ms=0.0, duration_ms=0.0,
               error="", out_body=b"", out_headers=()) -> InvokeResult:
        record.update(status=outcome, http_status=status, instance=instance[:64], cold_start=cold,
                      init_ms=round(init_ms, 3), queue_ms=round(queue_ms, 3), duration_ms=round(duration_ms, 3),
                      billed_gb_seconds=route.memory_mb / 1024 * max(duration_ms, 1.0) / 1000, error=error[:2000])
        engine.records.submit(record)
        return InvokeResult(status, out_body, list(out_headers), str(invocation_id), outcome, error)

    pool = engine.pool_for(target.revision_id)
    if pool is None:
        try:
            pool = await asyncio.to_thread(with_own_connection, engine.prepare, target.revision_id)
        except Exception as exc:  # noqa: BLE001 - recorded, and the queue retries
            return finish("crashed", 503, error=f"could not prepare the revision: {exc}")
    try:
        inst, cold, queue_ms = await pool.acquire()
    except Saturated:
        return finish("rejected", 429, error="every instance is busy and the queue is full")
    except PoolClosed:
        engine.routes.invalidate()
        return finish("rejected", 503, error="the revision stopped serving")
    except InstanceFailed as exc:
        return finish("crashed", 502, cold=True, error=str(exc))
    init_ms = inst.init_ms if cold else 0.0
    forward = [(k, v) for k, v in headers
               if k.lower().encode("latin-1") not in HOP_HEADERS
               and k.lower() not in ("traceparent", "x-nimbus-invocation-id", "x-nimbus-trigger", "authorization",
                                     TRACE_LINK_HEADER.decode())]
    forward += [("X-Nimbus-Invocation-Id", str(invocation_id)), ("X-Nimbus-Trigger", trigger),
                ("traceparent", traceparent)]
    timeout = pool.spec.timeout_seconds
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            status, out_headers, out_body = await client.call(inst, method, path or "/", forward, body)
    except asyncio.TimeoutError:
        pool.kill(inst, f"killed after the {timeout} s timeout")
        pool.release(inst)
        return finish("timeout", 504, instance=inst.id, cold=cold, init_ms=init_ms, queue_ms=queue_ms,
                      duration_ms=(time.monotonic() - started) * 1000,
                      error=f"timed out after {timeout} s; the instance was stopped")
    except client.InstanceGone as exc:
        duration = (time.monotonic() - started) * 1000
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(inst.exited)), EXIT_REASON_WAIT)
        pool.kill(inst, f"connection lost: {exc}")
        pool.release(inst)
        return finish("crashed", 502, instance=inst.id, cold=cold, init_ms=init_ms, queue_ms=queue_ms,
                      duration_ms=duration, error=f"the instance died: {inst.exit_reason or exc}")
    except BaseException:
        pool.release(inst)
        raise
    duration = (time.monotonic() - started) * 1000
    error_kind = next((v for k, v in out_headers if k.lower() == "x-nimbus-error"), None)
    if error_kind == "memory":
        pool.kill(inst, f"out of memory (limit {pool.spec.memory_mb} MB)")
    pool.release(inst)
    error = ""
    if error_kind == "memory":
        error = f"out of memory (limit {pool.spec.memory_mb} MB); the instance was restarted"
    elif error_kind:
        error = "the handler raised an exception (see the logs)"
    out_headers = [(k, v) for k, v in out_headers if k.lower().encode("latin-1") not in HOP_HEADERS
                   and k.lower() not in INSTANCE_REPORT_HEADERS]
    return finish("error" if error_kind else "success", status, instance=inst.id, cold=cold, init_ms=init_ms,
                  queue_ms=queue_ms, duration_ms=duration, error=error, out_body=out_body, out_headers=out_headers)
