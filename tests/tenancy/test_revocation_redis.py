"""tenancy/revocation.py with a Redis in trouble, lost or shared: a Redis that does not answer costs one
short wait, not one per request (a back-off during which the generation counts as unreadable: no
cache); a change waits on it briefly and once, never retried; the generation is a random value a
restarted Redis cannot bring back; its key starts with settings.NIMBUS_REDIS_PREFIX."""

import asyncio
import os
import socket
import threading

import pytest
import redis
from django.conf import settings as django_settings

from tenancy import revocation


class Silent:
    """A TCP server that accepts connections and never answers: a Redis that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self):
        self.closed = True
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent(settings, monkeypatch):
    server = Silent()
    settings.REDIS_URL = server.url()
    monkeypatch.setattr(revocation, "_unreadable_until", 0.0)  # and put back afterwards
    monkeypatch.setattr(revocation, "UNREADABLE_BACKOFF_SECONDS", 600.0)  # the test never waits for it to end
    yield server
    server.close()


def read():
    return asyncio.run(revocation.access_generation())


def test_a_silent_redis_is_asked_once_then_left_alone_for_the_back_off(silent):
    assert read() is None
    assert len(silent.accepted) == 1
    for _ in range(5):
        assert read() is None  # no cache, and no wait
    assert len(silent.accepted) == 1
    # The back-off over, Redis is asked again.
    revocation._unreadable_until = 0.0
    assert read() is None
    assert len(silent.accepted) == 2


def test_a_change_waits_on_a_silent_redis_once_with_short_timeouts(silent, monkeypatch):
    made = []
    from_url = redis.Redis.from_url

    def recording(url, **kwargs):
        made.append(kwargs)
        return from_url(url, **kwargs)

    monkeypatch.setattr(redis.Redis, "from_url", staticmethod(recording))
    with pytest.raises(redis.RedisError):
        revocation.bump_access_generation()
    assert len(silent.accepted) == 1  # not retried
    (kwargs,) = made
    assert kwargs["socket_timeout"] <= 1 and kwargs["socket_connect_timeout"] <= 1
    # A failed change starts the back-off too: this process caches nothing for a while.
    assert read() is None and len(silent.accepted) == 1


def test_the_generation_key_starts_with_the_configured_prefix(settings):
    from portal import settings as portal_settings

    assert portal_settings.NIMBUS_REDIS_PREFIX == os.environ.get("NIMBUS_REDIS_PREFIX", "nimbus")
    assert revocation._generation_key().startswith(f"{django_settings.NIMBUS_REDIS_PREFIX}:access-generation")
    if settings.REDIS_URL:
        assert settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] == settings.NIMBUS_REDIS_PREFIX
    settings.NIMBUS_REDIS_PREFIX = "other-install"
    assert revocation._generation_key().startswith("other-install:")


@pytest.fixture
def real_redis(settings, monkeypatch):
    if not settings.REDIS_URL:
        pytest.skip("the shared generation lives in Redis")
    monkeypatch.setattr(revocation, "_unreadable_until", 0.0)
    # A busy CI machine may stall longer than the production timeout: these tests are about values.
    monkeypatch.setattr(revocation, "REDIS_TIMEOUT_SECONDS", 5.0)
    settings.NIMBUS_REDIS_PREFIX = f"test-{os.getpid()}-{id(settings)}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.delete(revocation._generation_key())
    client.close()


def test_a_lost_generation_comes_back_as_a_value_never_seen(real_redis):
    key = revocation._generation_key()
    real_redis.delete(key)
    seen = {read()}
    assert None not in seen
    for _ in range(3):
        revocation.bump_access_generation()
        seen.add(read())
        real_redis.delete(key)  # Redis restarted without it
        seen.add(read())
    assert len(seen) == 7  # every change and every loss: a value no cache entry can hold
    assert read() == read()  # and stable while nothing changes
