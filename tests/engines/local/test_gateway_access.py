"""Who may run a token-auth function through the gateway, decided by the caller's current role and
shares, and access changes that reach the gateway's token cache at once (not after it expires), in
this process and in another one (a live portal server on PostgreSQL and Redis)."""

import pytest
from django.utils import timezone

import functions.engines.local.gateway as gateway_module
from functions import test_invoke
from functions.services import function_share
from tenancy import revocation
from tests.observability.test_prometheus_scrape import free_port, wait_for_port
from tenancy.models import ApiToken, Membership
from tenancy.services import (
    tenant_member_change_role,
    tenant_member_remove,
    tenant_suspend,
    token_create,
    token_revoke,
    user_deactivate,
)

pytestmark = pytest.mark.django_db(transaction=True)

CODE = {"handler.py": "def handle(event, context):\n    return {'ok': True}\n"}


def bearer(plaintext):
    return {"Authorization": f"Bearer {plaintext}"}


def membership(members, role):
    return Membership.objects.get(user=members[role], tenant__slug="acme")


@pytest.fixture
def private(engine, deploy):
    function, _ = deploy("private", CODE, invoke_auth="token")
    return function


def invoke_token(user, tenant, scopes=("invoke",)):
    return token_create(acting_user=user, tenant=tenant, name="t", scopes=list(scopes))[1]


def warm(gateway, plaintext, path="/fn/acme/private/"):
    """Call once (the token's access is looked up and cached) and once more from the cache."""
    response = gateway.get(path, headers=bearer(plaintext))
    assert response.status == 200, response
    assert gateway_module._token_cache, "the token's access is cached while the generation can be read"
    assert gateway.get(path, headers=bearer(plaintext)).status == 200


# ---- invoke is role-checked -------------------------------------------------------------------------

def test_a_viewers_invoke_token_cannot_run_a_token_auth_function(private, gateway, members, tenant):
    viewer = invoke_token(members["viewer"], tenant)
    response = gateway.get("/fn/acme/private/", headers=bearer(viewer))
    assert response.status == 403
    assert response.json()["code"] == "permission_denied" and "viewers read only" in response.json()["detail"]
    # Nor asynchronously: the same check runs before the call is queued.
    queued = gateway.get("/fn/acme/private/", headers={**bearer(viewer), "Prefer": "respond-async"})
    assert queued.status == 403
    assert gateway.get("/fn/acme/private/", headers=bearer(invoke_token(members["developer"], tenant))).status == 200


def test_a_function_shared_with_a_viewer_to_edit_runs_to_view_does_not(private, gateway, members, tenant, deploy):
    other, _ = deploy("other", CODE, invoke_auth="token")
    viewer = invoke_token(members["viewer"], tenant)
    function_share(acting_user=members["admin"], function=private, username="acme-viewer", level="view")
    assert gateway.get("/fn/acme/private/", headers=bearer(viewer)).status == 403
    function_share(acting_user=members["admin"], function=private, username="acme-viewer", level="edit")
    assert gateway.get("/fn/acme/private/", headers=bearer(viewer)).status == 200
    assert gateway.get("/fn/acme/other/", headers=bearer(viewer)).status == 403  # only the shared one


def test_unsharing_stops_a_viewers_token_on_the_very_next_call(private, gateway, members, tenant):
    from functions.services import function_unshare

    function_share(acting_user=members["admin"], function=private, username="acme-viewer", level="edit")
    viewer = invoke_token(members["viewer"], tenant)
    warm(gateway, viewer)
    function_unshare(acting_user=members["admin"], function=private, username="acme-viewer")
    assert gateway.get("/fn/acme/private/", headers=bearer(viewer)).status == 403


def test_a_viewers_ide_signature_runs_a_function_only_when_shared_to_edit(private, gateway, members):
    signature = test_invoke.test_signature(user_id=members["viewer"].pk, function_id=private.pk)
    assert gateway.get("/fn/acme/private/", headers={"X-Nimbus-Test-Signature": signature}).status == 401
    function_share(acting_user=members["admin"], function=private, username="acme-viewer", level="deploy")
    assert gateway.get("/fn/acme/private/", headers={"X-Nimbus-Test-Signature": signature}).status == 200


def test_a_removed_members_ide_signature_is_refused_on_the_next_call(private, gateway, members):
    signature = test_invoke.test_signature(user_id=members["developer"].pk, function_id=private.pk)
    assert gateway.get("/fn/acme/private/", headers={"X-Nimbus-Test-Signature": signature}).status == 200
    tenant_member_remove(acting_user=members["owner"], membership=membership(members, "developer"))
    assert gateway.get("/fn/acme/private/", headers={"X-Nimbus-Test-Signature": signature}).status == 401


# ---- access changes reach the cache at once -----------------------------------------------------------

def test_a_revoked_token_is_refused_on_the_very_next_call(private, gateway, members, tenant):
    plaintext = invoke_token(members["developer"], tenant)
    warm(gateway, plaintext)
    token = ApiToken.objects.get(prefix=plaintext.split("_")[1])
    token_revoke(acting_user=members["developer"], token=token)
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 401


def test_a_token_that_expires_is_refused_on_the_first_call_after_its_expiry(private, gateway, members, tenant):
    import time
    from datetime import timedelta

    gateway.get("/fn/acme/private/", headers=bearer(invoke_token(members["developer"], tenant)))  # warm instance
    expires_at = timezone.now() + timedelta(seconds=4)
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="short", scopes=["invoke"],
                                expires_at=expires_at)
    warm(gateway, plaintext)  # cached now, under a generation nothing will raise
    time.sleep(max(0.0, (expires_at - timezone.now()).total_seconds()) + 0.1)
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 401


def test_a_downgraded_members_token_is_refused_on_the_very_next_call(private, gateway, members, tenant):
    plaintext = invoke_token(members["developer"], tenant)
    warm(gateway, plaintext)
    tenant_member_change_role(acting_user=members["owner"], membership=membership(members, "developer"),
                              role="viewer")
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 403


def test_a_removed_members_token_is_refused_on_the_very_next_call(private, gateway, members, tenant):
    plaintext = invoke_token(members["developer"], tenant)
    warm(gateway, plaintext)
    tenant_member_remove(acting_user=members["owner"], membership=membership(members, "developer"))
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 401


def test_a_deactivated_users_token_is_refused_on_the_very_next_call(private, gateway, members, tenant, operator):
    plaintext = invoke_token(members["developer"], tenant)
    warm(gateway, plaintext)
    user_deactivate(acting_user=operator, user=members["developer"])
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 401


def test_a_suspended_tenants_function_stops_answering_on_the_very_next_call(private, gateway, members, tenant,
                                                                            operator):
    plaintext = invoke_token(members["developer"], tenant)
    warm(gateway, plaintext)
    tenant_suspend(acting_user=operator, tenant=tenant, reason="unpaid")
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 404


def test_a_change_committed_in_another_process_is_seen_on_the_very_next_call(private, gateway, members, tenant):
    """Another portal process revokes: this one is told nothing directly (its cache still holds the
    token), only the shared generation goes up; its very next call looks the token up again."""
    plaintext = invoke_token(members["developer"], tenant)
    warm(gateway, plaintext)
    ApiToken.objects.filter(prefix=plaintext.split("_")[1]).update(revoked_at=timezone.now())
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 200  # cached, unannounced
    if settings_have_redis():
        revocation.bump_access_generation()  # what the other process's commit does
    else:
        revocation._local_generation += 1  # one process: its own counter is the shared one
    assert gateway_module._token_cache  # not dropped here: the generation alone decides
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 401


def settings_have_redis():
    from django.conf import settings

    return bool(settings.REDIS_URL)


def test_without_a_readable_generation_nothing_is_cached(private, gateway, members, tenant, settings):
    """Fail closed: when the shared generation cannot be read (Redis down), every call looks the
    token up, so even a revocation nobody announced is refused at once."""
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    gateway_module._drop_access_caches()
    plaintext = invoke_token(members["developer"], tenant)
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 200
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 200
    assert not gateway_module._token_cache
    ApiToken.objects.filter(prefix=plaintext.split("_")[1]).update(revoked_at=timezone.now())
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 401


# ---- across processes: a live portal server on PostgreSQL and Redis ----------------------------------

def _get(port, path, plaintext):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=bearer(plaintext))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def portal_server(settings, shared_tmp):
    """A real portal (daphne) in another process, on this test's PostgreSQL database and Redis."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from django.db import connection

    if connection.vendor != "postgresql" or not os.environ.get("REDIS_URL"):
        pytest.skip("two processes share a revocation over Redis and a database over PostgreSQL")
    db = connection.settings_dict
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "NIMBUS_WORKER": "external",
           "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
           "NIMBUS_DATA_DIR": str(settings.NIMBUS_DATA_DIR), "NIMBUS_SOCKET_DIR": str(shared_tmp / "s"),
           "NIMBUS_LOCAL_IDLE_SECONDS": "60"}
    port = free_port()
    root = Path(__file__).resolve().parents[3]
    server = subprocess.Popen([str(Path(sys.executable).parent / "daphne"), "-b", "127.0.0.1", "-p", str(port),
                               "portal.asgi:application"], env=env, cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, server, time.monotonic() + 60)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow
def test_access_changes_reach_another_portal_process_on_its_very_next_call(private, members, tenant, portal_server):
    port = portal_server
    first = invoke_token(members["developer"], tenant)
    for _ in range(2):
        assert _get(port, "/fn/acme/private/", first) == 200
    # Revoked behind the server's back (no broadcast): it still answers from its cache. This is the
    # cache the broadcasts below must reach.
    ApiToken.objects.filter(prefix=first.split("_")[1]).update(revoked_at=timezone.now())
    assert _get(port, "/fn/acme/private/", first) == 200

    second = invoke_token(members["developer"], tenant)
    for _ in range(2):
        assert _get(port, "/fn/acme/private/", second) == 200
    token_revoke(acting_user=members["developer"], token=ApiToken.objects.get(prefix=second.split("_")[1]))
    assert _get(port, "/fn/acme/private/", second) == 401
    assert _get(port, "/fn/acme/private/", first) == 401  # the whole cache went

    third = invoke_token(members["developer"], tenant)
    for _ in range(2):
        assert _get(port, "/fn/acme/private/", third) == 200
    tenant_member_change_role(acting_user=members["owner"], membership=membership(members, "developer"),
                              role="viewer")
    assert _get(port, "/fn/acme/private/", third) == 403


# ---- a Redis in trouble, a Redis that lost the generation, an account turned off anywhere -------------

@pytest.fixture(autouse=True)
def _generation_readable(monkeypatch):
    """A test that made Redis fail starts a back-off (no cache for a while): not into the next test."""
    monkeypatch.setattr(revocation, "_unreadable_until", 0.0)


def test_a_silent_redis_costs_one_wait_not_one_per_call(private, gateway, members, tenant, settings, monkeypatch):
    from tests.tenancy.test_revocation_redis import Silent

    silent = Silent()
    try:
        settings.REDIS_URL = silent.url()
        monkeypatch.setattr(revocation, "UNREADABLE_BACKOFF_SECONDS", 600.0)
        plaintext = invoke_token(members["developer"], tenant)
        for _ in range(4):
            assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 200
        assert len(silent.accepted) == 1  # the first call asked; the others, in the back-off, did not
        assert not gateway_module._token_cache  # fail closed all the same: looked up each time
        ApiToken.objects.filter(prefix=plaintext.split("_")[1]).update(revoked_at=timezone.now())
        assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 401
    finally:
        silent.close()


def test_a_generation_redis_lost_never_matches_an_old_entry_again(private, gateway, members, tenant, settings):
    """Redis restarts without the generation (or evicts it): an entry cached before must not match
    whatever the generation reads as afterwards, even though the change made meanwhile reached this
    process only through that generation."""
    if not settings_have_redis():
        pytest.skip("the shared generation lives in Redis")
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    key = revocation._generation_key()
    try:
        client.delete(key)  # a fresh Redis
        plaintext = invoke_token(members["developer"], tenant)
        warm(gateway, plaintext)
        # Another process revokes and announces it ...
        ApiToken.objects.filter(prefix=plaintext.split("_")[1]).update(revoked_at=timezone.now())
        revocation.bump_access_generation()
        client.delete(key)  # ... and Redis restarts before this process reads the generation again.
        assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 401
    finally:
        client.close()


def test_a_user_turned_off_by_a_save_is_refused_on_the_very_next_call(private, gateway, members, tenant):
    """Not through user_deactivate: Django's admin (or a script) saves the user inactive."""
    plaintext = invoke_token(members["developer"], tenant)
    warm(gateway, plaintext)
    user = members["developer"]
    user.is_active = False
    user.save()
    assert gateway.get("/fn/acme/private/", headers=bearer(plaintext)).status == 401
