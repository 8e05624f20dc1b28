"""Function log lines on the Knative engine reach the portal's log store: a pull pass reads the pods'
``user-container`` logs (the API stand-in's) of recently invoked functions and stores the lines of
recorded invocations once; the Logs tab and an invocation's logs then show them, and the delivery
worker runs the passes by itself."""

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.test import Client
from django.utils import timezone

from functions.engines.knative.logsync import LOG_PULL_WINDOW, LogSync
from functions.models import Invocation, InvocationLog
from functions.services import function_create
from tests.engines.local.conftest import wait_for

from .runtime_service import deploy_on_knative, knative, runtime_service  # noqa: F401 - fixtures
from .test_invoke import Portal

pytestmark = pytest.mark.django_db(transaction=True)

NAMESPACE = "nimbus-acme"
LOGGING_HANDLER = '''
import logging

def handle(event, context):
    print("handling " + event.path)
    logging.getLogger("orders").warning("stock is low")
    context.logger.error("payment declined")
    return {"ok": True}
'''


@pytest.fixture
def engine_values(engine_values):
    # Small, so the worker test sees a pass soon; the pass tests call pull_logs() themselves.
    return dict(engine_values, LOG_PULL_SECONDS=0.05)


def stamp(when: datetime) -> str:
    """The kubelet's timestamp (``--timestamps``): RFC 3339 with nanoseconds, in UTC."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def shim_line(when: datetime, message: str, *, invocation=None, level="INFO") -> str:
    record = {"time": when.isoformat(), "level": level, "message": message,
              "invocation_id": str(invocation) if invocation else None, "function": "hello", "revision": "1"}
    return f"{stamp(when)} {json.dumps(record)}"


def pod_labels(function: str, revision: int = 1) -> dict:
    return {"serving.knative.dev/service": function,
            "serving.knative.dev/revision": f"{function}-{revision:05d}",
            "serving.knative.dev/configuration": function}


def invocation(function, started_at=None) -> Invocation:
    return Invocation.objects.create(function=function, started_at=started_at or timezone.now(), status="success",
                                     http_status=200, trigger="http")


def log_reads(stand_in, pod: str) -> list[dict]:
    return [query for method, path, _, query in stand_in.requests
            if method == "GET" and path == f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}/log"]


def stored(function) -> list[tuple[str, str, str, datetime]]:
    return [(str(row.invocation_id), row.level, row.message, row.time) for row in
            InvocationLog.objects.filter(invocation__function=function).order_by("time", "id")]


@pytest.fixture
def hello(tenant, members):
    return function_create(acting_user=members["developer"], tenant=tenant, name="hello", starter="hello")


@pytest.fixture
def scene(engine, stand_in, hello):
    """Two recorded invocations of hello and a pod whose log has their lines among others."""
    first, second = invocation(hello), invocation(hello)
    base = timezone.now() - timedelta(seconds=30)
    at = [base + timedelta(milliseconds=10 * i) for i in range(8)]
    log = "\n".join([
        shim_line(at[0], "serving handler.handle on 0.0.0.0:8080"),  # start-up: no invocation
        shim_line(at[1], "handling /orders", invocation=first.pk),
        shim_line(at[2], "stock is low", invocation=first.pk, level="warning"),
        shim_line(at[3], "not a recorded invocation", invocation=uuid.uuid4()),
        f"{stamp(at[4])} Traceback (most recent call last): plain text, not JSON",
        shim_line(at[5], "payment declined", invocation=second.pk, level="ERROR"),
        "no timestamp at all",
        shim_line(at[6], "handling /orders", invocation=second.pk),
    ])
    stand_in.add_pod(NAMESPACE, "hello-00001-deployment-7d9f-abcde", pod_labels("hello"), log=log)
    return {"first": first, "second": second, "at": at, "pod": "hello-00001-deployment-7d9f-abcde"}


def expected(scene) -> list[tuple]:
    first, second, at = str(scene["first"].pk), str(scene["second"].pk), scene["at"]
    return [(first, "INFO", "handling /orders", at[1]), (first, "WARNING", "stock is low", at[2]),
            (second, "ERROR", "payment declined", at[5]), (second, "INFO", "handling /orders", at[6])]


# ---- one pass, and the next ones ---------------------------------------------------------------------


def test_one_pass_stores_exactly_the_lines_of_recorded_invocations(engine, stand_in, hello, scene):
    assert engine.pull_logs() == 4
    assert stored(hello) == expected(scene)
    # Read through the engine's client, from the window back, the user's container only.
    (read,) = log_reads(stand_in, scene["pod"])
    assert read["container"] == "user-container" and read["timestamps"] == "true"
    assert read["sinceSeconds"] == str(LOG_PULL_WINDOW * 60)


def test_the_next_pass_rereads_the_overlap_and_stores_nothing_twice(engine, stand_in, hello, scene):
    engine.pull_logs()
    # The stand-in ignores sinceSeconds, so this pass re-reads every line: the worst overlap.
    assert engine.pull_logs() == 0
    reads = log_reads(stand_in, scene["pod"])
    assert len(reads) == 2 and int(reads[1]["sinceSeconds"]) < LOG_PULL_WINDOW * 60
    # Another process (its own memory of nothing) pulling the same pod stores nothing either.
    assert LogSync(engine).pull() == 0
    assert stored(hello) == expected(scene)


def test_two_processes_pulling_at_once_store_each_line_once(engine, stand_in, hello, scene):
    from django.db import connection

    start, results = threading.Barrier(2), []

    def pull():
        sync = LogSync(engine)  # a process of its own: no memory of earlier reads
        try:
            start.wait()
            results.append(sync.pull())
        finally:
            connection.close()

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [0, 4]
    assert stored(hello) == expected(scene)


def test_identical_lines_of_one_invocation_are_both_kept_once(engine, stand_in, hello):
    row = invocation(hello)
    when = timezone.now() - timedelta(seconds=5)
    twice = shim_line(when, "retrying", invocation=row.pk)
    stand_in.add_pod(NAMESPACE, "hello-00001-a", pod_labels("hello"), log=f"{twice}\n{twice}")
    assert engine.pull_logs() == 2
    assert engine.pull_logs() == 0
    assert [message for _, _, message, _ in stored(hello)] == ["retrying", "retrying"]


def test_lines_appended_to_the_pod_log_arrive_on_the_next_pass(engine, stand_in, hello, scene):
    engine.pull_logs()
    third = invocation(hello)
    later = timezone.now()
    key = (NAMESPACE, scene["pod"])
    stand_in.pod_logs[key] += "\n" + shim_line(later, "a later call", invocation=third.pk) + "\n"
    assert engine.pull_logs() == 1
    assert stored(hello) == expected(scene) + [(str(third.pk), "INFO", "a later call", later)]


def test_a_line_read_before_its_record_is_stored_once_the_record_exists(engine, stand_in, hello):
    early = uuid.uuid4()
    invocation(hello)  # makes hello recently invoked
    when = timezone.now() - timedelta(seconds=3)
    stand_in.add_pod(NAMESPACE, "hello-00001-b", pod_labels("hello"),
                     log=shim_line(when, "still running", invocation=early))
    assert engine.pull_logs() == 0
    # The call ends and its record is written; the line was read already and is not read again
    # (here the pod is gone), but it waited.
    Invocation.objects.create(id=early, function=hello, started_at=when, status="success", trigger="http")
    del stand_in.pod_logs[(NAMESPACE, "hello-00001-b")]
    assert engine.pull_logs() == 1
    assert [(i, m) for i, _, m, _ in stored(hello)] == [(str(early), "still running")]


def test_a_line_naming_another_functions_invocation_is_dropped(engine, stand_in, hello, tenant, members):
    other = function_create(acting_user=members["developer"], tenant=tenant, name="other", starter="hello")
    theirs = invocation(other)
    invocation(hello)
    stand_in.add_pod(NAMESPACE, "hello-00001-c", pod_labels("hello"),
                     log=shim_line(timezone.now(), "forged", invocation=theirs.pk))
    assert engine.pull_logs() == 0
    assert not InvocationLog.objects.exists()
    assert not engine.log_sync.pending  # not kept waiting either


def test_a_pod_that_went_away_is_nothing_to_read(engine, stand_in, hello, scene):
    # Listed, but its log answers 404 (deleted between the list and the read).
    stand_in.add_pod(NAMESPACE, "hello-00001-gone", pod_labels("hello"))
    del stand_in.pod_logs[(NAMESPACE, "hello-00001-gone")]
    assert engine.pull_logs() == 4
    assert len(log_reads(stand_in, "hello-00001-gone")) == 1
    assert stored(hello) == expected(scene)


def test_a_failed_api_call_costs_that_pass_only(engine, stand_in, hello, scene):
    stand_in.fail_next = [503]  # the pod list fails; not retried within the pass
    assert engine.pull_logs() == 0
    assert engine.pull_logs() == 4
    assert stored(hello) == expected(scene)


def test_a_failed_read_or_store_leaves_the_pod_to_be_read_from_where_it_was(engine, stand_in, hello, scene,
                                                                             monkeypatch):
    window = str(LOG_PULL_WINDOW * 60)
    stand_in.fail_next = [0, 503]  # the pod list answers, the log read fails
    assert engine.pull_logs() == 0

    def broken(function_id, lines):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(engine.log_sync, "store", broken)
    assert engine.pull_logs() == 0  # logged; the pass goes on with the other functions
    monkeypatch.undo()
    assert engine.pull_logs() == 4
    # Neither the failed read nor the one whose lines were not stored moved the pod's mark.
    assert [q["sinceSeconds"] for q in log_reads(stand_in, scene["pod"])] == [window] * 3
    assert stored(hello) == expected(scene)


def test_functions_without_recent_invocations_are_not_read(engine, stand_in, hello, tenant, members):
    quiet = function_create(acting_user=members["developer"], tenant=tenant, name="quiet", starter="hello")
    old = invocation(quiet, started_at=timezone.now() - timedelta(minutes=LOG_PULL_WINDOW + 5))
    stand_in.add_pod(NAMESPACE, "quiet-00001-a", pod_labels("quiet"),
                     log=shim_line(timezone.now(), "late line", invocation=old.pk))
    stand_in.add_pod(NAMESPACE, "hello-00001-d", pod_labels("hello"), log="")  # hello: never invoked
    assert engine.pull_logs() == 0
    assert not [r for r in stand_in.requests if "/pods" in r[1]]
    assert not InvocationLog.objects.exists()


def test_the_pass_is_bounded(engine, stand_in, hello):
    row = invocation(hello)
    base = timezone.now() - timedelta(seconds=10)
    lines = [shim_line(base + timedelta(milliseconds=i), f"line {i}", invocation=row.pk) for i in range(30)]
    stand_in.add_pod(NAMESPACE, "hello-00001-e", pod_labels("hello"), log="\n".join(lines))
    engine.log_sync.max_lines = 10
    assert engine.pull_logs() == 10
    assert log_reads(stand_in, "hello-00001-e")[0]["tailLines"] == "10"
    assert [m for _, _, m, _ in stored(hello)] == [f"line {i}" for i in range(20, 30)]
    # The budget cut that read: the pod's mark did not move, so the next pass reads it from where it
    # was again (a larger budget brings the rest; what was stored is not stored twice).
    engine.log_sync.max_lines = 100
    assert engine.pull_logs() == 20
    first, second = log_reads(stand_in, "hello-00001-e")
    assert first["sinceSeconds"] == second["sinceSeconds"] == str(LOG_PULL_WINDOW * 60)
    assert [m for _, _, m, _ in stored(hello)] == [f"line {i}" for i in range(30)]


def test_waiting_lines_survive_a_failed_store(engine, stand_in, hello, monkeypatch):
    early = uuid.uuid4()
    invocation(hello)
    when = timezone.now() - timedelta(seconds=3)
    stand_in.add_pod(NAMESPACE, "hello-00001-f", pod_labels("hello"),
                     log=shim_line(when, "before its record", invocation=early))
    assert engine.pull_logs() == 0  # read, waiting for its record
    del stand_in.pod_logs[(NAMESPACE, "hello-00001-f")]  # never to be read again
    Invocation.objects.create(id=early, function=hello, started_at=when, status="success", trigger="http")

    def broken(function_id, wanted):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(engine.log_sync, "_insert", broken)
    assert engine.pull_logs() == 0
    monkeypatch.undo()
    assert engine.pull_logs() == 1
    assert [(i, m) for i, _, m, _ in stored(hello)] == [(str(early), "before its record")]


def test_the_local_engine_has_nothing_to_pull():
    from functions.engines.base import Engine, LogPulling
    from functions.engines.local.engine import LocalEngine

    local = LocalEngine()
    assert isinstance(local, Engine) and isinstance(local, LogPulling)
    assert local.log_pull_seconds == 0 and local.pull_logs() == 0


# ---- end to end: the real shim's lines, the portal's pages, the worker -------------------------------


def kubelet_log(shim_output: str) -> str:
    """The shim's stdout as ``kubectl logs --timestamps`` shows it (the kubelet stamps each line)."""
    lines = []
    for raw in shim_output.splitlines():
        when = datetime.fromisoformat(json.loads(raw)["time"])
        lines.append(f"{stamp(when)} {raw}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def called(knative, runtime_service, deploy_on_knative, stand_in):
    """hello deployed on Knative, called once through the portal; its pod's log is the real shim's
    output. Returns (function, invocation id)."""
    running = runtime_service(source=LOGGING_HANDLER)
    knative.values["INTERNAL_URL"] = running.url
    function, _ = deploy_on_knative("hello")
    portal = Portal()
    try:
        response = portal.request("POST", "/fn/acme/hello/orders")
    finally:
        portal.close()
    assert response.status == 200, response
    invocation_id = response.headers["x-nimbus-invocation-id"]
    knative.records.flush()
    output = running.folder / "shim.log"
    assert wait_for(lambda: "payment declined" in output.read_text())
    stand_in.add_pod(NAMESPACE, "hello-00001-deployment-e2e", pod_labels("hello"),
                     log=kubelet_log(output.read_text()))
    return function, invocation_id


def test_the_logs_tab_and_the_invocation_show_the_pods_lines(knative, called, members):
    function, invocation_id = called
    assert knative.pull_logs() == 3
    client = Client()
    client.force_login(members["viewer"])
    page = client.get(f"/t/acme/f/{function.name}/logs/")
    assert page.status_code == 200
    text = page.content.decode()
    for message in ("handling /orders", "stock is low", "payment declined"):
        assert message in text
    assert "listening" not in text  # a start-up line

    detail = client.get(f"/api/v1/tenants/acme/functions/{function.name}/invocations/{invocation_id}/").json()
    assert [(line["level"], line["message"]) for line in detail["logs"]] == [
        ("INFO", "handling /orders"), ("WARNING", "stock is low"), ("ERROR", "payment declined")]


def test_the_delivery_worker_pulls_by_itself(knative, called, stand_in):
    from functions.triggers.worker import Worker

    function, invocation_id = called
    assert knative.log_pull_seconds == 0.05
    worker = Worker(engine=knative, poll_seconds=0.05).start()
    try:
        assert wait_for(lambda: InvocationLog.objects.filter(invocation_id=invocation_id).count() == 3)
        # Passes keep coming; none stores a line twice.
        reads = len(log_reads(stand_in, "hello-00001-deployment-e2e"))
        assert wait_for(lambda: len(log_reads(stand_in, "hello-00001-deployment-e2e")) >= reads + 2)
    finally:
        worker.stop()
    assert InvocationLog.objects.filter(invocation__function=function).count() == 3
