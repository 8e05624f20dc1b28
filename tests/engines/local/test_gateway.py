"""The gateway: routing, traffic split and tags, status codes, invoke auth, invocation records and
logs, deploy failures that keep the previous revision serving, and serving after a restart."""

import collections
import json
import random

import pytest

from functions.engines import set_engine
from functions.engines.base import DeployEvent
from functions.engines.local.engine import LocalEngine
from functions.engines.local.routes import Route, Target
from functions.models import Invocation, InvocationLog, Revision
from functions.services import (
    function_source_replace,
    function_take_offline,
    function_traffic_set,
    function_update,
)
from tenancy.services import token_create

pytestmark = pytest.mark.django_db(transaction=True)


def version_files(version):
    return {"handler.py": f"def handle(event, context):\n    return {{'version': {version}}}\n"}


def redeploy(deploy, function, members, files, **kwargs):
    function_source_replace(acting_user=members["developer"], function=function, files=files,
                            base_version=function.source_version)
    return deploy(function.name, files, **kwargs)


def test_unknown_function_tenant_and_path_are_404(engine, deploy, gateway):
    deploy("hello", version_files(1))
    assert gateway.get("/fn/acme/nope/").status == 404
    assert gateway.get("/fn/globex/hello/").status == 404
    assert gateway.get("/fn/acme").status == 404
    assert gateway.get("/fn/acme/hello@nosuchtag/").status == 404
    assert gateway.get("/fn/acme/hello/anything/below").status == 200


def test_offline_function_is_404(engine, deploy, gateway, members):
    function, _ = deploy("hello", version_files(1))
    assert gateway.get("/fn/acme/hello/").status == 200
    function_take_offline(acting_user=members["developer"], function=function)
    response = gateway.get("/fn/acme/hello/")
    assert response.status == 404
    assert response.json()["code"] == "not_found"


def test_body_over_the_limit_is_413(make_engine, deploy, gateway):
    make_engine(max_body_bytes=1024)
    deploy("echo", {"handler.py": "def handle(event, context):\n    return event.body\n"})
    ok = gateway.post("/fn/acme/echo/", b"x" * 1000)
    assert ok.status == 200 and ok.body == b"x" * 1000
    too_big = gateway.post("/fn/acme/echo/", b"x" * 2048)
    assert too_big.status == 413
    assert too_big.json()["code"] == "too_large"


def test_token_auth(engine, deploy, gateway, members, tenant, outsider):
    from tenancy.models import Tenant

    deploy("private", version_files(1), invoke_auth="token")
    _, invoke = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["invoke"])
    _, read_only = token_create(acting_user=members["developer"], tenant=tenant, name="ro", scopes=["read"])
    globex = Tenant.objects.get(slug="globex")
    _, foreign = token_create(acting_user=outsider, tenant=globex, name="x", scopes=["invoke"])

    assert gateway.get("/fn/acme/private/").status == 401
    assert gateway.get("/fn/acme/private/", headers={"Authorization": "Bearer nimbus_bad_token"}).status == 401
    assert gateway.get("/fn/acme/private/", headers={"Authorization": f"Bearer {read_only}"}).status == 403
    assert gateway.get("/fn/acme/private/", headers={"Authorization": f"Bearer {foreign}"}).status == 404
    ok = gateway.get("/fn/acme/private/", headers={"Authorization": f"Bearer {invoke}"})
    assert ok.status == 200
    assert ok.json() == {"version": 1}


def test_token_is_not_passed_to_the_function(engine, deploy, gateway, members, tenant):
    code = "def handle(event, context):\n    return {'auth': event.headers.get('authorization')}\n"
    deploy("private", {"handler.py": code}, invoke_auth="token")
    _, invoke = token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["invoke"])
    response = gateway.get("/fn/acme/private/", headers={"Authorization": f"Bearer {invoke}"})
    assert response.json() == {"auth": None}


def test_the_instances_own_report_is_not_passed_on(engine, deploy, gateway):
    # The shim reports its cold start and handler time for the Knative engine; the local gateway
    # knows them from the pool and says so once, in its own words.
    from functions.engines.local.gateway import gateway_app

    deploy("hello", version_files(1))

    def raw_headers():
        started = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                started.append(message)

        scope = {"type": "http", "method": "GET", "path": "/fn/acme/hello/", "raw_path": b"/fn/acme/hello/",
                 "query_string": b"", "headers": [], "client": ("127.0.0.1", 50000)}
        gateway.loop.run_until_complete(gateway_app(scope, receive, send))
        assert started[0]["status"] == 200
        return [(k.decode(), v.decode()) for k, v in started[0]["headers"]]

    cold, warm = raw_headers(), raw_headers()
    assert [v for k, v in cold if k == "x-nimbus-cold-start"] == ["yes"]
    assert [v for k, v in warm if k == "x-nimbus-cold-start"] == ["no"]
    for headers in (cold, warm):
        assert not {"x-nimbus-init-ms", "x-nimbus-handler-ms"} & {k for k, _ in headers}
    queued = gateway.loop.run_until_complete(engine.invoke(tenant="acme", name="hello", method="GET"))
    assert queued.status == 200
    reported = {"x-nimbus-cold-start", "x-nimbus-init-ms", "x-nimbus-handler-ms"}
    assert not reported & {k.lower() for k, _ in queued.headers}


def test_ide_test_signature_opens_only_its_own_function(engine, deploy, gateway, members):
    from functions.test_invoke import test_signature

    code = "def handle(event, context):\n    return {'sig': event.headers.get('x-nimbus-test-signature')}\n"
    private, _ = deploy("private", {"handler.py": code}, invoke_auth="token")
    other, _ = deploy("other", {"handler.py": code}, invoke_auth="token")
    signature = test_signature(user_id=members["developer"].pk, function_id=private.pk)
    ok = gateway.get("/fn/acme/private/", headers={"X-Nimbus-Test-Signature": signature})
    assert ok.status == 200 and ok.json() == {"sig": None}  # the signature is not forwarded
    assert gateway.get("/fn/acme/other/", headers={"X-Nimbus-Test-Signature": signature}).status == 401
    assert gateway.get("/fn/acme/private/", headers={"X-Nimbus-Test-Signature": signature + "x"}).status == 401


def test_traffic_split_and_tags(engine, deploy, gateway, members):
    function, first = deploy("split", version_files(1))
    function, second = redeploy(deploy, function, members, version_files(2), promote=False)
    function_traffic_set(acting_user=members["developer"], function=function, targets=[
        {"revision": 1, "percent": 70}, {"revision": 2, "percent": 30, "tag": "canary"}])
    counts = collections.Counter(gateway.get("/fn/acme/split/").json()["version"] for _ in range(300))
    assert set(counts) == {1, 2}
    assert 0.58 <= counts[1] / 300 <= 0.82  # 70 % ± a wide margin (binomial sd ≈ 2.6 %)
    tagged = {gateway.get("/fn/acme/split@canary/").json()["version"] for _ in range(20)}
    assert tagged == {2}
    response = gateway.get("/fn/acme/split@canary/")
    assert response.headers["x-nimbus-revision"] == "2"


def test_route_pick_is_weighted():
    route = Route(function_id=1, tenant="t", tenant_id=1, name="f", invoke_auth="public", offline=False,
                  memory_mb=128, targets=[Target(1, 11, 90, ""), Target(2, 12, 10, "b"), Target(3, 13, 0, "c")])
    rng = random.Random(7)
    counts = collections.Counter(route.pick(rng=rng).revision for _ in range(10000))
    assert counts[3] == 0
    assert 0.88 <= counts[1] / 10000 <= 0.92
    assert route.pick("c").revision == 3
    assert route.pick("zzz") is None


def test_invocation_records_and_logs(engine, deploy, gateway):
    code = ("import logging\n"
            "def handle(event, context):\n"
            "    print('printed', event.path)\n"
            "    context.logger.warning('careful %s', 42)\n"
            "    with context.span('work', size=3):\n"
            "        pass\n"
            "    if event.path == '/fail':\n"
            "        raise ValueError('no good')\n"
            "    return 'fine'\n")
    function, revision = deploy("logged", {"handler.py": code})
    # An anonymous caller's traceparent starts a trace of the function's own, linked to the caller's
    # (tests/observability/test_trace_links.py).
    ok = gateway.get("/fn/acme/logged/hello", headers={
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert ok.status == 200
    spans = json.loads(ok.headers["x-nimbus-spans"])
    assert spans[0]["name"] == "work" and spans[0]["attributes"] == {"size": 3}
    assert ok.headers["traceparent"].split("-")[1] != "0af7651916cd43dd8448eb211c80319c"
    failed = gateway.get("/fn/acme/logged/fail")
    assert failed.status == 500
    assert "no good" not in failed.text and "Traceback" not in failed.text  # not in debug mode
    from tests.engines.local.conftest import wait_for

    def written():
        # Wait for the failed call's traceback too: its line can reach the writer after the others.
        engine.records.flush()
        logs = InvocationLog.objects.filter(invocation__function=function)
        return logs.count() >= 5 and logs.filter(invocation_id=failed.headers["x-nimbus-invocation-id"],
                                                  level="ERROR", message__contains="Traceback").exists()

    assert wait_for(written)
    good = Invocation.objects.get(pk=ok.headers["x-nimbus-invocation-id"])
    assert good.status == "success" and good.http_status == 200
    assert good.cold_start is True and good.init_ms > 0
    assert good.revision_id == revision.pk
    assert good.trace_id == ok.headers["traceparent"].split("-")[1]  # its own trace
    assert good.billed_gb_seconds > 0
    assert good.instance
    messages = list(good.logs.values_list("level", "message"))
    assert ("INFO", "printed /hello") in messages
    assert ("WARNING", "careful 42") in messages
    bad = Invocation.objects.get(pk=failed.headers["x-nimbus-invocation-id"])
    assert bad.status == "error" and bad.cold_start is False
    error_lines = [m for level, m in bad.logs.values_list("level", "message") if level == "ERROR"]
    assert any("ValueError: no good" in m and "Traceback" in m for m in error_lines)
    lines = list(engine.logs(_ref(function)))
    assert any(line.message == "printed /hello" and line.invocation_id == str(good.pk) for line in lines)
    # A portal restarted since: the lines come from the stored records.
    restarted = LocalEngine()
    try:
        stored = list(restarted.logs(_ref(function), revision=revision.number))
    finally:
        restarted.shutdown()
    assert any(line.message == "printed /hello" and line.invocation_id == str(good.pk) for line in stored)
    assert [line.time for line in stored] == sorted(line.time for line in stored)


def test_debug_mode_shows_the_traceback(engine, deploy, gateway):
    code = "def handle(event, context):\n    raise ValueError('no good')\n"
    deploy("debugged", {"handler.py": code}, debug=True)
    response = gateway.get("/fn/acme/debugged/")
    assert response.status == 500
    assert "ValueError: no good" in response.json()["detail"]
    assert "Traceback" in response.json()["traceback"]


def test_retention_keeps_the_newest(make_engine, deploy, gateway):
    engine = make_engine(retention={"MAX_PER_FUNCTION": 3, "DAYS": 7})
    function, _ = deploy("kept", version_files(1))
    ids = [gateway.get("/fn/acme/kept/").headers["x-nimbus-invocation-id"] for _ in range(6)]
    engine.records.flush()
    engine.records.prune()
    kept = set(str(pk) for pk in Invocation.objects.filter(function=function).values_list("pk", flat=True))
    assert kept == set(ids[-3:])


def _ref(function):
    from functions.services import function_ref

    return function_ref(function)


def test_failed_deploy_keeps_the_previous_revision_serving(engine, deploy, gateway, members):
    function, first = deploy("steady", version_files(1))
    assert gateway.get("/fn/acme/steady/").json() == {"version": 1}
    broken = {"handler.py": "import not_a_module_anywhere\n\ndef handle(event, context):\n    return 'x'\n"}
    function, second = redeploy(deploy, function, members, broken, expect_ready=False)
    assert second.status == Revision.Status.FAILED
    assert "not_a_module_anywhere" in second.status_message
    assert gateway.get("/fn/acme/steady/").json() == {"version": 1}


def test_runtime_exiting_while_importing_fails_the_deploy(engine, deploy, gateway, members):
    function, _ = deploy("checked", version_files(1))
    function_update(acting_user=members["developer"], function=function, min_instances=1)
    crashing = {"handler.py": "import os\nos._exit(5)\n"}
    function, second = redeploy(deploy, function, members, crashing, expect_ready=False)
    assert second.status == Revision.Status.FAILED
    assert "could not be imported" in second.status_message
    assert gateway.get("/fn/acme/checked/").json() == {"version": 1}


def test_deploy_reports_its_steps(engine, members, tenant):
    from functions.services import function_create, revision_spec
    from functions.services import function_deploy

    function = function_create(acting_user=members["developer"], tenant=tenant, name="steps", starter="hello")
    events = []
    revision = function_deploy(acting_user=members["developer"], function=function)
    spec = revision_spec(revision)
    engine.deploy(spec, traffic=[], progress=events.append)
    steps = [(e.step, e.status) for e in events]
    assert ("instance", "ok") in steps and ("health", "ok") in steps and ("traffic", "ok") in steps
    assert all(isinstance(e, DeployEvent) for e in events)


def test_fresh_engine_serves_a_ready_revision_lazily(engine, deploy, gateway):
    deploy("durable", version_files(7), min_instances=1)
    assert gateway.get("/fn/acme/durable/").json() == {"version": 7}
    engine.shutdown()  # the portal restarts: no pools, no zygotes
    fresh = LocalEngine(idle_seconds=60)
    set_engine(fresh)
    try:
        response = gateway.get("/fn/acme/durable/")
        assert response.status == 200
        assert response.json() == {"version": 7}
        assert response.headers["x-nimbus-cold-start"] == "yes"
        assert fresh.status(_ref(Revision.objects.get(function__name="durable").function)).ready
    finally:
        fresh.shutdown()


def test_requests_do_not_reload_routes(make_engine, deploy, gateway):
    engine = make_engine(route_ttl=3600)
    deploy("cached", version_files(1))
    assert gateway.get("/fn/acme/cached/").status == 200
    engine.routes.eager_until = 0  # the deploy's short eager-refresh window is over
    engine.routes.refresh(force=True)
    loaded_at = engine.routes.loaded_at
    for _ in range(20):
        assert gateway.get("/fn/acme/cached/").status == 200
        assert gateway.get("/fn/acme/unknown/").status == 404
    assert engine.routes.loaded_at == loaded_at


def test_suspended_tenant_functions_do_not_answer(engine, deploy, gateway, operator, tenant):
    from tenancy.services import tenant_suspend

    deploy("hello", version_files(1))
    assert gateway.get("/fn/acme/hello/").status == 200
    tenant_suspend(acting_user=operator, tenant=tenant, reason="unpaid")
    engine.routes.invalidate()
    assert gateway.get("/fn/acme/hello/").status == 404


def test_engine_logs_filter_and_follow(engine, deploy, gateway, members):
    import threading

    code = "def handle(event, context):\n    print('line', event.query.get('n'))\n    return 'ok'\n"
    function, first = deploy("chatty", {"handler.py": code})
    gateway.get("/fn/acme/chatty/", query="n=1")
    ref = _ref(function)
    from tests.engines.local.conftest import wait_for

    assert wait_for(lambda: any(line.message == "line 1" for line in engine.logs(ref)))
    lines = list(engine.logs(ref, revision=first.number))
    assert all(line.revision == first.number for line in lines)
    since = lines[-1].time
    assert list(engine.logs(ref, revision=first.number + 1)) == []

    followed = []

    def follow():
        for line in engine.logs(ref, since=since, follow=True):
            followed.append(line.message)
            if line.message == "line 2":
                return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    gateway.get("/fn/acme/chatty/", query="n=2")
    reader.join(timeout=15)
    assert "line 2" in followed and "line 1" not in followed


def test_replaced_revision_stops_once_traffic_moves(engine, deploy, gateway, members):
    function, first = deploy("rolling", version_files(1))
    assert gateway.get("/fn/acme/rolling/").json() == {"version": 1}
    old_pool = engine.pool_for(first.pk)
    function, second = redeploy(deploy, function, members, version_files(2))
    assert gateway.get("/fn/acme/rolling/").json() == {"version": 2}
    assert engine.pool_for(first.pk) is None
    from tests.engines.local.conftest import wait_for

    assert wait_for(lambda: old_pool.closed)  # its zygote and instances are gone
    assert not old_pool.launcher.alive


HEADERS_SEEN = """
def handle(event, context):
    return {name: event.headers.get(name) for name in (
        "x-nimbus-trigger", "x-nimbus-delivery-id", "x-nimbus-attempt", "x-nimbus-invocation-id", "x-custom")}
"""


def test_callers_cannot_speak_for_the_platform(engine, deploy, gateway):
    """Headers the platform sets (trigger, queued delivery id and attempt, invocation id) come from
    the platform only: a caller's own values are dropped, other headers pass."""
    deploy("headers", {"handler.py": HEADERS_SEEN})
    response = gateway.get("/fn/acme/headers/", headers={
        "X-Nimbus-Trigger": "cron", "X-Nimbus-Delivery-Id": "6d0c3f0e-0000-4000-8000-000000000000",
        "X-Nimbus-Attempt": "9", "X-Nimbus-Invocation-Id": "forged", "X-Custom": "kept"})
    assert response.status == 200
    seen = response.json()
    assert seen["x-nimbus-trigger"] == "http"
    assert seen["x-nimbus-delivery-id"] is None and seen["x-nimbus-attempt"] is None
    assert seen["x-nimbus-invocation-id"] == response.headers["x-nimbus-invocation-id"] != "forged"
    assert seen["x-custom"] == "kept"
