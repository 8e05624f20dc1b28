"""The local engine's CPU rate limit (a function's millicores): a userspace copy of the kernel's CFS
bandwidth control, for machines where the engine may not use cgroups.

One thread samples each instance's CPU time (its processes' utime + stime from /proc) once per
period; an instance that used more than its quota (millicores/1000 × period) is stopped (SIGSTOP)
for as long as repays the excess at its rate, then continued (SIGCONT). Coarser than CFS (an instance
may run a whole period before it is stopped, then stays stopped longer), the same share over time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

log = logging.getLogger(__name__)

PERIOD = 0.1
# A larger excess (several busy threads, or a long burst) is repaid over several stops, the rest
# carried over as debt: an instance is never frozen for seconds at a time.
MAX_STOP = 1.0
# /proc counts CPU time in clock ticks (10 ms): an excess below two ticks is measuring noise as often
# as not, so it is carried over as debt (and forgiven when the next period uses less) instead of a stop.
MIN_STOP = 0.02
# An idle instance (no request in flight, no child processes) costs one /proc read per period; its
# descendants are looked for only while it is busy, once it has had children, and every few periods.
DESCENDANT_SCAN_EVERY = 10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Decision(NamedTuple):
    stop: float  # seconds to keep the instance stopped (0: let it run)
    debt: float  # CPU seconds still owed after that stop, carried into the next period


def decide(*, millicores: int, period: float, used: float, debt: float = 0.0,
           max_stop: float = MAX_STOP, min_stop: float = MIN_STOP) -> Decision:
    """The throttle's rule, pure: an instance that used ``used`` CPU seconds during ``period``
    seconds, owing ``debt`` from before. Stopped for S seconds it earns S × millicores/1000 of quota,
    so it stops for (excess / rate). Unused quota is not banked (no burst), as in CFS without
    ``cpu.cfs_burst_us``. ``millicores`` ≤ 0 means unlimited."""
    if millicores <= 0:
        return Decision(0.0, 0.0)
    rate = millicores / 1000
    excess = debt + used - rate * period
    if excess <= 0:
        return Decision(0.0, 0.0)
    stop = excess / rate
    if stop < min_stop:
        return Decision(0.0, excess)
    if stop > max_stop:
        return Decision(max_stop, excess - max_stop * rate)
    return Decision(stop, 0.0)


def machine_millicores() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores * 1000


def limited(millicores: int, machine: int | None = None) -> bool:
    """Whether a CPU setting needs throttling here: not 0 (unlimited) and below the machine's cores."""
    return 0 < millicores < (machine if machine is not None else machine_millicores())


# ---- /proc ------------------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    return data[data.rfind(b")") + 2:].decode().split()


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads) and of its children it has waited for."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the name: state is fields[0]; utime, stime, cutime, cstime are stat fields 14-17.
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, T for stopped, Z, …), None when gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def parent_pid(pid: int) -> int | None:
    """The parent of a process (stat field 4), None when gone."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def children(pid: int) -> list[int]:
    found = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as file:
                found.extend(int(child) for child in file.read().split())
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


# ---- the throttle -----------------------------------------------------------------------------------------

@dataclass
class _Entry:
    key: str
    pid: int
    pidfd: int | None
    start_time: int | None
    millicores: int
    in_flight: Callable[[], bool]
    last_cpu: float
    last_time: float
    debt: float = 0.0
    stopped_until: float | None = None
    stopped_at: float = 0.0
    stopped_pids: list[int] = field(default_factory=list)
    had_descendants: bool = False
    on_throttled: Callable[[float], None] | None = None  # told each stop's length once it ends
    periods: int = 0
    throttled_periods: int = 0
    stopped_seconds: float = 0.0


class CpuThrottle:
    """Throttles every registered instance to its millicores, from one thread (started with the
    first registration, ended by close()). Every instance is sampled while it is registered, busy or
    not: work a handler leaves running after its answer (threads, child processes) uses the same
    CPU, and an idle sample costs one small /proc read."""

    def __init__(self, *, period: float = PERIOD, machine: int | None = None):
        self.period = period
        self.machine = machine if machine is not None else machine_millicores()
        self.lock = threading.Lock()
        self.entries: dict[str, _Entry] = {}
        self.wake = threading.Event()
        self.closed = False
        self.thread: threading.Thread | None = None

    def register(self, key: str, pid: int, millicores: int, *, in_flight: Callable[[], bool] = lambda: True,
                 on_throttled: Callable[[float], None] | None = None) -> bool:
        """Throttle host process ``pid`` (and its descendants) to ``millicores``; False when that
        setting needs no throttling here (or the process is gone)."""
        if not limited(millicores, self.machine) or self.closed:
            return False
        cpu = process_cpu_seconds(pid)
        if cpu is None:
            return False
        pidfd = None
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(pid)
        entry = _Entry(key=key, pid=pid, pidfd=pidfd, start_time=_start_time(pid), millicores=millicores,
                       in_flight=in_flight, last_cpu=cpu, last_time=time.monotonic(), on_throttled=on_throttled)
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self._release(old)
            self.entries[key] = entry
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="nimbus-cpu-throttle", daemon=True)
                self.thread.start()
        self.wake.set()
        return True

    def unregister(self, key: str) -> dict | None:
        """Stop throttling an instance, continuing it if it is stopped; its counters, if it had any."""
        with self.lock:
            entry = self.entries.pop(key, None)
            if entry is None:
                return None
            self._release(entry)
            return self._stats(entry)

    def stats(self, key: str) -> dict | None:
        with self.lock:
            entry = self.entries.get(key)
            return self._stats(entry) if entry is not None else None

    def close(self) -> None:
        """Continue every stopped instance and end the thread."""
        with self.lock:
            self.closed = True
            entries, self.entries = list(self.entries.values()), {}
            for entry in entries:
                self._release(entry)
        self.wake.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)

    # ---- inside (called with the lock held) ------------------------------------------------------------

    @staticmethod
    def _stats(entry: _Entry) -> dict:
        stopped = entry.stopped_seconds
        if entry.stopped_until is not None:
            stopped += time.monotonic() - entry.stopped_at
        return {"periods": entry.periods, "throttled_periods": entry.throttled_periods,
                "stopped_seconds": stopped, "stopped": entry.stopped_until is not None,
                "millicores": entry.millicores, "pid": entry.pid}

    def _signal_root(self, entry: _Entry, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if entry.pidfd is not None:
                signal.pidfd_send_signal(entry.pidfd, sig)
            else:
                os.kill(entry.pid, sig)

    def _stop(self, entry: _Entry, pids: list[int], until: float, now: float) -> None:
        # The instance's own process first, so that it forks nothing new while its children stop.
        self._signal_root(entry, signal.SIGSTOP)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        entry.stopped_pids = pids
        entry.stopped_until = until
        entry.stopped_at = now
        entry.throttled_periods += 1

    def _continue(self, entry: _Entry, now: float) -> None:
        for pid in entry.stopped_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
        self._signal_root(entry, signal.SIGCONT)
        entry.stopped_seconds += now - entry.stopped_at
        if entry.on_throttled is not None:
            try:
                entry.on_throttled(now - entry.stopped_at)
            except Exception:  # noqa: BLE001 - a metric must never keep an instance stopped
                log.exception("reporting a CPU throttle of %s failed", entry.key)
        entry.stopped_until = None
        entry.stopped_pids = []
        # The stop repaid the debt (decide() counted it); quota accrues again from now.
        entry.last_time = now

    def _release(self, entry: _Entry) -> None:
        if entry.stopped_until is not None:
            self._continue(entry, time.monotonic())
        if entry.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(entry.pidfd)
            entry.pidfd = None

    def _sample(self, entry: _Entry) -> tuple[float, list[int]] | None:
        if entry.start_time is not None and _start_time(entry.pid) != entry.start_time:
            return None  # exited (the pid may even name another process now)
        cpu = process_cpu_seconds(entry.pid)
        if cpu is None:
            return None
        pids: list[int] = []
        busy = False
        with contextlib.suppress(Exception):
            busy = bool(entry.in_flight())
        if busy or entry.had_descendants or entry.periods % DESCENDANT_SCAN_EVERY == 0:
            pids = descendants(entry.pid)
            entry.had_descendants = bool(pids)
            cpu += sum(process_cpu_seconds(pid) or 0.0 for pid in pids)
        return cpu, pids

    def _tick(self, now: float) -> float | None:
        """One pass; returns when the next is due (None: nothing to watch)."""
        due = None
        for entry in list(self.entries.values()):
            if entry.stopped_until is not None:
                if now < entry.stopped_until:
                    due = entry.stopped_until if due is None else min(due, entry.stopped_until)
                    continue
                self._continue(entry, now)
            elif now - entry.last_time >= self.period * 0.95:
                sample = self._sample(entry)
                if sample is not None:
                    cpu, pids = sample
                    # Descendants that came or went make the sum jump either way; never count less than 0.
                    used = max(0.0, cpu - entry.last_cpu)
                    decision = decide(millicores=entry.millicores, period=now - entry.last_time, used=used,
                                      debt=entry.debt)
                    entry.last_cpu, entry.last_time = cpu, now
                    entry.periods += 1
                    entry.debt = decision.debt
                    if decision.stop > 0:
                        self._stop(entry, pids, now + decision.stop, now)
                        due = entry.stopped_until if due is None else min(due, entry.stopped_until)
                        continue
                else:
                    entry.last_time = now  # gone: the pool unregisters it soon
            next_sample = entry.last_time + self.period
            due = next_sample if due is None else min(due, next_sample)
        return due

    def _run(self) -> None:
        while True:
            with self.lock:
                if self.closed:
                    return
                try:
                    due = self._tick(time.monotonic())
                except Exception:  # noqa: BLE001 - the throttle must outlive a bad sample
                    log.exception("CPU throttle pass failed")
                    due = time.monotonic() + self.period
            timeout = None if due is None else max(0.0, due - time.monotonic())
            self.wake.wait(timeout)
            self.wake.clear()
