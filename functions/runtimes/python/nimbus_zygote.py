"""The local engine's fork server for one revision: imports the runtime and the handler once,
then forks a ready-to-serve instance per request of the engine (cold start without an
interpreter start). Standard library only; it runs inside the same sandbox as its instances.

Control protocol: JSON lines over the unix socket ``NIMBUS_ZYGOTE_SOCKET`` (one client, the engine).
  engine -> {"op": "fork", "id": ..., "socket": path, "limits": {...}, "env": {...}}
  zygote -> {"op": "forked", "id": ..., "pid": ...} | {"op": "error", "id": ..., "error": ...}
  engine -> {"op": "kill", "id": ...}
  zygote -> {"op": "exit", "id": ..., "code": ...}   (an instance ended, for whatever reason)
The zygote exits, killing its instances, when the engine closes the control connection.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import asyncio  # noqa: E402  (pre-imported here so that forked instances start warm)
import concurrent.futures.thread  # noqa: E402,F401
import contextlib  # noqa: E402
import gc  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402

import nimbus_runtime as rt  # noqa: E402

PR_SET_PDEATHSIG = 1
ACCEPT_TIMEOUT = 60.0
LIMITS = {
    "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "core": resource.RLIMIT_CORE,
}


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def apply_limits(limits: dict) -> None:
    for name, value in limits.items():
        which = LIMITS.get(name)
        if which is None or value is None:
            continue
        soft = hard = int(value)
        if name == "cpu":
            hard = soft + 5  # SIGXCPU at the soft limit, SIGKILL shortly after
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError) as exc:
            rt.emit("WARNING", f"could not set limit {name}={value}: {exc}")


class Zygote:
    def __init__(self, runtime: rt.Runtime, control_path: str):
        self.runtime = runtime
        self.control_path = control_path
        self.children: dict[int, str] = {}
        self.libc = _libc()

    def run(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
        listener.bind(self.control_path)
        listener.listen(1)
        rt.emit("INFO", "zygote ready" if self.runtime.load_error is None else "zygote could not import the handler",
                nimbus="zygote", ok=self.runtime.load_error is None, error=self.runtime.load_error)
        if self.runtime.load_error is not None:
            os._exit(1)  # the engine will not use a revision whose handler does not import
        # Only the engine connects, right after the ready line; if it never does, it is gone.
        listener.settimeout(ACCEPT_TIMEOUT)
        try:
            self.conn, _ = listener.accept()
        except OSError:
            os._exit(1)
        self.conn.settimeout(None)
        listener.close()
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self.shutdown())
        self.wake_w = wake_w
        selector = selectors.DefaultSelector()
        selector.register(self.conn, selectors.EVENT_READ)
        selector.register(self.wake_r, selectors.EVENT_READ)
        buffer = b""
        while True:
            for key, _ in selector.select():
                if key.fileobj is self.conn:
                    data = self.conn.recv(65536)
                    if not data:
                        self.shutdown()
                    buffer += data
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            self.command(json.loads(line))
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    self.reap()

    def send(self, message: dict) -> None:
        with contextlib.suppress(OSError):
            self.conn.sendall((json.dumps(message) + "\n").encode())

    def command(self, message: dict) -> None:
        op = message.get("op")
        if op == "fork":
            self.fork(message)
        elif op == "kill":
            for pid, iid in list(self.children.items()):
                if iid == message.get("id"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        elif op == "stop":
            self.shutdown()

    def fork(self, message: dict) -> None:
        iid, path = message["id"], message["socket"]
        try:
            listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            # Bound and listening before the fork: the engine may connect as soon as it hears back.
            listening.bind(path)
            listening.listen(512)
            pid = os.fork()
        except OSError as exc:
            self.send({"op": "error", "id": iid, "error": f"{type(exc).__name__}: {exc}"})
            return
        if pid == 0:
            self.child(iid, listening, message)
        listening.close()
        self.children[pid] = iid
        self.send({"op": "forked", "id": iid, "pid": pid})

    def child(self, iid: str, listening: socket.socket, message: dict) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.conn.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            if self.libc is not None:
                self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            os.environ.pop("NIMBUS_ZYGOTE_SOCKET", None)
            os.environ["NIMBUS_INSTANCE"] = iid
            os.environ.update(message.get("env") or {})
            apply_limits(message.get("limits") or {})
            asyncio.run(rt.serve(self.runtime, listening_sock=listening))
            code = 0
        except BaseException as exc:  # noqa: BLE001 - the engine learns of the exit; the log says why
            rt.emit("ERROR", f"instance {iid} stopped: {type(exc).__name__}: {exc}")
        finally:
            os._exit(code)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            iid = self.children.pop(pid, None)
            if iid is not None:
                code = os.waitstatus_to_exitcode(status)
                if code < 0 and -code == signal.SIGXCPU:
                    rt.emit("ERROR", f"instance {iid} used up its CPU time limit")
                self.send({"op": "exit", "id": iid, "code": code})

    def shutdown(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os._exit(0)


def _warm_up() -> None:
    """Run the server machinery once, so instances inherit it initialised rather than pay for it."""
    async def exercise():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server = await asyncio.start_unix_server(lambda r, w: None, sock=probe)
        server.close()
        await server.wait_closed()
        await asyncio.get_running_loop().run_in_executor(None, int)

    with contextlib.suppress(Exception):
        asyncio.run(exercise())
    # Objects that exist now are never collected in instances: no copy-on-write from the collector.
    gc.collect()
    gc.freeze()


def main() -> None:
    rt.configure_output()
    # Small thread stacks and few malloc arenas keep an instance's address space near its real use,
    # so the memory limit (RLIMIT_AS) measures what the function allocates.
    threading.stack_size(1024 * 1024)
    runtime = rt.Runtime()
    runtime.load()
    _warm_up()
    Zygote(runtime, os.environ["NIMBUS_ZYGOTE_SOCKET"]).run()


if __name__ == "__main__":
    main()
