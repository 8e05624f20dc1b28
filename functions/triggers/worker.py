"""The delivery worker: fires due cron triggers (unless the engine runs them itself), claims
deliveries with a lease, invokes each through the engine (``Engine.invoke``), settles it (result,
retry with backoff, dead letter), moves sequences on to their next step, posts results to
callback URLs through the guarded client (functions.outbound) and, on an engine that needs it
(Knative), pulls function log lines in.

One thread with its own event loop; database work runs on a small thread pool. It runs inside
the portal process (``start_in_process``, from the ASGI entry point) and as
``manage.py nimbus_worker`` in separate processes; any number of them may share one database.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid

from django.db import OperationalError, close_old_connections, connections, transaction
from django.utils import timezone

from functions import outbound
from functions.models import Delivery, SequenceStep
from functions.triggers import cron, queue

DELIVERY_HEADERS = {"x-nimbus-delivery-id", "x-nimbus-attempt"}  # set by the worker, never by callers

log = logging.getLogger(__name__)

CALLBACK_TIMEOUT = 5.0  # resolving, connecting, sending and reading the answer, together
DB_RETRIES = 5
POLICY_TTL = 2.0
# Seconds the deliveries in flight get to finish when a worker stops; the rest go back to the queue
# at once (their handlers may have run: delivery is at least once). A portal stops within seconds
# of SIGTERM, so its own worker waits less than a separate ``nimbus_worker`` process does.
STOP_GRACE = 30.0
IN_PROCESS_STOP_GRACE = 1.0


class WorkerStopped(Exception):
    """The worker's database thread is gone (the interpreter is exiting): nothing more to do."""


def result_document(delivery: Delivery) -> dict:
    """What the status endpoint and callbacks say about a delivery."""
    body = bytes(delivery.result_body) if delivery.result_body is not None else None
    document = {
        "id": str(delivery.pk), "function": delivery.function.name,
        "source": delivery.source, "state": delivery.state, "attempts": delivery.attempts,
        "created_at": delivery.created_at.isoformat() if delivery.created_at else None,
        "finished_at": delivery.finished_at.isoformat() if delivery.finished_at else None,
        "invocation_id": str(delivery.invocation_id) if delivery.invocation_id else None,
        "error": delivery.last_error, "status": delivery.result_status,
        "headers": dict(delivery.result_headers or []),
        "run_id": str(delivery.run_id) if delivery.run_id else None, "step": delivery.step,
    }
    if body is None:
        document["body"] = None
    else:
        try:
            document["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            document["body_base64"] = base64.b64encode(body).decode()
            document["body"] = None
    return document


def callback_request(delivery_id) -> tuple[str, bytes, dict[str, str]] | None:
    """(url, body, headers) of the delivery's callback, or None when it has none."""
    delivery = Delivery.objects.select_related("function").get(pk=delivery_id)
    if not delivery.callback_url:
        return None
    payload = json.dumps(result_document(delivery)).encode()
    return delivery.callback_url, payload, {
        "Content-Type": "application/json", "User-Agent": "nimbus-callback/1",
        "X-Nimbus-Delivery-Id": str(delivery.pk), "X-Nimbus-Delivery-State": delivery.state}


def callback_record(delivery_id, result: outbound.OutboundResult) -> str:
    """Keep what the user may know about the callback: delivered or failed and the HTTP status."""
    summary = result.summary[:100]
    Delivery.objects.filter(pk=delivery_id).update(callback_status=summary)
    return summary


class Worker:
    def __init__(self, *, worker_id: str | None = None, concurrency: int = 8, poll_seconds: float = 0.25,
                 lease_seconds: float = queue.DEFAULT_LEASE_SECONDS, cron_enabled: bool = True, engine=None,
                 stop_grace: float = STOP_GRACE):
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.concurrency = max(1, concurrency)
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.cron_enabled = cron_enabled
        self.stop_grace = max(0.0, stop_grace)
        self._engine = engine
        self.held: dict[uuid.UUID, int] = {}  # delivery id → attempt, while invoking
        self.policies: dict[int, tuple[float, queue.Policy]] = {}
        self.processed = 0
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wakeup: asyncio.Event | None = None
        self.stopping = threading.Event()
        self.db = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nimbus-worker-db")

    @property
    def engine(self):
        if self._engine is None:
            from functions.engines import get_engine

            self._engine = get_engine()
        return self._engine

    # ---- life cycle --------------------------------------------------------------------------------

    def start(self) -> Worker:
        self.thread = threading.Thread(target=self.run, name=f"nimbus-worker-{self.worker_id}", daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        """Run until stop() (blocking; the management command calls this in its main thread)."""
        asyncio.run(self._main())

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.wake()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def wake(self) -> None:
        """Look at the queue now (a delivery was just stored in this process)."""
        loop, event = self.loop, self.wakeup
        if loop is not None and event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # the loop closed meanwhile

    async def _db(self, fn, *args, **kwargs):
        def call():
            close_old_connections()
            try:
                for attempt in range(DB_RETRIES):
                    try:
                        return fn(*args, **kwargs)
                    except OperationalError as exc:
                        # SQLite answers "database is locked" to a writer that waited too long; every
                        # queue write is conditional on the attempt it settles, so trying again is safe.
                        if "locked" not in str(exc) or attempt == DB_RETRIES - 1:
                            raise
                        time.sleep(0.05 * (attempt + 1))
            finally:
                # Back to the pool after every call: the worker idles between polls, and a connection
                # kept here would be one less for the requests.
                connections.close_all()

        try:
            return await asyncio.get_running_loop().run_in_executor(self.db, call)
        except RuntimeError as exc:
            if "cannot schedule new futures" not in str(exc):
                raise
            self.stopping.set()  # the interpreter is exiting and took the thread pool with it
            raise WorkerStopped() from None

    def _trouble(self, message: str, *args) -> None:
        """Log a failed step with its traceback, unless the worker is stopping (then it is expected)."""
        if self.stopping.is_set():
            log.debug(message, *args, exc_info=True)
        else:
            log.exception(message, *args)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.wakeup = asyncio.Event()
        running: set[asyncio.Task] = set()
        renewer = asyncio.create_task(self._renew_leases())
        puller = asyncio.create_task(self._pull_logs())
        try:
            while not self.stopping.is_set():
                # An engine that fires cron triggers itself (Knative's PingSources) owns them.
                if self.cron_enabled and not self.engine.runs_cron:
                    try:
                        await self._db(cron.fire_due)
                    except Exception:  # noqa: BLE001 - the database may be briefly unavailable
                        self._trouble("firing cron triggers failed")
                free = self.concurrency - len(running)
                claimed = []
                if free > 0:
                    try:
                        claimed = await self._db(queue.claim, self.worker_id, limit=free,
                                                 lease_seconds=self.lease_seconds)
                    except Exception:  # noqa: BLE001 - try again on the next round
                        self._trouble("claiming deliveries failed")
                for delivery in claimed:
                    self.held[delivery.pk] = delivery.attempts
                    task = asyncio.create_task(self._process(delivery))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if claimed and len(running) < self.concurrency:
                    continue  # there may be more due right away
                self.wakeup.clear()
                waiters = [asyncio.create_task(self.wakeup.wait())] + list(running)
                await asyncio.wait(waiters, timeout=self.poll_seconds, return_when=asyncio.FIRST_COMPLETED)
                waiters[0].cancel()
            await self._wind_down(running)
        finally:
            renewer.cancel()
            puller.cancel()
            with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
                self.db.submit(connections.close_all).result(timeout=5)
            self.db.shutdown(wait=False)
            self.loop = None

    async def _wind_down(self, running: set[asyncio.Task]) -> None:
        """Let the deliveries in flight finish within the grace, then stop the others and hand their
        leases back so another worker (or this one, restarted) takes them at once, not a lease later."""
        if running and self.stop_grace:
            await asyncio.wait(set(running), timeout=self.stop_grace)
        if not running:
            return
        abandoned = list(self.held.items())
        for task in list(running):
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if abandoned:
            try:
                released = await self._db(queue.release, self.worker_id, abandoned)
            except WorkerStopped:
                pass  # no database thread left: their leases lapse
            except Exception:  # noqa: BLE001 - their leases lapse instead
                log.warning("handing back %d deliveries failed; their leases lapse instead", len(abandoned),
                            exc_info=True)
            else:
                log.info("stopping: %d deliveries in flight handed back to the queue", released)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(max(self.lease_seconds / 3, 0.05))
            if self.held:
                try:
                    await self._db(queue.renew, self.worker_id, list(self.held.items()),
                                   lease_seconds=self.lease_seconds)
                except Exception:  # noqa: BLE001 - renewed on the next round, or the lease lapses
                    if not self.stopping.is_set():
                        log.warning("renewing leases failed", exc_info=True)

    async def _pull_logs(self) -> None:
        """Every ``log_pull_seconds``, bring in the function log lines of an engine that does not
        deliver them itself (Knative's pods; base.LogPulling). On a thread of its own: a pass does
        database work and blocking HTTP, and deliveries must not wait behind it."""
        pull = getattr(self.engine, "pull_logs", None)
        interval = float(getattr(self.engine, "log_pull_seconds", 0) or 0)
        if pull is None or interval <= 0:
            return
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nimbus-worker-logs")

        def one_pass():
            close_old_connections()
            try:
                return pull()
            finally:
                connections.close_all()  # this thread's only: nothing stays open between passes

        try:
            while True:
                try:
                    await asyncio.get_running_loop().run_in_executor(executor, one_pass)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the next pass tries again
                    self._trouble("pulling function logs failed")
                await asyncio.sleep(interval)
        finally:
            executor.shutdown(wait=False)

    # ---- one delivery -------------------------------------------------------------------------------

    async def _process(self, delivery: Delivery) -> None:
        try:
            await self._deliver(delivery)
            self.processed += 1
        except Exception:  # noqa: BLE001 - the lease lapses and another attempt follows
            self._trouble("delivering %s failed", delivery.pk)
            self.processed += 1
        finally:
            self.held.pop(delivery.pk, None)

    async def _policy(self, function_id: int) -> queue.Policy:
        """The function's retry policy, re-read at most every POLICY_TTL seconds."""
        cached = self.policies.get(function_id)
        if cached is not None and time.monotonic() - cached[0] < POLICY_TTL:
            return cached[1]
        policy = await self._db(queue.policy_for, function_id)
        self.policies[function_id] = (time.monotonic(), policy)
        return policy

    async def _deliver(self, delivery: Delivery) -> None:
        policy = await self._policy(delivery.function_id)
        age = (timezone.now() - delivery.created_at).total_seconds()
        if age > policy.max_event_age_seconds:
            if await self._db(queue.expire, delivery, self.worker_id, policy=policy):
                await self._after_final(delivery)
            return
        function = delivery.function
        # Delivery is at least once (a worker killed mid-call leaves its lease to expire and the item
        # runs again): the id and attempt let a handler recognise a repeat.
        headers = [tuple(h) for h in delivery.headers if str(h[0]).lower() not in DELIVERY_HEADERS]
        headers += [("X-Nimbus-Delivery-Id", str(delivery.pk)), ("X-Nimbus-Attempt", str(delivery.attempts))]
        result = await self.engine.invoke(tenant=function.tenant.slug, name=function.name, tag=delivery.tag,
                                          method=delivery.method, path=delivery.path, headers=headers,
                                          body=bytes(delivery.body), trigger=delivery.source)
        if result.invocation_id and not await self._db(self._record_stored, result.invocation_id):
            result = dataclasses.replace(result, invocation_id="")
        if result.retryable:
            error = result.error or f"the function answered {result.status}"
            state = await self._db(queue.fail, delivery, self.worker_id, error=error, policy=policy,
                                   status=result.status, headers=result.headers, body=result.body,
                                   invocation_id=result.invocation_id)
            if state == Delivery.State.DEAD:
                await self._after_final(delivery)
            return
        final = await self._db(self._succeed, delivery, result)
        if final:
            await self._after_final(delivery)

    def _record_stored(self, invocation_id: str) -> bool:
        """Store the invocation's record now, before the delivery names it: the engine's records writer
        batches records in memory, and a delivery settled while its record waited there would name a
        record that a crash (kill -9) loses. False when the record could not be stored (its function
        was deleted meanwhile, or the database failed): the delivery then names none. It is settled
        all the same, as the call went: the function ran, and a failure here must not run it again."""
        persist = getattr(getattr(self.engine, "records", None), "persist", None)
        if persist is None:
            return True  # an engine that keeps no records batch of its own
        try:
            if persist(invocation_id):
                return True
        except Exception:  # noqa: BLE001 - the record is the writer's to store later; the delivery settles
            log.warning("storing the record of invocation %s failed; its delivery will not name it", invocation_id,
                        exc_info=True)
            return False
        log.warning("the record of invocation %s could not be stored; its delivery will not name it", invocation_id)
        return False

    def _succeed(self, delivery: Delivery, result) -> bool:
        """Record success and, inside the same transaction, queue a sequence's next step. True when
        this was the last step (or no sequence)."""
        with transaction.atomic():
            if not queue.succeed(delivery, self.worker_id, status=result.status, headers=result.headers,
                                 body=result.body, invocation_id=result.invocation_id):
                return False
            if delivery.sequence_id is None:
                return True
            following = (SequenceStep.objects.filter(sequence_id=delivery.sequence_id, position=delivery.step + 1)
                         .select_related("function").first())
            if following is None:
                return True
            content_type = next((v for k, v in result.headers if k.lower() == "content-type"),
                                "application/octet-stream")
            trace = next(([k, v] for k, v in delivery.headers if k.lower() == "traceparent"), None)
            headers = [("content-type", content_type)] + ([tuple(trace)] if trace else [])
            queue.enqueue(function=following.function, source=Delivery.Source.SEQUENCE,
                                          headers=headers, body=result.body, sequence=delivery.sequence,
                                          step=following.position, run_id=delivery.run_id or delivery.pk,
                                          callback_url=delivery.callback_url)
            transaction.on_commit(self.wake)
            return False

    async def _after_final(self, delivery: Delivery) -> None:
        if not delivery.callback_url:
            return
        request = await self._db(callback_request, delivery.pk)
        if request is None:
            return
        url, payload, headers = request
        # Not on the database thread: every delivery's database work would wait behind a slow receiver.
        result = await asyncio.to_thread(outbound.post, url, body=payload, headers=headers,
                                         total_timeout=CALLBACK_TIMEOUT)
        await self._db(callback_record, delivery.pk, result)


# ---- the in-process worker -------------------------------------------------------------------------

_in_process: Worker | None = None
_in_process_lock = threading.Lock()


def in_process_worker() -> Worker | None:
    return _in_process


def start_in_process(**options) -> Worker | None:
    """Start this process's worker once (the portal's ASGI entry point calls this). Not in tests
    (NIMBUS_TESTING) or when NIMBUS_WORKER=external (separate ``nimbus_worker`` processes)."""
    global _in_process
    if os.environ.get("NIMBUS_TESTING") == "1" or os.environ.get("NIMBUS_WORKER", "inprocess") != "inprocess":
        return None
    with _in_process_lock:
        if _in_process is None:
            options.setdefault("stop_grace", IN_PROCESS_STOP_GRACE)
            _in_process = Worker(worker_id=f"portal-{socket.gethostname()}-{os.getpid()}", **options).start()
            _at_exit(stop_in_process)
    return _in_process


def stop_in_process() -> None:
    """Stop this process's worker: deliveries in flight get IN_PROCESS_STOP_GRACE, the rest go back
    to the queue. Runs as the server exits (SIGTERM, SIGINT, end of the main thread)."""
    worker = _in_process
    if worker is not None:
        worker.stop(timeout=worker.stop_grace + 3)


def _at_exit(callback) -> None:
    """Run ``callback`` as the interpreter exits, before concurrent.futures shuts its thread pools
    down: threading's exit hooks run before atexit's, newest first, so this one runs while the
    worker still has its database thread to settle and hand back what it holds. (A daemon thread
    left running meets closed pools and fails on every step until the process is gone.)"""
    register = getattr(threading, "_register_atexit", None)
    try:
        (register or atexit.register)(callback)
    except RuntimeError:  # already exiting
        atexit.register(callback)


def notify() -> None:
    """Wake this process's worker (after a delivery was stored here)."""
    worker = _in_process
    if worker is not None:
        worker.wake()
