"""Instances of one revision and the pool that hands them to requests: scale from zero, per-instance
concurrency, scale out to max instances, a bounded queue, idle scale-to-zero, min instances kept
warm, restart after a crash. Python instances are forked from a per-revision zygote (fork server);
Node instances (and Python without the zygote) are started as fresh processes."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from functions.engines.base import RevisionSpec
from functions.engines.local import cpu, sandbox
from functions.engines.local.resources import Group
from portal.errors import EngineError

log = logging.getLogger(__name__)

STARTING, READY, DEAD = "starting", "ready", "dead"
_group_numbers = itertools.count(1)
CREDENTIALS = struct.Struct("=iII")  # struct ucred: pid, uid, gid
ZYGOTE_START_TIMEOUT = 30.0
INSTANCE_START_TIMEOUT = 30.0


class Saturated(Exception):
    """Every instance is busy, the pool is at max instances and its queue is full."""


class InstanceFailed(Exception):
    """The instance could not start, or died."""


class PoolClosed(Exception):
    pass


class Instance:
    def __init__(self, pool: Pool, number: int):
        self.pool = pool
        self.id = f"{pool.spec.function.name}-{pool.spec.number}-{number}"
        self.socket_path = pool.socket_dir / f"i{number}.sock"
        self.state = STARTING
        self.busy = 0
        self.pid: int | None = None
        self.process: subprocess.Popen | None = None
        self.launched_at = time.monotonic()
        self.last_used = self.launched_at
        self.init_ms = 0.0
        self.ready: concurrent.futures.Future = concurrent.futures.Future()
        self.exited: concurrent.futures.Future = concurrent.futures.Future()
        self.exit_reason = ""
        self.cpu_stats: dict | None = None  # the CPU throttle's counters, once the instance has exited
        self.group: Group | None = None  # its cgroup (memory incl. its /tmp pages, processes, CPU)
        self.started: sandbox.Started | None = None  # its own sandbox (instances not forked by a zygote)
        # Keep-alive connections to the instance, each usable only on the event loop that opened it.
        self.idle_connections: list[tuple[asyncio.AbstractEventLoop, asyncio.StreamReader, asyncio.StreamWriter]] = []

    def __repr__(self):
        return f"Instance({self.id} {self.state} busy={self.busy})"


def _read_lines(stream, on_line) -> None:
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", "replace").rstrip("\n")
        if not text:
            continue
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            record = {"level": "INFO", "message": text}
        try:
            on_line(record)
        except Exception:  # noqa: BLE001 - a bad line never stops the reader
            log.exception("log line handler failed")
    stream.close()


class ZygoteLauncher:
    """One fork server per revision; instances are its children."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.process: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.send_lock = threading.Lock()
        self.start_lock = threading.Lock()
        self.pending: dict[str, Instance] = {}
        self.by_id: dict[str, Instance] = {}
        self.ready_line: concurrent.futures.Future | None = None
        self.group: Group | None = None
        self.started: sandbox.Started | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.control is not None

    def start(self) -> None:
        with self.start_lock:
            if self.alive:
                return
            self._stop_process()
            pool = self.pool
            engine_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            # Every message arrives with its sender's pid from the kernel (in this pid namespace): the
            # engine never acts on a pid that code in the sandbox merely claims.
            engine_end.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.zygote_pid = None
            argv, extra = sandbox.python_command(pool.layout, zygote=True, python=pool.isolation.python)
            # The fork server has its own cgroup, limited like an instance: what the handler allocates at
            # import (before any fork) is held to the function's memory.
            self.group = pool.new_group("z")
            launch = pool.launch(argv, extra, self.group, NIMBUS_ZYGOTE_FD=str(zygote_end.fileno()),
                                 NIMBUS_TMP_ROOT=pool.tmp_root())
            launch.pass_fds = (zygote_end.fileno(),)
            self.ready_line = concurrent.futures.Future()
            self.early_output = collections.deque(maxlen=50)
            spawned: concurrent.futures.Future = concurrent.futures.Future()
            # The thread that starts the fork server lives exactly as long as it (reading its output):
            # the parent-death signal (and bwrap's --die-with-parent) follow the spawning thread, so
            # the fork server dies with the portal, however the portal ends.
            threading.Thread(target=self._run_process, args=(launch, spawned),
                             name=f"zygote-{pool.spec.revision_id}", daemon=True).start()
            try:
                self.started = spawned.result()
            except BaseException:
                engine_end.close()
                self._discard_group()
                raise
            finally:
                zygote_end.close()
            self.process = self.started.process
            try:
                ready = self.ready_line.result(timeout=ZYGOTE_START_TIMEOUT)
            except concurrent.futures.TimeoutError:
                engine_end.close()
                self._stop_process()
                raise EngineError("The function's runtime did not start within "
                                  f"{ZYGOTE_START_TIMEOUT:.0f} s.") from None
            if not ready.get("ok"):
                engine_end.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=5)
                out_of_memory = self.group is not None and self.group.oom_killed()
                self._stop_process()
                if out_of_memory:
                    raise EngineError(f"Importing the handler needed more than the function's "
                                      f"{pool.spec.memory_mb} MB of memory.", details={"output": ready.get("error", "")})
                error = ready.get("error") or "the runtime exited before it was ready"
                raise EngineError(f"The handler could not be imported: {error.strip().splitlines()[-1]}",
                                  details={"output": error})
            self.control = engine_end
            threading.Thread(target=self._read_control, args=(engine_end,), name=f"zygote-ctl-{pool.spec.revision_id}",
                             daemon=True).start()

    def _run_process(self, launch: sandbox.Launch, spawned: concurrent.futures.Future) -> None:
        try:
            started = sandbox.start(launch)
        except BaseException as exc:  # noqa: BLE001 - handed to the thread waiting in start()
            spawned.set_exception(exc)
            return
        spawned.set_result(started)
        ready_line = self.ready_line
        _read_lines(started.process.stdout, self._on_line)
        started.process.wait()
        started.close()
        if ready_line is not None and not ready_line.done():
            output = "\n".join(str(r.get("message", "")) for r in self.early_output)
            ready_line.set_result({"ok": False, "error": output or f"exit status {started.process.returncode}"})

    def _on_line(self, record: dict) -> None:
        if record.get("nimbus") == "zygote":
            if self.ready_line is not None and not self.ready_line.done():
                self.ready_line.set_result(record)
            return
        if self.ready_line is not None and not self.ready_line.done():
            self.early_output.append(record)
        self.pool.on_log(record)

    def _read_control(self, control: socket.socket) -> None:
        while True:
            try:
                data, ancillary, _, _ = control.recvmsg(65536, socket.CMSG_SPACE(CREDENTIALS.size))
            except OSError:
                data = b""
            if not data:
                break
            sender = None
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(value) >= CREDENTIALS.size:
                    sender = CREDENTIALS.unpack_from(value)[0] or None
            try:
                message = json.loads(data)
                if isinstance(message, dict):
                    self._on_control(message, sender)
            except Exception:  # noqa: BLE001 - the sandbox's messages are untrusted: one bad one is dropped
                log.warning("revision %s: dropped a control message from the fork server",
                            self.pool.spec.revision_id, exc_info=True)
        # The fork server is gone, and its instances with it.
        with contextlib.suppress(OSError):
            control.close()
        if self.ready_line is not None and not self.ready_line.done():
            self.ready_line.set_result({"ok": False})
        for inst in list(self.by_id.values()):
            self.pool.instance_exited(inst, "the runtime's fork server stopped")
        self.by_id.clear()
        if self.control is control:
            self.control = None

    def _on_control(self, message: dict, sender: int | None) -> None:
        op, iid = message.get("op"), str(message.get("id"))
        if op == "hello":
            if self.zygote_pid is None:  # sent before any of the function's code ran
                self.zygote_pid = sender
        elif op == "forked":
            inst = self.by_id.get(iid)
            if inst is None or inst.pid is not None:
                return
            # Only a child of the fork server, speaking for itself, is an instance.
            if sender is None or sender == self.zygote_pid or cpu.parent_pid(sender) != self.zygote_pid:
                log.warning("revision %s: a fork report for %s not sent by a new instance was ignored",
                            self.pool.spec.revision_id, iid)
                return
            inst.pid = sender
            if inst.group is not None:
                # Into its own cgroup before it serves anything: the handler's calls, what it writes
                # to /tmp and any process it starts are the instance's from here on.
                try:
                    inst.group.add(sender)
                except OSError:
                    self._send({"op": "kill", "id": iid})
                    return
            self.pool.instance_ready(inst)
        elif op == "error":
            inst = self.by_id.pop(iid, None)
            if inst is not None:
                self.pool.instance_exited(inst, f"could not start: {message.get('error')}")
        elif op == "exit":
            inst = self.by_id.pop(iid, None)
            if inst is not None:
                code = message.get("code")
                self.pool.instance_exited(inst, _describe_exit(code if isinstance(code, int) else None,
                                                               self.pool.spec, inst.group))

    def launch(self, inst: Instance) -> None:
        if not self.alive:
            # Restarting the fork server blocks; keep that off the caller (maybe an event loop).
            threading.Thread(target=self._launch_after_restart, args=(inst,), daemon=True).start()
            return
        self._send_fork(inst)

    def _launch_after_restart(self, inst: Instance) -> None:
        try:
            self.start()
        except Exception as exc:  # noqa: BLE001 - reported through the instance
            self.pool.instance_exited(inst, f"the runtime could not restart: {exc}")
            return
        self._send_fork(inst)

    def _send_fork(self, inst: Instance) -> None:
        self.by_id[inst.id] = inst
        try:
            inst.group = self.pool.new_group("i")
            listening = self.pool.listen(inst)
        except OSError as exc:
            self.by_id.pop(inst.id, None)
            self.pool.instance_exited(inst, f"could not start: {exc}")
            return
        message = {"op": "fork", "id": inst.id, "limits": self.pool.rlimits()}
        with listening:
            sent = self._send(message, fds=[listening.fileno()])
        if not sent:
            self.by_id.pop(inst.id, None)
            self.pool.instance_exited(inst, "the runtime's fork server is not reachable")

    def _send(self, message: dict, fds: list[int] = ()) -> bool:
        control = self.control
        if control is None:
            return False
        try:
            with self.send_lock:
                socket.send_fds(control, [json.dumps(message).encode()], list(fds))
            return True
        except OSError:
            return False

    def kill(self, inst: Instance) -> None:
        # The fork server kills it and what it left behind; its cgroup goes (off this thread) when it exits.
        self._send({"op": "kill", "id": inst.id})

    def host_pid(self, inst: Instance) -> int | None:
        """The instance's pid on this machine (the kernel's word for it: SCM_CREDENTIALS)."""
        return inst.pid

    def _discard_group(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.remove()

    def _stop_process(self) -> None:
        control, self.control = self.control, None
        if control is not None:
            with contextlib.suppress(OSError):
                control.shutdown(socket.SHUT_RDWR)  # the fork server sees the end (close alone would not wake it)
            with contextlib.suppress(OSError):
                control.close()
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            # Closing the control connection makes the fork server stop its instances and exit, and
            # bubblewrap with it, each reaping its children; SIGKILL only if that does not happen.
            try:
                process.wait(timeout=2 if control is not None else 0.2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
        self._discard_group()

    def close(self) -> None:
        with self.start_lock:
            self._stop_process()


class ProcessLauncher:
    """A sandbox of its own per instance (Node; Python when the zygote is turned off)."""

    def __init__(self, pool: Pool):
        self.pool = pool

    def _launch(self, group: Group | None, **extra_env) -> sandbox.Launch:
        pool = self.pool
        if pool.spec.runtime.startswith("node"):
            argv, extra = sandbox.node_command(pool.layout, pool.spec.memory_mb)
        else:
            argv, extra = sandbox.python_command(pool.layout, zygote=False, python=pool.isolation.python)
        return pool.launch(argv, extra, group, **extra_env)

    def start(self) -> None:
        """Check that the handler imports (in a sandbox and cgroup like an instance's), so a broken
        revision fails its deploy."""
        group = self.pool.new_group("c")
        try:
            launch = self._launch(group, NIMBUS_CHECK="1")
            launch.stdin = subprocess.DEVNULL
            started = sandbox.start(launch, stderr=subprocess.STDOUT)
            try:
                output, _ = started.process.communicate(timeout=ZYGOTE_START_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(started.process.pid, signal.SIGKILL)
                started.process.wait()
                raise EngineError("Importing the handler took too long.") from None
            finally:
                started.close()
            if started.process.returncode != 0:
                output = _messages(output.decode("utf-8", "replace"))
                if group is not None and group.oom_killed():
                    raise EngineError(f"Importing the handler needed more than the function's "
                                      f"{self.pool.spec.memory_mb} MB of memory.", details={"output": output})
                raise EngineError(f"The handler could not be imported: {_error_line(output, started.process.returncode)}",
                                  details={"output": output})
        finally:
            if group is not None:
                group.remove()

    def launch(self, inst: Instance) -> None:
        threading.Thread(target=self._spawn, args=(inst,), daemon=True).start()

    def _spawn(self, inst: Instance) -> None:
        pool = self.pool
        group = None
        try:
            group = inst.group = pool.new_group("i")
            listening = pool.listen(inst)
        except OSError as exc:
            if group is not None:
                group.remove()
            pool.instance_exited(inst, f"could not start: {exc}")
            return
        with listening:
            launch = self._launch(group, NIMBUS_LISTEN_FD=str(listening.fileno()), NIMBUS_INSTANCE=inst.id)
            launch.pass_fds = (listening.fileno(),)
            launch.stdin = subprocess.PIPE
            try:
                started = sandbox.start(launch)
            except (OSError, EngineError) as exc:
                pool.instance_exited(inst, f"could not start: {exc}")
                return
        with pool.lock:
            inst.started = started
            inst.process = started.process
            inst.pid = started.pid
            gone = inst.state == DEAD
        if gone:  # stopped (pool closed, start timed out) while it was being started: end it now
            self.kill(inst)
            if group is not None and inst.group is None:
                group.remove()

        def on_line(record: dict) -> None:
            if record.get("nimbus") == "ready":
                pool.instance_ready(inst)
            else:
                pool.on_log(record)

        _read_lines(started.process.stdout, on_line)
        code = started.process.wait()
        started.close()
        pool.instance_exited(inst, _describe_exit(code, pool.spec, inst.group))

    def kill(self, inst: Instance) -> None:
        process = inst.process
        if process is not None and process.poll() is None:
            # Sandboxed: the sandbox's init (its pid namespace, and everything in it, ends with it);
            # else the process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if inst.pid and inst.pid != process.pid:
                    os.kill(inst.pid, signal.SIGKILL)
                else:
                    os.killpg(process.pid, signal.SIGKILL)

    def host_pid(self, inst: Instance) -> int | None:
        return inst.pid  # the process, or the sandbox's init (bubblewrap reports its host pid)

    def close(self) -> None:
        pass


def _messages(output: str) -> str:
    """Structured log lines back to their messages, for a readable deploy error."""
    lines = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
            lines.append(str(record.get("message", line)))
        except ValueError:
            lines.append(line)
    return "\n".join(lines)


def _error_line(output: str, code) -> str:
    """The line of an import failure that says what went wrong (Node puts it above the stack)."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return f"exit status {code}"
    return next((line for line in lines if re.search(r"\b[A-Z]\w*Error\b", line)), lines[-1])


def _describe_exit(code, spec: RevisionSpec, group: Group | None = None) -> str:
    if code is None:
        return "the instance stopped"
    if group is not None and group.oom_killed():
        return f"the instance ran out of memory (limit {spec.memory_mb} MB, its /tmp included)"
    if code == -signal.SIGKILL or code == 137:
        return f"the instance was killed (memory limit {spec.memory_mb} MB, timeout or scale-down)"
    if code == -signal.SIGXCPU:
        return "the instance used up its CPU time limit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a real-time signal has no name
            name = str(-code)
        return f"the instance died from signal {name}"
    return f"the instance exited with status {code}"


class Pool:
    """The instances of one revision."""

    def __init__(self, *, spec: RevisionSpec, layout: sandbox.Layout, socket_dir: Path, isolation: sandbox.Isolation,
                 settings: dict, on_log, use_zygote: bool, cpu_throttle: cpu.CpuThrottle | None = None):
        self.spec = spec
        self.cpu_throttle = cpu_throttle
        self.layout = layout
        self.isolation = isolation
        # The engine's own folder (root's, mode 0700): the instances' sockets are bound here by the engine
        # and handed to them; nothing inside a sandbox can write here or reach another tenant's.
        self.socket_dir = socket_dir
        self.private_tmp: str | None = None
        self.settings = settings
        self.on_log = on_log
        self.lock = threading.Lock()
        self.instances: dict[str, Instance] = {}
        self.waiters: collections.deque = collections.deque()
        self.counter = itertools.count(1)
        self.closed = False
        self.retired = False  # no new requests; closed once the last one finishes
        self.cold_starts = 0
        self.created_at = time.monotonic()
        python = spec.runtime.startswith("python")
        self.launcher = ZygoteLauncher(self) if (python and use_zygote) else ProcessLauncher(self)

    @property
    def concurrency(self) -> int:
        return self.spec.concurrency

    @property
    def queue_limit(self) -> int:
        return int(self.settings.get("QUEUE_LIMIT", 100))

    def start(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.socket_dir, 0o700)
        self.launcher.start()

    # ---- what the launchers share ----------------------------------------------------------------

    def new_group(self, kind: str) -> Group | None:
        """A cgroup for one sandboxed process of this revision (None where rlimits stand in)."""
        spec = self.spec
        return self.isolation.resources.group(
            f"{kind}{spec.revision_id}-{next(_group_numbers)}", memory_bytes=spec.memory_mb * 1024 * 1024,
            pids_max=int(self.settings.get("INSTANCE_PROCESSES", 256)),
            cpu_millicores=spec.cpu_millicores if cpu.limited(spec.cpu_millicores) else None)

    def tmp_root(self) -> str:
        """Where instances keep their temporary folders: the sandbox's own /tmp, or without a sandbox a
        private folder of the tenant's uid (never the host's shared /tmp)."""
        if self.layout.sandboxed:
            return "/tmp"
        if self.private_tmp is None:
            self.private_tmp = tempfile.mkdtemp(prefix=f"nimbus-{self.spec.revision_id}-")
            identity = self.isolation.identity
            if identity is not None:
                os.chown(self.private_tmp, identity.uid, identity.gid)
        return self.private_tmp

    def rlimits(self) -> dict:
        return sandbox.limits(self.spec, self.settings, cgroups=self.isolation.resources.kind != "rlimit")

    def listen(self, inst: Instance) -> socket.socket:
        """The instance's listening socket, bound by the engine at its path and handed to the instance."""
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                inst.socket_path.unlink()
            listening.bind(str(inst.socket_path))
            listening.listen(512)
        except OSError:
            listening.close()
            raise
        return listening

    def launch(self, argv: list[str], extra_ro: list[str], group: Group | None, **extra_env: str) -> sandbox.Launch:
        spec = self.spec
        return sandbox.Launch(
            argv=argv, layout=self.layout, env=sandbox.platform_env(spec, self.layout, **extra_env),
            secret_env=sandbox.function_env(spec), identity=self.isolation.identity, rlimits=self.rlimits(),
            group=group, egress=spec.allow_egress, allow_cidrs=self.isolation.allow_cidrs,
            tmp_bytes=spec.memory_mb * 1024 * 1024, extra_ro=extra_ro)

    # ---- acquire / release ------------------------------------------------------------------

    def _has_room(self, inst: Instance) -> bool:
        return self.concurrency == 0 or inst.busy < self.concurrency

    def _pick_locked(self) -> Instance | None:
        best = None
        for inst in self.instances.values():
            if inst.state == DEAD or not self._has_room(inst):
                continue
            # Prefer a ready instance, then the least busy one (spreads load when concurrency > 1).
            rank = (inst.state != READY, inst.busy)
            if best is None or rank < best[0]:
                best = (rank, inst)
        return best[1] if best else None

    def _new_instance_locked(self) -> Instance:
        inst = Instance(self, next(self.counter))
        self.instances[inst.id] = inst
        self.cold_starts += 1
        return inst

    async def acquire(self) -> tuple[Instance, bool, float]:
        """An instance with a free slot: (instance, cold start, ms spent queued)."""
        started = time.monotonic()
        launch = None
        future = None
        with self.lock:
            if self.closed or self.retired:
                raise PoolClosed()
            inst = self._pick_locked()
            if inst is None and len(self.instances) < self.spec.max_instances:
                inst = launch = self._new_instance_locked()
            if inst is not None:
                inst.busy += 1
                # Decided now, under the lock: the start may complete on another thread any moment.
                cold = inst.state != READY
            elif len(self.waiters) < self.queue_limit:
                future = asyncio.get_running_loop().create_future()
                self.waiters.append(future)
            else:
                raise Saturated()
        if launch is not None:
            self.launcher.launch(launch)
        if future is not None:
            try:
                inst, cold = await future
            except asyncio.CancelledError:
                with self.lock:
                    with contextlib.suppress(ValueError):
                        self.waiters.remove(future)
                raise
        if inst.state != READY:
            try:
                await asyncio.wait_for(asyncio.wrap_future(inst.ready), INSTANCE_START_TIMEOUT)
            except (Exception, asyncio.CancelledError) as exc:
                self.release(inst)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if isinstance(exc, asyncio.TimeoutError) and inst.state == STARTING:
                    # It counts against max instances and holds a sandbox: not left half-started.
                    await asyncio.to_thread(self.kill, inst, "the instance did not start in time")
                raise InstanceFailed(inst.exit_reason or f"the instance did not start: {exc}") from None
        return inst, cold, (time.monotonic() - started) * 1000

    def acquire_sync(self, timeout: float = INSTANCE_START_TIMEOUT) -> Instance:
        """Start (or reuse) an instance from a thread without an event loop (deploy health checks)."""
        with self.lock:
            inst = self._pick_locked()
            launch = None
            if inst is None:
                if len(self.instances) >= self.spec.max_instances:
                    raise Saturated()
                inst = launch = self._new_instance_locked()
            inst.busy += 1
        if launch is not None:
            self.launcher.launch(launch)
        try:
            inst.ready.result(timeout=timeout)
        except Exception as exc:
            self.release(inst)
            if isinstance(exc, concurrent.futures.TimeoutError) and inst.state == STARTING:
                self.kill(inst, "the instance did not start in time")
            raise InstanceFailed(inst.exit_reason or "the instance did not start in time") from None
        return inst

    def release(self, inst: Instance) -> None:
        launch = None
        with self.lock:
            inst.last_used = time.monotonic()
            if inst.state != DEAD and self._hand_to_waiter_locked(inst):
                return
            inst.busy = max(0, inst.busy - 1)
            if inst.state == DEAD and self.waiters and len(self.instances) < self.spec.max_instances:
                launch = self._new_instance_locked()
                launch.busy = 1
                if not self._hand_to_waiter_locked(launch):
                    launch.busy = 0
        if launch is not None:
            self.launcher.launch(launch)
        if self.retired:
            self.close_if_drained()

    def _hand_to_waiter_locked(self, inst: Instance) -> bool:
        while self.waiters:
            future = self.waiters.popleft()
            if future.done():
                continue
            loop = future.get_loop()
            loop.call_soon_threadsafe(self._resolve_waiter, future, inst, inst.state != READY)
            return True
        return False

    def _resolve_waiter(self, future: asyncio.Future, inst: Instance, cold: bool) -> None:
        if future.done():  # the waiter gave up in between: pass the slot on
            self.release(inst)
        else:
            future.set_result((inst, cold))

    # ---- lifecycle callbacks -----------------------------------------------------------------

    def instance_ready(self, inst: Instance) -> None:
        with self.lock:
            if inst.state != STARTING:
                return
            inst.state = READY
            inst.init_ms = (time.monotonic() - inst.launched_at) * 1000
            inst.last_used = time.monotonic()
        self._throttle(inst)
        if not inst.ready.done():
            inst.ready.set_result(inst)

    def _throttle(self, inst: Instance) -> None:
        """Hold the instance to the revision's millicores (engine.py's CPU throttle, when on)."""
        throttle = self.cpu_throttle
        if throttle is None or not cpu.limited(self.spec.cpu_millicores, throttle.machine):
            return
        pid = self.launcher.host_pid(inst)
        if pid is None:
            log.warning("instance %s: no host pid, its CPU is not throttled", inst.id)
            return
        from observability import identity, metrics

        ref = self.spec.function
        labels = {"tenant": ref.tenant, "namespace": identity.namespace_for(ref.tenant), "function": ref.name,
                  "service": identity.service_for(ref.name), "revision": identity.revision_for(ref.name,
                                                                                                self.spec.number)}
        throttle.register(inst.id, pid, self.spec.cpu_millicores, in_flight=lambda: inst.busy > 0,
                          on_throttled=lambda seconds: metrics.cpu_throttled(labels, seconds))
        if inst.state == DEAD:  # exited meanwhile, before it was registered
            inst.cpu_stats = throttle.unregister(inst.id)

    def instance_exited(self, inst: Instance, reason: str) -> None:
        launch = None
        with self.lock:
            if inst.state == DEAD:
                return
            was_starting = inst.state == STARTING
            inst.state = DEAD
            inst.exit_reason = reason
            self.instances.pop(inst.id, None)
            connections, inst.idle_connections = inst.idle_connections, []
            # Requests queued behind this instance get a fresh one.
            if self.waiters and not self.closed and not self.retired \
                    and len(self.instances) < self.spec.max_instances:
                launch = self._new_instance_locked()
                launch.busy = 1
                if not self._hand_to_waiter_locked(launch):
                    launch.busy = 0
        if self.cpu_throttle is not None:
            # Continued if stopped: a killed process dies either way, one that lingers must not stay stopped.
            inst.cpu_stats = self.cpu_throttle.unregister(inst.id)
        for loop, _, writer in connections:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(writer.close)
        if not inst.ready.done():
            inst.ready.set_exception(InstanceFailed(reason))
        if not inst.exited.done():
            inst.exited.set_result(reason)
        with contextlib.suppress(FileNotFoundError, OSError):
            inst.socket_path.unlink()
        if inst.started is not None:
            inst.started.close()
        group, inst.group = inst.group, None
        if group is not None:
            # Whatever the instance left running dies with its cgroup (off this thread: it may wait).
            threading.Thread(target=group.remove, name=f"cgroup-{inst.id}", daemon=True).start()
        if not self.closed and (was_starting or "killed" not in reason or inst.busy):
            self.on_log({"level": "WARNING", "message": f"instance {inst.id}: {reason}", "instance": inst.id})
        if launch is not None:
            self.launcher.launch(launch)

    def kill(self, inst: Instance, reason: str) -> None:
        """Stop an instance now (timeout, scale-down); it leaves the pool at once."""
        self.launcher.kill(inst)
        self.instance_exited(inst, reason)

    # ---- upkeep ----------------------------------------------------------------------------------

    def upkeep(self, idle_seconds: float) -> None:
        """Scale idle instances down to min instances; keep min instances running."""
        if self.closed:
            return
        now = time.monotonic()
        to_stop = []
        with self.lock:
            live = [i for i in self.instances.values() if i.state != DEAD]
            surplus = len(live) - (0 if self.retired else self.spec.min_instances)
            idle = sorted((i for i in live if i.state == READY and i.busy == 0 and now - i.last_used >= idle_seconds),
                          key=lambda i: i.last_used)
            to_stop = idle[:max(0, surplus)]
            missing = 0 if self.retired else self.spec.min_instances - len(live)
        for inst in to_stop:
            self.kill(inst, "scaled down after idling")
        for _ in range(max(0, missing)):
            try:
                inst = self.acquire_sync()
            except (Saturated, InstanceFailed) as exc:
                self.on_log({"level": "WARNING", "message": f"could not keep a warm instance: {exc}"})
                break
            self.release(inst)

    def retire(self) -> None:
        self.retired = True
        self.close_if_drained()

    def close_if_drained(self) -> None:
        with self.lock:
            busy = any(i.busy for i in self.instances.values())
        if not busy:
            self.close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            instances = list(self.instances.values())
            waiters, self.waiters = list(self.waiters), collections.deque()
        for future in waiters:
            with contextlib.suppress(RuntimeError):
                future.get_loop().call_soon_threadsafe(
                    lambda f=future: f.done() or f.set_exception(PoolClosed()))
        for inst in instances:
            self.launcher.kill(inst)
            self.instance_exited(inst, "the revision stopped")
        self.launcher.close()
        with contextlib.suppress(OSError):
            for path in Path(self.socket_dir).iterdir():
                path.unlink()
            os.rmdir(self.socket_dir)
        if self.private_tmp is not None:
            shutil.rmtree(self.private_tmp, ignore_errors=True)

    def snapshot(self) -> dict:
        with self.lock:
            return {"instances": sum(1 for i in self.instances.values() if i.state != DEAD),
                    "busy": sum(i.busy for i in self.instances.values()), "queued": len(self.waiters)}
