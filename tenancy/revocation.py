"""Access changes reach every portal process at once: a revoked token, a removed or downgraded
member, a suspended tenant, a deactivated user.

Services call ``access_changed`` inside their transaction. Once it commits, the access generation
changes (in Redis with REDIS_URL, shared by every process; in this process's memory otherwise, where
there is only this process), this process drops its caches of access decisions, and the member's open
IDE sockets in the tenant are told over the channel layer to close.

A cache of access decisions (the gateway's tokens) keeps each entry with the generation it was
looked up under and uses it only while ``access_generation()`` still answers that generation. It is
read on every use, so a change committed in another process is seen by the very next request here,
and a generation that cannot be read (Redis down) means no cache: fail closed.

In Redis the generation is a random value, replaced by a new random value on each change (not a
counter): a Redis that restarts or loses the key cannot bring back a value an old cache entry holds.
The first reader to find no value sets a fresh one (SET NX), which no entry was ever kept under.

A Redis in trouble must not slow every request down: reads and writes give up after
REDIS_TIMEOUT_SECONDS and are not retried, and after a failed read this process answers "cannot be
read" (None: no cache) without asking Redis again for UNREADABLE_BACKOFF_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction

log = logging.getLogger(__name__)

# How long a request waits on Redis (to connect, then for an answer) for the shared generation before
# it looks its token up instead, and a committed change waits to replace it. Never retried.
REDIS_TIMEOUT_SECONDS = 0.5
# After Redis failed to answer, how long the generation counts as unreadable without asking again.
UNREADABLE_BACKOFF_SECONDS = 2.0

_local_drops: list[Callable[[], None]] = []
_local_generation = 0
_async_clients: dict[tuple[asyncio.AbstractEventLoop, str], object] = {}
# time.monotonic() until which the shared generation is not asked for (Redis just failed to answer).
_unreadable_until = 0.0


def member_group(tenant_id: int, user_id: int) -> str:
    """The channel-layer group of one user's open IDE sockets in one tenant."""
    return f"member-{tenant_id}-{user_id}"


def _generation_key() -> str:
    # ":v2" holds the random value. Releases before it kept a counter in "<prefix>:access-generation" and
    # read it as a number: with a key of its own, their processes do not fail on a random value while
    # both releases run (a rolling update).
    return f"{settings.NIMBUS_REDIS_PREFIX}:access-generation:v2"


def _redis_url() -> str:
    return getattr(settings, "REDIS_URL", "") or ""


def on_access_changed(drop: Callable[[], None]) -> None:
    """Register a cache of access decisions in this process: ``drop`` empties it."""
    if drop not in _local_drops:
        _local_drops.append(drop)


def drop_local_caches() -> None:
    global _local_generation
    _local_generation += 1
    for drop in list(_local_drops):
        try:
            drop()
        except Exception:  # noqa: BLE001 - one cache failing to drop must not keep the others
            log.exception("could not drop an access cache")


def _new_generation() -> str:
    return secrets.token_hex(16)


def _mark_unreadable() -> None:
    global _unreadable_until
    _unreadable_until = time.monotonic() + UNREADABLE_BACKOFF_SECONDS


def bump_access_generation() -> None:
    """Tell every process that access changed (the shared generation takes a new random value).
    Synchronous: it holds up the request that committed the change, but connecting and waiting for the
    answer each give up after REDIS_TIMEOUT_SECONDS, without a retry."""
    url = _redis_url()
    if not url:
        return  # one process: its own generation went up in drop_local_caches
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                                  socket_connect_timeout=REDIS_TIMEOUT_SECONDS, retry=Retry(NoBackoff(), 0))
    try:
        client.set(_generation_key(), _new_generation())
    except Exception:
        # Tried even during a back-off (it is the only way to tell the other processes), but a failure
        # starts one: this process's own caches are not to be trusted either.
        _mark_unreadable()
        raise
    finally:
        client.close()


def _async_client(url: str):
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    loop = asyncio.get_running_loop()
    client = _async_clients.get((loop, url))
    if client is None:
        for old in [key for key in _async_clients if key[0].is_closed()]:
            del _async_clients[old]  # clients of loops that ended (tests run many)
        client = _async_clients[(loop, url)] = aioredis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0))
    return client


async def access_generation() -> str | None:
    """The access generation every process shares now, or None if it cannot be read (then nothing
    may be cached). Called by the gateway on each request that would use its cache."""
    url = _redis_url()
    if not url:
        return str(_local_generation)
    if time.monotonic() < _unreadable_until:
        return None  # Redis failed to answer a moment ago: no cache, and no wait on it either
    client = _async_client(url)
    key = _generation_key()
    try:
        value = await client.get(key)
        if value is None:
            # Never set, or lost (Redis restarted, the key was evicted): a fresh random value, so no entry
            # kept before can match again. Whoever sets it first wins; the others read theirs.
            fresh = _new_generation()
            value = fresh.encode() if await client.set(key, fresh, nx=True) else await client.get(key)
    except Exception:  # noqa: BLE001 - fail closed: the caller looks the token up
        _mark_unreadable()
        log.warning("could not read the access generation; access is looked up on every call for the next %s s",
                    UNREADABLE_BACKOFF_SECONDS, exc_info=True)
        return None
    if value is None:
        return None  # deleted again between the two reads: no cache this once
    return value.decode() if isinstance(value, bytes) else str(value)


def access_changed(*, reason: str, tenant_id: int | None = None, user_ids: Iterable[int] = (),
                   close_sockets: bool = False, tenant_ids: Iterable[int] = ()) -> None:
    """Call inside the transaction that changes access. On commit: replace the access generation,
    drop this process's caches and (``close_sockets``) close the IDE sockets of ``user_ids`` in
    ``tenant_id`` (or in each of ``tenant_ids``: one change that reaches several tenants, announced once)."""
    users = sorted(set(user_ids)) if close_sockets else []
    tenants = sorted({*tenant_ids, *([tenant_id] if tenant_id is not None else [])})

    def announce():
        drop_local_caches()
        try:
            bump_access_generation()
        except Exception:  # noqa: BLE001 - committed already; say so loudly
            log.exception("could not replace the access generation (%s): other processes' caches keep "
                          "serving until their entries expire", reason)
        if users and tenants:
            _close_sockets(reason, tenants, users)

    transaction.on_commit(announce)


def _close_sockets(reason: str, tenant_ids: list[int], users: list[int]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return

    async def send():
        # Each send on its own: one that fails (a layer hiccup) must not keep the others from going out.
        failed = None
        for tenant_id in tenant_ids:
            for user_id in users:
                try:
                    await layer.group_send(member_group(tenant_id, user_id),
                                           {"type": "access.revoked", "reason": reason})
                except Exception as exc:  # noqa: BLE001 - raised below, once the others went out
                    failed = exc
        if failed is not None:
            raise failed

    try:
        async_to_sync(send)()
    except Exception:  # noqa: BLE001 - the change is committed; each socket re-checks access on every action
        log.exception("could not tell open IDE sockets to close (%s)", reason)
