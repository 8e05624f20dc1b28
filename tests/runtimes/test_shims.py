"""The runtime shims as the runtime images run them (Knative's contract: HTTP on $PORT), with a
real process per test: health, the event and context contract, return values, CloudEvents,
trace propagation, structured logs and error handling, for Python and Node.js alike."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

RUNTIMES = Path(__file__).resolve().parents[2] / "functions" / "runtimes"

PYTHON_HANDLER = '''
import asyncio

def handle(event, context):
    if event.path == "/json":
        return {"got": event.json(), "method": event.method}
    if event.path == "/bytes":
        return b"\\x00\\x01"
    if event.path == "/custom":
        return {"status": 201, "headers": {"X-Custom": "yes"}, "body": {"created": True}}
    if event.path == "/cloudevent":
        return {"cloudevent": event.cloudevent}
    if event.path == "/context":
        print("printed line")
        context.logger.info("logged %s", "line")
        with context.span("inner"):
            pass
        return {"function": context.function, "revision": context.revision, "tenant": context.tenant,
                "invocation_id": context.invocation_id, "remaining": context.remaining_time() > 0,
                "query": event.query, "trace_id": context.trace_id}
    if event.path == "/fail":
        raise RuntimeError("kaput")
    return "plain text"
'''

ASYNC_HANDLER = '''
import asyncio

async def handle(event, context):
    await asyncio.sleep(0)
    return ["async", event.method]
'''

NODE_HANDLER = '''
module.exports.handle = async (event, context) => {
  if (event.path === "/json") return { got: event.json(), method: event.method };
  if (event.path === "/bytes") return Buffer.from([0, 1]);
  if (event.path === "/custom") return { status: 201, headers: { "X-Custom": "yes" }, body: { created: true } };
  if (event.path === "/cloudevent") return { cloudevent: event.cloudevent };
  if (event.path === "/context") {
    console.log("printed line");
    context.logger.info("logged %s", "line");
    await context.span("inner", async () => {});
    return { function: context.function, revision: context.revision, tenant: context.tenant,
             invocation_id: context.invocationId, remaining: context.remainingTime() > 0,
             query: event.query, trace_id: context.traceId };
  }
  if (event.path === "/fail") throw new Error("kaput");
  return "plain text";
};
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Shim:
    def __init__(self, runtime, code_dir, debug=False, handler="handler.handle"):
        self.port = free_port()
        if runtime == "python":
            argv = [sys.executable, "-I", "-S", str(RUNTIMES / "python" / "nimbus_runtime.py")]
        else:
            argv = [shutil.which("node"), str(RUNTIMES / "node" / "shim.js")]
        env = {"PATH": "/usr/bin:/bin", "PORT": str(self.port), "NIMBUS_CODE_DIR": str(code_dir),
               "NIMBUS_HANDLER": handler, "NIMBUS_TENANT": "acme", "NIMBUS_FUNCTION": "demo",
               "NIMBUS_REVISION": "3", "NIMBUS_TIMEOUT_SECONDS": "30", "NIMBUS_DEBUG": "1" if debug else "0"}
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.02)
        raise RuntimeError(f"shim did not start: {self.process.stdout.read().decode()}")

    def request(self, path, body=None, headers=None, method=None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, headers=headers or {},
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def logs(self):
        self.process.terminate()
        output = self.process.communicate(timeout=10)[0].decode()
        return [json.loads(line) for line in output.splitlines() if line.startswith("{")]

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


RUNTIME_PARAMS = ["python", pytest.param("node", marks=pytest.mark.skipif(shutil.which("node") is None,
                                                                           reason="Node.js is not installed"))]


@pytest.fixture(params=RUNTIME_PARAMS)
def shim(request, tmp_path):
    if request.param == "python":
        (tmp_path / "handler.py").write_text(PYTHON_HANDLER)
    else:
        (tmp_path / "handler.js").write_text(NODE_HANDLER)
    server = Shim(request.param, tmp_path)
    yield server
    server.stop()


def test_health(shim):
    status, _, body = shim.request("/_nimbus/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_return_values(shim):
    status, headers, body = shim.request("/")
    assert (status, body) == (200, b"plain text") and headers["Content-Type"].startswith("text/plain")
    status, headers, body = shim.request("/json", body=b'{"a": [1, 2]}', headers={"Content-Type": "application/json"})
    assert status == 200 and json.loads(body) == {"got": {"a": [1, 2]}, "method": "POST"}
    status, headers, body = shim.request("/bytes")
    assert body == b"\x00\x01" and headers["Content-Type"] == "application/octet-stream"
    status, headers, body = shim.request("/custom")
    assert status == 201 and headers["X-Custom"] == "yes" and json.loads(body) == {"created": True}


def test_context_trace_and_logs(shim):
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    status, headers, body = shim.request("/context?x=1&y=2", headers={
        "X-Nimbus-Invocation-Id": "inv-123", "traceparent": traceparent})
    data = json.loads(body)
    assert data == {"function": "demo", "revision": "3", "tenant": "acme", "invocation_id": "inv-123",
                    "remaining": True, "query": {"x": "1", "y": "2"}, "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert headers["X-Nimbus-Invocation-Id"] == "inv-123"
    assert headers["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert json.loads(headers["X-Nimbus-Spans"])[0]["name"] == "inner"
    # Without an invocation id the shim makes one.
    _, headers, _ = shim.request("/")
    assert len(headers["X-Nimbus-Invocation-Id"]) >= 16
    lines = [line for line in shim.logs() if line.get("invocation_id") == "inv-123"]
    messages = {line["message"] for line in lines}
    assert {"printed line", "logged line"} <= messages
    for line in lines:
        assert line["function"] == "demo" and line["revision"] == "3" and line["time"] and line["level"]


def test_cloudevents_binary_and_structured(shim):
    _, _, body = shim.request("/cloudevent", body=b'{"n": 1}', headers={
        "Content-Type": "application/json", "ce-specversion": "1.0", "ce-type": "com.example.tick",
        "ce-source": "/cron", "ce-id": "e-1"})
    event = json.loads(body)["cloudevent"]
    assert event["type"] == "com.example.tick" and event["id"] == "e-1" and event["data"] == {"n": 1}
    structured = {"specversion": "1.0", "type": "com.example.order", "source": "/shop", "id": "e-2",
                  "data": {"total": 3}}
    _, _, body = shim.request("/cloudevent", body=json.dumps(structured).encode(),
                              headers={"Content-Type": "application/cloudevents+json"})
    assert json.loads(body)["cloudevent"]["data"] == {"total": 3}
    _, _, body = shim.request("/cloudevent")
    assert json.loads(body)["cloudevent"] is None


def test_handler_error_is_500_with_traceback_only_in_logs(shim):
    status, _, body = shim.request("/fail", headers={"X-Nimbus-Invocation-Id": "inv-fail"})
    assert status == 500
    assert b"kaput" not in body and json.loads(body)["invocation_id"] == "inv-fail"
    errors = [line for line in shim.logs() if line.get("invocation_id") == "inv-fail" and line["level"] == "ERROR"]
    assert any("kaput" in line["message"] for line in errors)


def test_first_invocation_reports_the_cold_start(shim):
    # Health checks (Knative's readiness probes) are not invocations.
    assert shim.request("/_nimbus/health")[0] == 200
    _, first, _ = shim.request("/")
    _, second, _ = shim.request("/")
    _, failed_later, _ = shim.request("/fail")
    assert first["X-Nimbus-Cold-Start"] == "1"
    assert float(first["X-Nimbus-Init-Ms"]) > 0  # from the process's start to the handler loaded
    for headers in (second, failed_later):
        assert "X-Nimbus-Cold-Start" not in headers and "X-Nimbus-Init-Ms" not in headers
    for headers in (first, second, failed_later):
        assert float(headers["X-Nimbus-Handler-Ms"]) >= 0


FORKED_INSTANCE = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import nimbus_runtime as rt

runtime = rt.Runtime()
runtime.load()
loaded = time.monotonic()
rt.instance_start.take()  # whatever the zygote did, its instances start afresh
pid = os.fork()
if pid == 0:
    start = rt.instance_start
    print(json.dumps({"after_load": start.started >= loaded, "pending": start.pending, "init_ms": start.init_ms}))
    sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_forked_instance_starts_its_own_cold_start(tmp_path):
    # The local engine forks Python instances from a zygote that imported the handler long before:
    # an instance's start is its fork, and its first invocation is cold even if the zygote's was not.
    (tmp_path / "handler.py").write_text(PYTHON_HANDLER)
    result = subprocess.run([sys.executable, "-I", "-S", "-c", FORKED_INSTANCE, str(RUNTIMES / "python")],
                            env={"PATH": "/usr/bin:/bin", "NIMBUS_CODE_DIR": str(tmp_path)},
                            capture_output=True, timeout=30, check=True)
    assert json.loads(result.stdout.decode().strip().splitlines()[-1]) == {
        "after_load": True, "pending": True, "init_ms": None}


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_debug_mode_shows_the_error(runtime, tmp_path):
    (tmp_path / ("handler.py" if runtime == "python" else "handler.js")).write_text(
        PYTHON_HANDLER if runtime == "python" else NODE_HANDLER)
    server = Shim(runtime, tmp_path, debug=True)
    try:
        status, _, body = server.request("/fail")
    finally:
        server.stop()
    assert status == 500 and "kaput" in json.loads(body)["detail"]


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_broken_handler_fails_health(runtime, tmp_path):
    (tmp_path / ("handler.py" if runtime == "python" else "handler.js")).write_text("this is not valid code (\n")
    server = Shim(runtime, tmp_path)
    try:
        status, _, body = server.request("/_nimbus/health")
        invoked, _, _ = server.request("/")
    finally:
        server.stop()
    assert status == 500 and "error" in json.loads(body)
    assert invoked == 500


def test_python_async_handler(tmp_path):
    (tmp_path / "handler.py").write_text(ASYNC_HANDLER)
    server = Shim("python", tmp_path)
    try:
        status, _, body = server.request("/", method="PUT", body=b"")
    finally:
        server.stop()
    assert status == 200 and json.loads(body) == ["async", "PUT"]
