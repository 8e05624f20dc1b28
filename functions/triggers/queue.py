"""The durable delivery queue: enqueue, claim with a lease, settle (success, retry with backoff,
dead letter), replay and discard.

A claim is a conditional UPDATE that moves ``attempts`` on by one: two workers that see the same
row cannot both win it (SQLite serialises writers; on PostgreSQL the candidates are also read
``FOR UPDATE SKIP LOCKED`` so workers do not even contend). Settling checks the same attempt
number, so a worker whose lease expired and was taken over cannot overwrite the newer attempt.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from functions.models import Delivery, Function, RetryPolicy

DEFAULT_LEASE_SECONDS = 60.0
_jitter = random.Random()


@dataclass(frozen=True)
class Policy:
    max_attempts: int = 3
    backoff_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    max_event_age_seconds: int = 86400

    def delay(self, attempt: int, rng=_jitter) -> float:
        """Exponential backoff with jitter: between half and all of base·2^(attempt-1), capped."""
        ceiling = min(self.backoff_max_seconds, self.backoff_seconds * (2 ** max(attempt - 1, 0)))
        return ceiling * rng.uniform(0.5, 1.0)


def policy_for(function_id: int) -> Policy:
    row = RetryPolicy.objects.filter(function_id=function_id).values(
        "max_attempts", "backoff_seconds", "backoff_max_seconds", "max_event_age_seconds").first()
    return Policy(**row) if row else Policy()


def enqueue(*, function: Function | int, source: str, method: str = "POST", path: str = "/",
            headers: list | None = None, body: bytes = b"", tag: str = "", callback_url: str = "",
            trigger=None, sequence=None, step: int = 0, run_id: uuid.UUID | None = None,
            available_at: datetime | None = None) -> Delivery:
    """Store one delivery. Call inside the caller's transaction when it must commit with it."""
    function_id = function if isinstance(function, int) else function.pk
    now = timezone.now()
    delivery = Delivery(function_id=function_id, source=source, method=method.upper(), path=path or "/",
                        headers=[[str(k), str(v)] for k, v in (headers or [])], body=bytes(body), tag=tag,
                        callback_url=callback_url, trigger=trigger, sequence=sequence, step=step, run_id=run_id,
                        available_at=available_at or now, created_at=now)
    delivery.save(force_insert=True)
    return delivery


def _due(now: datetime) -> Q:
    return Q(state=Delivery.State.PENDING, available_at__lte=now) | Q(state=Delivery.State.RUNNING,
                                                                      lease_until__lt=now)


def claim(worker_id: str, *, limit: int = 10, lease_seconds: float = DEFAULT_LEASE_SECONDS,
          now: datetime | None = None) -> list[Delivery]:
    """Take up to ``limit`` due deliveries (pending, or running under an expired lease) for this worker."""
    now = now or timezone.now()
    lease_until = now + timedelta(seconds=lease_seconds)
    claimed: list[uuid.UUID] = []
    with transaction.atomic():
        candidates = Delivery.objects.filter(_due(now)).order_by("available_at")
        if connection.features.has_select_for_update_skip_locked:
            candidates = candidates.select_for_update(skip_locked=True)
        rows = list(candidates.values_list("id", "attempts")[:limit])
        for delivery_id, attempts in rows:
            won = Delivery.objects.filter(_due(now), pk=delivery_id, attempts=attempts).update(
                state=Delivery.State.RUNNING, attempts=F("attempts") + 1, leased_by=worker_id[:64],
                lease_until=lease_until)
            if won:
                claimed.append(delivery_id)
    if not claimed:
        return []
    found = {d.pk: d for d in Delivery.objects.filter(pk__in=claimed).select_related("function__tenant")}
    return [found[pk] for pk in claimed if pk in found]


def renew(worker_id: str, held: list[tuple[uuid.UUID, int]], *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> int:
    """Extend the leases this worker still holds (for handlers that run longer than one lease)."""
    until = timezone.now() + timedelta(seconds=lease_seconds)
    renewed = 0
    for delivery_id, attempt in held:
        renewed += Delivery.objects.filter(pk=delivery_id, attempts=attempt, leased_by=worker_id,
                                           state=Delivery.State.RUNNING).update(lease_until=until)
    return renewed


def release(worker_id: str, held: list[tuple[uuid.UUID, int]]) -> int:
    """Hand back deliveries this worker claimed but stops before settling: due again at once for any
    worker, with the attempt they used counted (the handler may have run)."""
    now = timezone.now()
    released = 0
    for delivery_id, attempt in held:
        released += Delivery.objects.filter(pk=delivery_id, attempts=attempt, leased_by=worker_id,
                                            state=Delivery.State.RUNNING).update(lease_until=now)
    return released


def _owned(delivery: Delivery, worker_id: str):
    return Delivery.objects.filter(pk=delivery.pk, attempts=delivery.attempts, leased_by=worker_id,
                                   state=Delivery.State.RUNNING)


def succeed(delivery: Delivery, worker_id: str, *, status: int, headers: list, body: bytes,
            invocation_id: str) -> bool:
    """Record the result; False when the lease was lost (another attempt owns the row now)."""
    return bool(_owned(delivery, worker_id).update(
        state=Delivery.State.SUCCEEDED, finished_at=timezone.now(), result_status=status,
        result_headers=[[k, v] for k, v in headers], result_body=bytes(body), invocation_id=invocation_id or None,
        last_error="", lease_until=None))


def fail(delivery: Delivery, worker_id: str, *, error: str, policy: Policy, status: int | None = None,
         headers: list | None = None, body: bytes | None = None, invocation_id: str = "",
         now: datetime | None = None) -> str | None:
    """Schedule the next attempt after a backoff, or make it a dead letter when attempts or the
    event's age run out. Returns the new state, or None when the lease was lost."""
    now = now or timezone.now()
    age = (now - delivery.created_at).total_seconds()
    retry_at = now + timedelta(seconds=policy.delay(delivery.attempts))
    too_old = (retry_at - delivery.created_at).total_seconds() > policy.max_event_age_seconds
    result = {"result_status": status, "result_headers": [[k, v] for k, v in (headers or [])],
              "result_body": bytes(body) if body is not None else None,
              "invocation_id": invocation_id or None, "last_error": error[:4000], "lease_until": None}
    if delivery.attempts >= policy.max_attempts or too_old or age > policy.max_event_age_seconds:
        if too_old and delivery.attempts < policy.max_attempts:
            result["last_error"] = (f"{error} (gave up: the event would be older than "
                                    f"{policy.max_event_age_seconds} s at the next attempt)")[:4000]
        state = Delivery.State.DEAD
        updated = _owned(delivery, worker_id).update(state=state, finished_at=now, **result)
    else:
        state = Delivery.State.PENDING
        updated = _owned(delivery, worker_id).update(state=state, available_at=retry_at, leased_by="", **result)
    return state if updated else None


def expire(delivery: Delivery, worker_id: str, *, policy: Policy, now: datetime | None = None) -> bool:
    """Dead-letter a delivery that is already older than the policy's max event age."""
    now = now or timezone.now()
    return bool(_owned(delivery, worker_id).update(
        state=Delivery.State.DEAD, finished_at=now, lease_until=None,
        last_error=f"expired: older than {policy.max_event_age_seconds} s before it could be delivered"))


def replay(delivery: Delivery) -> bool:
    """Put a dead letter back on the queue as if it had just arrived (attempts and age reset)."""
    now = timezone.now()
    return bool(Delivery.objects.filter(pk=delivery.pk, state=Delivery.State.DEAD).update(
        state=Delivery.State.PENDING, attempts=0, available_at=now, created_at=now, finished_at=None,
        leased_by="", lease_until=None, callback_status=""))


def discard(delivery: Delivery) -> bool:
    return bool(Delivery.objects.filter(pk=delivery.pk, state=Delivery.State.DEAD).update(
        state=Delivery.State.DISCARDED))
