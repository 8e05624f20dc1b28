"""The instance pool, driven through the gateway with real processes: scale from zero, concurrency,
scale out, the bounded queue, idle scale-to-zero, min instances, timeouts, crashes, memory limits."""

import pytest

from functions.models import Invocation
from tests.engines.local.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

SLOW = """
import os, time

def handle(event, context):
    started = time.monotonic()
    time.sleep(float(event.query.get("sleep", "0.3")))
    return {"instance": os.environ["NIMBUS_INSTANCE"], "pid": os.getpid(),
            "started": started, "ended": time.monotonic()}
"""

HELLO = {"handler.py": "def handle(event, context):\n    return 'Hello, ' + event.query.get('name', 'world') + '!'\n"}


def pool_of(engine, revision):
    return engine.pool_for(revision.pk)


def test_scale_from_zero_then_warm(engine, deploy, gateway):
    function, revision = deploy("hello", HELLO)
    assert pool_of(engine, revision).snapshot()["instances"] == 0  # min instances 0: nothing runs yet

    first = gateway.get("/fn/acme/hello/", query="name=Ada")
    assert first.status == 200
    assert first.text == "Hello, Ada!"
    assert first.headers["x-nimbus-cold-start"] == "yes"
    assert first.headers["x-nimbus-invocation-id"]
    assert float(first.headers["x-nimbus-duration-ms"]) >= 0

    second = gateway.get("/fn/acme/hello/")
    assert second.status == 200
    assert second.headers["x-nimbus-cold-start"] == "no"
    assert second.headers["x-nimbus-invocation-id"] != first.headers["x-nimbus-invocation-id"]
    assert pool_of(engine, revision).snapshot()["instances"] == 1


def test_concurrency_limit_honoured_and_scale_out(engine, deploy, gateway):
    deploy("slow", {"handler.py": SLOW}, concurrency=1, max_instances=2)
    responses = gateway.many([("GET", "/fn/acme/slow/", b"", {})] * 4)
    assert [r.status for r in responses] == [200] * 4
    results = [r.json() for r in responses]
    instances = {r["instance"] for r in results}
    assert len(instances) == 2  # scaled out to max instances, not beyond
    for instance in instances:
        spans = sorted((r["started"], r["ended"]) for r in results if r["instance"] == instance)
        # concurrency 1: an instance never runs two invocations at the same time
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end


def test_unlimited_concurrency_shares_one_instance(engine, deploy, gateway):
    deploy("shared", {"handler.py": SLOW}, concurrency=0, max_instances=3)
    responses = gateway.many([("GET", "/fn/acme/shared/", b"", {})] * 3)
    assert [r.status for r in responses] == [200] * 3
    results = [r.json() for r in responses]
    assert len({r["pid"] for r in results}) == 1
    starts, ends = [r["started"] for r in results], [r["ended"] for r in results]
    assert max(starts) < min(ends)  # all three ran at once in the same instance


def test_queue_bound_then_429(make_engine, deploy, gateway):
    engine = make_engine(queue_limit=1)
    deploy("busy", {"handler.py": SLOW}, concurrency=1, max_instances=1)
    responses = gateway.many([("GET", "/fn/acme/busy/", b"", {})] * 3)
    assert sorted(r.status for r in responses) == [200, 200, 429]
    rejected = next(r for r in responses if r.status == 429)
    assert rejected.json()["code"] == "saturated"
    engine.records.flush()
    assert Invocation.objects.filter(status="rejected", http_status=429).count() == 1


def test_idle_instances_scale_to_zero(make_engine, deploy, gateway):
    engine = make_engine(idle_seconds=0.3)
    function, revision = deploy("idle", HELLO)
    assert gateway.get("/fn/acme/idle/").status == 200
    pool = pool_of(engine, revision)
    assert wait_for(lambda: pool.snapshot()["instances"] == 0)
    again = gateway.get("/fn/acme/idle/")
    assert again.status == 200
    assert again.headers["x-nimbus-cold-start"] == "yes"


def test_min_instances_kept_warm_and_restarted_after_crash(make_engine, deploy, gateway):
    engine = make_engine(idle_seconds=0.2)
    code = HELLO["handler.py"] + "\nimport os\ndef crash(event, context):\n    os._exit(3)\n"
    function, revision = deploy("warm", {"handler.py": code}, min_instances=1)
    pool = pool_of(engine, revision)
    assert pool.snapshot()["instances"] == 1  # the deploy's health-checked instance stays
    response = gateway.get("/fn/acme/warm/")
    assert response.status == 200
    assert response.headers["x-nimbus-cold-start"] == "no"
    # Idle longer than the grace period: min instances are not scaled away.
    inst = next(iter(pool.instances.values()))
    assert not wait_for(lambda: pool.snapshot()["instances"] == 0, timeout=1.0)
    pool.kill(inst, "killed by the test")
    assert wait_for(lambda: pool.snapshot()["instances"] == 1 and
                    all(i.state == "ready" for i in pool.instances.values()))
    assert next(iter(pool.instances.values())).id != inst.id


def test_timeout_kills_the_instance_with_504(engine, deploy, gateway):
    function, revision = deploy("sleepy", {"handler.py": SLOW}, timeout_seconds=1)
    response = gateway.get("/fn/acme/sleepy/", query="sleep=30")
    assert response.status == 504
    assert response.json()["code"] == "timeout"
    assert gateway.get("/fn/acme/sleepy/", query="sleep=0").status == 200
    engine.records.flush()
    record = Invocation.objects.get(function=function, status="timeout")
    assert record.http_status == 504
    assert "timed out" in record.error


def test_instance_dying_mid_request_is_502_then_restarted(engine, deploy, gateway):
    code = "import os\n\ndef handle(event, context):\n    if event.path == '/die':\n        os._exit(1)\n    return 'ok'\n"
    function, revision = deploy("fragile", {"handler.py": code})
    assert gateway.get("/fn/acme/fragile/").status == 200
    died = gateway.get("/fn/acme/fragile/die")
    assert died.status == 502
    assert died.json()["code"] == "instance_died"
    after = gateway.get("/fn/acme/fragile/")
    assert after.status == 200
    assert after.headers["x-nimbus-cold-start"] == "yes"
    engine.records.flush()
    assert Invocation.objects.filter(function=function, status="crashed", http_status=502).count() == 1


@pytest.mark.parametrize("resources", ["cgroup", "rlimit"])
def test_memory_hog_is_stopped_with_a_clear_error(make_engine, deploy, gateway, resources):
    from functions.engines.local.resources import ResourceControlUnavailable

    try:
        engine = make_engine(resources=resources)
    except ResourceControlUnavailable as exc:
        pytest.skip(f"cgroups are not writable here: {exc}")
    code = ("def handle(event, context):\n"
            "    if event.path == '/hog':\n"
            "        block = bytearray(512 * 1024 * 1024)\n"
            "        return str(len(block))\n"
            "    return 'small'\n")
    function, revision = deploy("hog", {"handler.py": code}, memory_mb=64)
    hog = gateway.get("/fn/acme/hog/hog")
    assert "512" not in hog.text
    assert gateway.get("/fn/acme/hog/").text == "small"
    engine.records.flush()
    if resources == "cgroup":
        # The kernel kills the instance at its cgroup's limit; the record says why.
        assert hog.status == 502
        record = Invocation.objects.get(function=function, http_status=502)
        assert record.status == "crashed"
    else:
        # The address-space limit makes the allocation fail inside the handler.
        assert hog.status == 500
        record = Invocation.objects.get(function=function, http_status=500)
        assert record.status == "error"
        assert record.logs.filter(message__contains="ran out of memory").exists()
    assert "out of memory" in record.error and "64 MB" in record.error



def test_open_files_limit(make_engine, deploy, gateway):
    make_engine(instance_open_files=64)
    code = ("import errno\n"
            "def handle(event, context):\n"
            "    handles = []\n"
            "    try:\n"
            "        for _ in range(200):\n"
            "            handles.append(open('/dev/null'))\n"
            "    except OSError as exc:\n"
            "        return {'opened': len(handles), 'error': errno.errorcode[exc.errno]}\n"
            "    finally:\n"
            "        for handle in handles:\n"
            "            handle.close()\n"
            "    return {'opened': len(handles)}\n")
    deploy("files", {"handler.py": code})
    result = gateway.get("/fn/acme/files/").json()
    assert result["error"] == "EMFILE"
    assert result["opened"] < 64


def test_cpu_time_limit_stops_the_instance(make_engine, deploy, gateway):
    engine = make_engine(instance_cpu_seconds=1)
    code = ("def handle(event, context):\n"
            "    if event.path == '/spin':\n"
            "        while True:\n"
            "            pass\n"
            "    return 'ok'\n")
    function, _ = deploy("spinner", {"handler.py": code}, timeout_seconds=60)
    response = gateway.get("/fn/acme/spinner/spin")
    assert response.status == 502
    assert gateway.get("/fn/acme/spinner/").text == "ok"  # a fresh instance, with a fresh allowance
    engine.records.flush()
    record = Invocation.objects.get(function=function, http_status=502)
    assert record.status == "crashed"
    assert "CPU time" in record.error
