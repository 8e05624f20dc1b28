"""The local engine's CPU throttle (functions/engines/local/cpu.py): the pure decision with literal
numbers, the throttle on plain processes (stop, continue on removal and close), and through the
engine with real instances: a busy handler held to its millicores, an idle one left alone, the
request timeout still killing a throttled handler."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from functions.engines.local import cpu
from functions.engines.local.cpu import CpuThrottle, Decision, decide
from tests.engines.local.conftest import wait_for

BUSY = """
import time

def handle(event, context):
    seconds = float(event.query.get("seconds", "1"))
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < seconds:
        n += 1
    return {"loops": n}
"""

HELLO = {"handler.py": "def handle(event, context):\n    return 'hi'\n"}


def approx(decision, stop, debt):
    return decision.stop == pytest.approx(stop, abs=1e-9) and decision.debt == pytest.approx(debt, abs=1e-9)


# ---- the decision, pure ----------------------------------------------------------------------------------

def test_over_quota_stops_for_the_time_that_repays_it():
    # 250m over 100 ms: a 25 ms quota. 100 ms used → 75 ms over, repaid at 0.25 s/s → 300 ms stopped.
    assert approx(decide(millicores=250, period=0.1, used=0.1, debt=0.0), 0.3, 0.0)
    # 500m, 100 ms used: 50 ms over → 100 ms stopped.
    assert approx(decide(millicores=500, period=0.1, used=0.1), 0.1, 0.0)
    # Two busy threads at 1000m: 200 ms in 100 ms → 100 ms stopped.
    assert approx(decide(millicores=1000, period=0.1, used=0.2), 0.1, 0.0)


def test_within_quota_runs_and_unused_quota_is_not_banked():
    assert decide(millicores=250, period=0.1, used=0.025) == Decision(0.0, 0.0)
    assert decide(millicores=250, period=0.1, used=0.0) == Decision(0.0, 0.0)
    # A quiet period pays off debt, but does not leave credit for the next one.
    assert decide(millicores=250, period=0.1, used=0.0, debt=0.01) == Decision(0.0, 0.0)


def test_debt_carries_over():
    # Owing 50 ms from before, 100 ms used at 250m: 125 ms over → 500 ms stopped.
    assert approx(decide(millicores=250, period=0.1, used=0.1, debt=0.05), 0.5, 0.0)
    # An excess worth less than the shortest stop (20 ms) is carried, not stopped for…
    assert approx(decide(millicores=1000, period=0.1, used=0.11), 0.0, 0.01)
    # …and forgiven if the next period uses less than its quota.
    assert approx(decide(millicores=1000, period=0.1, used=0.09, debt=0.01), 0.0, 0.0)
    # …or stopped for once it adds up: 10 + 15 ms over at 1000m → 25 ms.
    assert approx(decide(millicores=1000, period=0.1, used=0.115, debt=0.01), 0.025, 0.0)


def test_a_long_stop_is_spread_over_periods():
    # 100m, 200 ms used (two busy threads): 190 ms over would be 1.9 s stopped; at most 1 s at a time,
    # which repays 100 ms; 90 ms stays owed.
    assert approx(decide(millicores=100, period=0.1, used=0.2), 1.0, 0.09)
    assert approx(decide(millicores=100, period=0.1, used=0.0, debt=0.09), 0.8, 0.0)


def test_unlimited_settings():
    assert decide(millicores=0, period=0.1, used=5.0, debt=1.0) == Decision(0.0, 0.0)
    assert not cpu.limited(0, machine=2000)
    assert not cpu.limited(2000, machine=2000)
    assert not cpu.limited(4000, machine=2000)
    assert cpu.limited(1999, machine=2000)
    assert cpu.limited(250, machine=2000)
    assert not CpuThrottle(machine=2000).register("x", 1, 2000)


# ---- the throttle on a plain process -------------------------------------------------------------------------

@pytest.fixture
def spinner():
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def test_throttle_stops_a_busy_process_and_continues_it_on_removal(spinner):
    throttle = CpuThrottle(machine=2000)
    try:
        assert throttle.register("spin", spinner.pid, 100)
        assert wait_for(lambda: cpu.process_state(spinner.pid) == "T", timeout=3, interval=0.01)
        assert throttle.stats("spin")["stopped"]
        stats = throttle.unregister("spin")
        assert stats["throttled_periods"] >= 1
        assert cpu.process_state(spinner.pid) != "T"
        assert throttle.stats("spin") is None

        assert throttle.register("spin", spinner.pid, 100)
        assert wait_for(lambda: cpu.process_state(spinner.pid) == "T", timeout=3, interval=0.01)
    finally:
        throttle.close()
    assert cpu.process_state(spinner.pid) != "T"
    assert not throttle.thread.is_alive()


def test_throttle_counts_and_stops_child_processes():
    # A handler that forks: the children's CPU counts, and they are stopped with their parent.
    code = ("import os, time\n"
            "for _ in range(2):\n"
            "    if os.fork() == 0:\n"
            "        while True: pass\n"
            "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    throttle = CpuThrottle(machine=4000)
    try:
        assert wait_for(lambda: len(cpu.descendants(process.pid)) == 2, timeout=3)
        children = cpu.descendants(process.pid)
        assert throttle.register("forker", process.pid, 200)
        assert wait_for(lambda: all(cpu.process_state(pid) == "T" for pid in children), timeout=3, interval=0.01)
    finally:
        throttle.close()
        assert all(cpu.process_state(pid) != "T" for pid in children)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# ---- through the engine, real instances --------------------------------------------------------------------

engine_test = pytest.mark.django_db(transaction=True)


@pytest.fixture
def engine(make_engine):
    """The userspace throttle is the fallback where cgroups are not writable: the rlimit controller."""
    return make_engine(resources="rlimit")


def _instance(engine, revision):
    pool = engine.pool_for(revision.pk)
    inst = next(iter(pool.instances.values()))
    return pool, inst, pool.launcher.host_pid(inst)


@engine_test
def test_busy_handler_is_held_to_its_millicores(engine, deploy, gateway):
    _, revision = deploy("burner", {"handler.py": BUSY}, cpu_millicores=200)
    assert gateway.get("/fn/acme/burner/", query="seconds=0").status == 200  # start the instance
    pool, inst, pid = _instance(engine, revision)
    assert engine.cpu_throttle.stats(inst.id) is not None

    started = time.monotonic()
    cpu_before = cpu.process_cpu_seconds(pid)
    response = gateway.get("/fn/acme/burner/", query="seconds=1")
    duration = time.monotonic() - started
    used = cpu.process_cpu_seconds(pid) - cpu_before
    assert response.status == 200

    stats = engine.cpu_throttle.stats(inst.id)
    assert stats["throttled_periods"] > 0
    assert stats["stopped_seconds"] > 0
    # 200m: about a fifth of the call's duration; clearly below the whole of it.
    assert used < 0.6 * duration, (used, duration)
    # Operators see it in /metrics: the stops that ended so far, under the function's labels.
    from observability import metrics

    exposed = metrics.registry.get_sample_value("nimbus_function_cpu_throttled_seconds_total", {
        "tenant": "acme", "namespace": "nimbus-acme", "function": "burner", "service": "burner",
        "revision": f"burner-{revision.number:05d}"})
    assert exposed is not None and exposed > 0
    print(f"200m: cpu {used:.3f} s over {duration:.3f} s, ratio {used / duration:.2f}, {stats}")


@engine_test
def test_without_the_throttle_the_handler_is_not_stopped(make_engine, deploy, gateway):
    engine = make_engine(cpu_throttle=False, resources="rlimit")
    assert engine.cpu_throttle is None
    _, revision = deploy("burner", {"handler.py": BUSY}, cpu_millicores=200)
    assert gateway.get("/fn/acme/burner/", query="seconds=0").status == 200
    _, _, pid = _instance(engine, revision)
    states = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            states.add(cpu.process_state(pid))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert gateway.get("/fn/acme/burner/", query="seconds=0.5").status == 200
    finally:
        done.set()
        watcher.join()
    assert "T" not in states


@engine_test
def test_a_whole_machine_setting_is_not_throttled(engine, deploy, gateway):
    _, revision = deploy("wide", {"handler.py": BUSY}, cpu_millicores=engine.cpu_throttle.machine)
    assert gateway.get("/fn/acme/wide/", query="seconds=0.3").status == 200
    _, inst, _ = _instance(engine, revision)
    assert engine.cpu_throttle.stats(inst.id) is None


@engine_test
def test_an_idle_instance_is_never_stopped(engine, deploy, gateway):
    _, revision = deploy("idle", HELLO, cpu_millicores=100)
    assert gateway.get("/fn/acme/idle/").status == 200
    _, inst, pid = _instance(engine, revision)
    assert wait_for(lambda: engine.cpu_throttle.stats(inst.id)["periods"] >= 5, timeout=3)
    stats = engine.cpu_throttle.stats(inst.id)
    assert stats["throttled_periods"] == 0 and stats["stopped_seconds"] == 0
    assert cpu.process_state(pid) != "T"


@engine_test
def test_a_throttled_instance_is_continued_when_it_leaves(engine, deploy, gateway):
    _, revision = deploy("burner", {"handler.py": BUSY}, cpu_millicores=100, timeout_seconds=10)
    assert gateway.get("/fn/acme/burner/", query="seconds=0").status == 200
    pool, inst, pid = _instance(engine, revision)
    result = {}
    caller = threading.Thread(target=lambda: result.update(r=gateway.get("/fn/acme/burner/", query="seconds=5")))
    caller.start()
    try:
        assert wait_for(lambda: cpu.process_state(pid) == "T", timeout=3, interval=0.01)
        # Scale-down, revision stop: the instance leaves the pool while stopped.
        pool.kill(inst, "scaled down after idling")
        assert cpu.process_state(pid) != "T"
        assert inst.cpu_stats["throttled_periods"] > 0
        assert engine.cpu_throttle.stats(inst.id) is None
        assert wait_for(lambda: cpu.process_state(pid) in (None, "Z", "X"), timeout=3)
    finally:
        caller.join(timeout=10)
    assert result["r"].status >= 500


@engine_test
def test_engine_shutdown_continues_every_instance(engine, deploy, gateway):
    _, revision = deploy("burner", {"handler.py": BUSY}, cpu_millicores=100, timeout_seconds=10)
    assert gateway.get("/fn/acme/burner/", query="seconds=0").status == 200
    _, inst, pid = _instance(engine, revision)
    caller = threading.Thread(target=lambda: gateway.get("/fn/acme/burner/", query="seconds=5"))
    caller.start()
    try:
        assert wait_for(lambda: cpu.process_state(pid) == "T", timeout=3, interval=0.01)
        engine.shutdown()
        assert cpu.process_state(pid) != "T"
        assert not engine.cpu_throttle.entries
    finally:
        caller.join(timeout=10)


@engine_test
def test_the_timeout_still_kills_a_throttled_handler(engine, deploy, gateway):
    _, revision = deploy("burner", {"handler.py": BUSY}, cpu_millicores=100, timeout_seconds=1)
    assert gateway.get("/fn/acme/burner/", query="seconds=0").status == 200
    _, inst, pid = _instance(engine, revision)
    response = gateway.get("/fn/acme/burner/", query="seconds=30")
    assert response.status == 504
    assert response.json()["code"] == "timeout"
    assert inst.cpu_stats["throttled_periods"] > 0
    assert wait_for(lambda: cpu.process_state(pid) in (None, "Z", "X"), timeout=3)


@engine_test
def test_with_cgroups_the_cpu_quota_holds_the_handler(make_engine, deploy, gateway):
    from functions.engines.local import resources

    engine = make_engine()
    if "cpu" not in getattr(engine.resources, "controllers", ()):
        pytest.skip(f"no cgroup CPU controller here: {engine.resources.describe()}")
    assert engine.cpu_throttle is None  # the kernel's quota replaces the userspace throttle
    _, revision = deploy("burner", {"handler.py": BUSY}, cpu_millicores=200)
    assert gateway.get("/fn/acme/burner/", query="seconds=0").status == 200
    _, inst, pid = _instance(engine, revision)
    assert isinstance(inst.group, resources.Group)
    started = time.monotonic()
    cpu_before = cpu.process_cpu_seconds(pid)
    assert gateway.get("/fn/acme/burner/", query="seconds=1").status == 200
    duration = time.monotonic() - started
    used = cpu.process_cpu_seconds(pid) - cpu_before
    assert used < 0.6 * duration, (used, duration)
    print(f"200m under cgroup: cpu {used:.3f} s over {duration:.3f} s, ratio {used / duration:.2f}")
