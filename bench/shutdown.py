"""Stopping a portal that has served traffic: a real portal (daphne, the local engine, the
in-process delivery worker) on a throw-away SQLite database serves synchronous and async calls for
N minutes, then gets SIGTERM; prints how long it took to exit, its exit code, the traffic counts
and how many tracebacks it printed.

    .venv/bin/python -m bench.shutdown                 # 5 minutes of traffic
    .venv/bin/python -m bench.shutdown --minutes 0.5
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SETUP = """
from django.contrib.auth import get_user_model
from functions.services import function_create, function_deploy
from tenancy.services import tenant_create

user = get_user_model().objects.create_user("bench", password="pw-bench-123456")
tenant = tenant_create(acting_user=user, slug="bench", name="Bench")
function = function_create(acting_user=user, tenant=tenant, name="hello", starter="hello")
revision = function_deploy(acting_user=user, function=function)
revision.refresh_from_db()
print("STATUS", revision.status, revision.status_message)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def portal_env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "SQLITE_PATH", "REDIS_URL", "NIMBUS_TESTING", "DJANGO_SETTINGS_MODULE")}
    env.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "1", "NIMBUS_DATA_DIR": str(data_dir),
                "NIMBUS_DEPLOY_INLINE": "1", "NIMBUS_SOCKET_DIR": str(data_dir / "sockets"),
                "ALLOWED_HOSTS": "127.0.0.1,localhost", "LOG_LEVEL": "WARNING"})
    return env


def prepare(env: dict) -> None:
    manage = [sys.executable, str(ROOT / "manage.py")]
    for args in (["migrate", "--noinput"], ["shell", "-c", SETUP]):
        result = subprocess.run(manage + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise SystemExit(result.stdout + result.stderr)
    if "STATUS ready" not in result.stdout:
        raise SystemExit(result.stdout)


def start_portal(env: dict, port: int, stderr) -> subprocess.Popen:
    daphne = Path(sys.executable).parent / "daphne"
    process = subprocess.Popen([str(daphne), "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
                               env=env, cwd=ROOT, stdout=stderr, stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the portal did not start (exit code {process.poll()})")
            time.sleep(0.1)


class Traffic:
    """Threads calling the function: synchronously, and as async calls the in-process worker delivers."""

    def __init__(self, port: int, threads: int = 4):
        self.base = f"http://127.0.0.1:{port}/fn/bench/hello/"
        self.stop = threading.Event()
        self.counts = {"sync": 0, "async": 0, "failed": 0}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def run(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            kind = "async" if (n + index) % 2 else "sync"
            headers = {"Prefer": "respond-async"} if kind == "async" else {}
            request = urllib.request.Request(f"{self.base}?name=n{index}-{n}", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
                    ok = response.status in (200, 202)
            except (OSError, urllib.error.HTTPError):
                ok = False
            with self.lock:
                self.counts[kind if ok else "failed"] += 1

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def measure(minutes: float, keep: bool = False) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="nimbus-bench-"))
    data_dir.chmod(0o711)  # the tenants' sandbox uids reach their code through it
    try:
        env = portal_env(data_dir)
        prepare(env)
        port = free_port()
        log_path = data_dir / "portal.log"
        with open(log_path, "wb") as log:
            portal = start_portal(env, port, log)
            traffic = Traffic(port)
            traffic.start()
            time.sleep(minutes * 60)
            traffic.finish()
            signalled = time.monotonic()
            portal.send_signal(signal.SIGTERM)
            try:
                code = portal.wait(timeout=60)
                stop_seconds = time.monotonic() - signalled
            except subprocess.TimeoutExpired:
                os.killpg(portal.pid, signal.SIGKILL)
                code = portal.wait()
                stop_seconds = float("inf")
        output = log_path.read_text(errors="replace")
        return {"minutes": minutes, "stop_seconds": stop_seconds, "exit_code": code, **traffic.counts,
                "tracebacks": output.count("Traceback"), "log": output if keep else ""}
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="Minutes of traffic before SIGTERM.")
    parser.add_argument("--show-log", action="store_true", help="Print the portal's output at the end.")
    args = parser.parse_args()
    result = measure(args.minutes, keep=args.show_log)
    if args.show_log:
        print(result["log"][-20000:])
    print(f"traffic: {args.minutes:g} min, {result['sync']} synchronous calls, {result['async']} async calls "
          f"accepted, {result['failed']} failed")
    print(f"stop after SIGTERM: {result['stop_seconds']:.2f} s, exit code {result['exit_code']}, "
          f"{result['tracebacks']} tracebacks in the portal's output")


if __name__ == "__main__":
    main()
