"""The local engine's fork server for one revision: imports the runtime and the handler once,
then forks a ready-to-serve instance per request of the engine (cold start without an
interpreter start). Standard library only; it runs inside the same sandbox as its instances.

Control protocol: JSON messages over the SOCK_SEQPACKET socket on fd ``NIMBUS_ZYGOTE_FD`` (one per packet).
  engine -> {"op": "fork", "id": ..., "limits": {...}}  + the instance's listening socket (SCM_RIGHTS)
  zygote -> {"op": "hello"}  (first, before any of the function's code runs)
  instance -> {"op": "forked", "id": ...}  (sent by the new instance itself: the engine reads its pid
             from the kernel's SCM_CREDENTIALS, never from the message)
  zygote -> {"op": "error", "id": ..., "error": ...}
  engine -> {"op": "kill", "id": ...}
  zygote -> {"op": "exit", "id": ..., "code": ...}   (an instance ended, for whatever reason)
The zygote exits, killing its instances, when the engine closes the control connection. Every instance
is a child subreaper, and so is the zygote: what an instance leaves behind (a detached grandchild) comes
back to the zygote when the instance ends, and is killed.
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
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402

import nimbus_runtime as rt  # noqa: E402

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
LIMITS = {
    "as": resource.RLIMIT_AS,
    "node_data": resource.RLIMIT_DATA,
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
    def __init__(self, runtime: rt.Runtime, control: socket.socket):
        self.runtime = runtime
        self.conn = control
        self.children: dict[int, str] = {}
        self.libc = _libc()

    def run(self) -> None:
        rt.emit("INFO", "zygote ready" if self.runtime.load_error is None else "zygote could not import the handler",
                nimbus="zygote", ok=self.runtime.load_error is None, error=self.runtime.load_error)
        if self.runtime.load_error is not None:
            os._exit(1)  # the engine will not use a revision whose handler does not import
        if self.libc is not None:
            self.libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
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
        while True:
            for key, _ in selector.select():
                if key.fileobj is self.conn:
                    try:
                        data, fds, _, _ = socket.recv_fds(self.conn, 65536, 4)
                    except InterruptedError:
                        continue
                    except OSError:
                        data, fds = b"", []
                    if not data:
                        self.shutdown()
                    self.command(json.loads(data), fds)
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    self.reap()

    def send(self, message: dict) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(json.dumps(message).encode())

    def command(self, message: dict, fds: list[int]) -> None:
        op = message.get("op")
        if op == "fork" and fds:
            self.fork(message, fds[0])
            for extra in fds[1:]:
                os.close(extra)
            return
        for fd in fds:
            os.close(fd)
        if op == "fork":
            self.send({"op": "error", "id": message.get("id"), "error": "no listening socket came with the fork"})
        elif op == "kill":
            for pid, iid in list(self.children.items()):
                if iid == message.get("id"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        elif op == "stop":
            self.shutdown()

    def fork(self, message: dict, listening_fd: int) -> None:
        iid = str(message["id"])
        # The engine bound and listens on this socket before sending it: it may connect at once.
        listening = socket.socket(fileno=listening_fd)
        tmp = self.tmp_dir(iid)
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.mkdir(tmp, 0o700)
            pid = os.fork()
        except OSError as exc:
            listening.close()
            shutil.rmtree(tmp, ignore_errors=True)
            self.send({"op": "error", "id": iid, "error": f"{type(exc).__name__}: {exc}"})
            return
        if pid == 0:
            self.child(iid, listening, message)
        listening.close()
        self.children[pid] = iid

    def child(self, iid: str, listening: socket.socket, message: dict) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            if self.libc is not None:
                self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                self.libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
            os.environ["NIMBUS_INSTANCE"] = iid
            # The instance's own temporary folder (the revision's /tmp is a size-capped tmpfs whose
            # pages are charged to the memory of the instance that writes them); removed when it ends.
            os.environ["TMPDIR"] = os.environ["HOME"] = self.tmp_dir(iid)
            os.environ.update(message.get("env") or {})
            apply_limits(message.get("limits") or {})
            # Announced by the instance itself, so the kernel vouches for its pid; then the control
            # connection is the zygote's alone again.
            self.send({"op": "forked", "id": iid})
            self.conn.close()
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
                shutil.rmtree(self.tmp_dir(iid), ignore_errors=True)
                self.send({"op": "exit", "id": iid, "code": code})
        self.kill_orphans()

    @staticmethod
    def tmp_dir(iid: str) -> str:
        base = os.environ.get("NIMBUS_TMP_ROOT") or "/tmp"
        return os.path.join(base, "".join(c if c.isalnum() or c in "-_" else "_" for c in iid))

    def kill_orphans(self) -> None:
        """Kill every child that is not an instance: what an ended instance left running, handed to this
        subreaper. Their own children come back here in turn and are killed on the next SIGCHLD."""
        for pid in _own_children():
            if pid not in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def shutdown(self) -> None:
        for pid in set(self.children) | set(_own_children()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os._exit(0)


def _own_children() -> list[int]:
    pids = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as file:
                pids += [int(p) for p in file.read().split()]
    return pids


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
    rt.load_environment()
    control = socket.socket(fileno=int(os.environ.pop("NIMBUS_ZYGOTE_FD")))
    control.send(b'{"op": "hello"}')  # before the function's code: the engine learns the zygote's own pid
    rt.configure_output()
    # Small thread stacks and few malloc arenas keep an instance's address space near its real use,
    # so the memory limit (RLIMIT_AS) measures what the function allocates.
    threading.stack_size(1024 * 1024)
    runtime = rt.Runtime()
    runtime.load()
    _warm_up()
    Zygote(runtime, control).run()


if __name__ == "__main__":
    main()
