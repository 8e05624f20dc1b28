"""The local engine's resource controller: one cgroup per sandbox (fork server or instance) holding its
memory, processes and CPU share, and the way to kill all of it; "rlimit" where cgroups are not writable."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

# Memory: tmpfs/shmem pages are charged to the memory cgroup of the process that writes them (v1 and v2),
# so a sandbox's private /tmp on tmpfs counts against its memory limit; the engine relies on that to bound
# /tmp without a size= per instance. With swap capped too, such pages cannot be pushed out, so a writer
# over the limit is OOM-killed like any other allocator.

# v1 hierarchies a group spans. memory is required; the others are used where mounted and writable
# (describe() and Controller.controllers say which). freezer only serves kill_all.
V1_HIERARCHIES = ("memory", "pids", "cpu", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
# The kernel refuses a CFS quota below 1 ms.
MIN_CPU_QUOTA_US = 1_000
# On v2 a cgroup with processes cannot hand controllers to children ("no internal processes"): the
# portal (and whatever shares its cgroup) moves into this leaf first. Fixed, not per prefix, so a
# second controller in the same process recognises it and nests beside it instead of inside it.
PORTAL_LEAF = "nimbus-portal"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
# rmdir of a group whose processes were just killed can briefly fail with EBUSY while they exit.
RMDIR_RETRY_SECONDS = 1.0

_parent_sequence = itertools.count(1)


class ResourceControlUnavailable(RuntimeError):
    """cgroups cannot be used here (not mounted, read-only, not root, memory controller missing)."""


def read_self_cgroup() -> str:
    return _read("/proc/self/cgroup") or ""


# ---- small file helpers ---------------------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # gone, or (ENODEV) a group being removed
        return None


def _write(path: str, value: str) -> None:
    """One write(2) per value, as cgroup files expect. O_CREAT is harmless on cgroupfs for an existing
    file (creating a missing one fails with EACCES), and lets the tests use a plain directory tree."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _try_write(path: str, value: str) -> bool:
    """For settings that are nice to have (absent on some kernels/configurations)."""
    try:
        _write(path, value)
        return True
    except OSError as exc:
        log.debug("cgroup: could not write %r to %s: %s", value, path, exc)
        return False


def _procs(directory: str) -> list[int]:
    text = _read(os.path.join(directory, "cgroup.procs"))
    return [int(line) for line in text.split()] if text else []


def _tokens(path: str) -> set[str]:
    """Controllers listed in cgroup.controllers / cgroup.subtree_control (the fake trees store "+x")."""
    return {token.lstrip("+") for token in (_read(path) or "").split()}


def _rmdir(path: str, deadline: float, on_busy: Callable[[], None] | None = None) -> bool:
    """True when the directory is gone (also when it already was)."""
    delay = 0.005
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                log.warning("cgroup: could not remove %s: %s", path, exc)
                return False
        if on_busy is not None:
            on_busy()
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """/proc/<pid>/cgroup → ({v1 controller: path}, v2 path or None)."""
    v1: dict[str, str] = {}
    v2 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            v2 = path
        else:
            for controller in controllers.split(","):
                v1[controller] = path
    return v1, v2


def _mount_root(mountpoint: str) -> str | None:
    """The root inside the cgroup filesystem of the mount at ``mountpoint`` (not "/" in a container
    that sees its own cgroup as the mount's top while /proc/self/cgroup shows the full path)."""
    text = _read("/proc/self/mountinfo") or ""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == mountpoint:
            return fields[3]
    return None


def _own_dir(mount: str, path: str) -> str | None:
    """The directory of our own cgroup in the hierarchy mounted at ``mount``."""
    candidate = os.path.join(mount, path.lstrip("/"))
    if os.path.isdir(candidate):
        return candidate
    mount_root = _mount_root(os.path.realpath(mount))
    if mount_root and mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        candidate = os.path.join(mount, path[len(mount_root):].lstrip("/"))
        if os.path.isdir(candidate):
            return candidate
    return None


def _check_name(name: str) -> None:
    # No dots: a v1/v2 group directory sits beside control files such as "memory.max" and "cgroup.procs".
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid resource group name {name!r} (letters, digits, '-' and '_', at most 63)")


def _check_limits(memory_bytes, pids_max, cpu_millicores) -> None:
    for label, value, minimum in (("memory_bytes", memory_bytes, 1), ("pids_max", pids_max, 1),
                                  ("cpu_millicores", cpu_millicores, 0)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise ValueError(f"{label} must be an integer ≥ {minimum} or None, not {value!r}")


def _cpu_quota_us(millicores: int, period_us: int) -> int:
    return max(MIN_CPU_QUOTA_US, millicores * period_us // 1000)


# ---- groups ---------------------------------------------------------------------------------------------

class Group:
    """One cgroup (across the memory, pids, cpu and freezer hierarchies on v1; one directory on v2)
    holding one sandbox: a fork server or one instance."""

    name: str

    def __init__(self, controller: Controller, name: str, dirs: dict[str, str]):
        self.name = name
        self._controller = controller
        # hierarchy (or "unified" on v2) → directory.
        self._dirs = dirs
        self._removed = False

    @property
    def directories(self) -> list[str]:
        """Each distinct directory once (co-mounted v1 hierarchies such as cpu,cpuacct share one)."""
        seen: dict[str, None] = {}
        for directory in self._dirs.values():
            seen.setdefault(os.path.realpath(directory), None)
        return list(seen)

    def _main_dir(self) -> str:
        raise NotImplementedError

    def procs_fds(self) -> list[int]:
        """Freshly opened write-only descriptors of each hierarchy's cgroup.procs. A child joins by writing
        str(os.getpid()) to each in preexec_fn, before exec, so everything the program does is counted
        from its first instruction. They are close-on-exec (the program never holds them); the caller
        closes them after the spawn."""
        fds: list[int] = []
        try:
            for directory in self.directories:
                fds.append(os.open(os.path.join(directory, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def add(self, pid: int) -> None:
        """Move a running process into the group: the whole process (all its threads), not its existing
        children, on v1 and v2 alike (on v1 hierarchy by hierarchy, so a process that forks meanwhile may
        leave a child half-moved: add processes that are not forking). Memory it already uses stays
        charged where it was; only what it allocates from now on counts here. ProcessLookupError when
        ``pid`` is gone."""
        for directory in self.directories:
            _write(os.path.join(directory, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        """Every process in the group."""
        return sorted(_procs(self._main_dir()))

    def _all_pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.directories:
            found.update(_procs(directory))
        return found

    def _freeze(self) -> bool:
        """Stop every process in the group (so none can fork while being killed); False if not possible."""
        return False

    def _thaw(self) -> None:
        pass

    def _kill_pass(self) -> bool:
        """SIGKILL whatever is in the group now; False when it was empty."""
        me = os.getpid()
        pids = self._all_pids()
        pids.discard(me)  # never the portal itself, should it have been put here by mistake
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return bool(pids)

    def kill_all(self, timeout: float = 2.0) -> None:
        """SIGKILL every process in the group until it is empty (or ``timeout`` seconds have passed, which
        is logged: a process stuck in uninterruptible sleep dies only when the kernel lets it). The group
        is frozen first where the kernel can (v1 freezer, v2 cgroup.freeze), so a fork bomb cannot
        replace its members faster than they are killed; without it, repeated passes still win because
        a process with a pending SIGKILL cannot fork and pids.max bounds how many there are."""
        deadline = time.monotonic() + timeout
        frozen = self._freeze_for_kill(deadline)
        try:
            self._kill_pass()
        finally:
            if frozen:
                self._thaw()
        self._wait_empty(deadline)

    def _freeze_for_kill(self, deadline: float) -> bool:
        return self._freeze()

    def _wait_empty(self, deadline: float) -> None:
        delay = 0.001
        while self._kill_pass():
            if time.monotonic() >= deadline:
                left = sorted(self._all_pids())
                if left:
                    log.warning("cgroup %s: processes %s still there after kill_all", self.name, left)
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def oom_killed(self) -> bool:
        raise NotImplementedError

    def memory_peak(self) -> int | None:
        raise NotImplementedError

    def remove(self) -> None:
        """Kill everything in the group, then remove its directories. Idempotent; a group already gone
        (or half gone) is not an error. A directory that stays busy is logged and left behind."""
        if self._removed:
            return
        self.kill_all()
        deadline = time.monotonic() + RMDIR_RETRY_SECONDS
        gone = all([_rmdir(directory, deadline, on_busy=self._kill_pass) for directory in self.directories])
        if gone:
            self._removed = True
            self._controller._forget(self)

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} {self.directories}>"


class _V1Group(Group):
    def _main_dir(self) -> str:
        return self._dirs.get("pids") or self._dirs["memory"]

    def _freeze(self) -> bool:
        freezer = self._dirs.get("freezer")
        return bool(freezer) and _try_write(os.path.join(freezer, "freezer.state"), "FROZEN")

    def _freeze_for_kill(self, deadline: float) -> bool:
        if not self._freeze():
            return False
        # FREEZING until every task has stopped; kill anyway after a short while (a task in
        # uninterruptible sleep can hold it there).
        state_path = os.path.join(self._dirs["freezer"], "freezer.state")
        wait_until = min(deadline, time.monotonic() + 0.2)
        while (_read(state_path) or "").strip() == "FREEZING" and time.monotonic() < wait_until:
            time.sleep(0.001)
        return True

    def _thaw(self) -> None:
        # Killed while frozen, the processes die as they thaw.
        _try_write(os.path.join(self._dirs["freezer"], "freezer.state"), "THAWED")

    def oom_killed(self) -> bool:
        memory = self._dirs["memory"]
        control = _read(os.path.join(memory, "memory.oom_control")) or ""
        for line in control.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
        # Kernels before 4.13 do not count OOM kills; the group having hit its limit at all is the
        # nearest sign (it can also mean page cache was reclaimed at the limit, without a kill).
        failcnt = (_read(os.path.join(memory, "memory.failcnt")) or "0").strip()
        return int(failcnt or 0) > 0

    def memory_peak(self) -> int | None:
        text = _read(os.path.join(self._dirs["memory"], "memory.max_usage_in_bytes"))
        return int(text) if text and text.strip() else None


class _V2Group(Group):
    def _main_dir(self) -> str:
        return self._dirs["unified"]

    def kill_all(self, timeout: float = 2.0) -> None:
        directory = self._dirs["unified"]
        # cgroup.kill (5.14+) kills the whole subtree atomically, forks included.
        if os.path.exists(os.path.join(directory, "cgroup.kill")) and _try_write(
                os.path.join(directory, "cgroup.kill"), "1"):
            self._wait_empty(time.monotonic() + timeout)
            return
        super().kill_all(timeout)

    def _freeze(self) -> bool:
        path = os.path.join(self._dirs["unified"], "cgroup.freeze")
        return os.path.exists(path) and _try_write(path, "1")

    def _freeze_for_kill(self, deadline: float) -> bool:
        if not self._freeze():
            return False
        events = os.path.join(self._dirs["unified"], "cgroup.events")
        wait_until = min(deadline, time.monotonic() + 0.2)
        while "frozen 1" not in (_read(events) or "") and time.monotonic() < wait_until:
            time.sleep(0.001)
        return True

    def _thaw(self) -> None:
        _try_write(os.path.join(self._dirs["unified"], "cgroup.freeze"), "0")

    def _events(self) -> dict[str, int]:
        text = _read(os.path.join(self._dirs["unified"], "memory.events")) or ""
        events = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                events[key] = int(value)
        return events

    def oom_killed(self) -> bool:
        return self._events().get("oom_kill", 0) > 0

    def memory_peak(self) -> int | None:
        text = _read(os.path.join(self._dirs["unified"], "memory.peak"))  # 5.19+
        return int(text) if text and text.strip() else None


# ---- controllers ----------------------------------------------------------------------------------------

class Controller:
    """Makes the engine's groups. Each controller has a parent group of its own,
    ``<own cgroup>/<prefix>-<pid>-<n>`` in each hierarchy, so several engines in one process don't
    collide and the portal's own limits still bound every sandbox."""

    kind: str = ""
    controllers: tuple[str, ...] = ()  # which limits group() enforces

    def __init__(self):
        self._groups: dict[str, Group] = {}
        self._lock = threading.Lock()
        self._closed = False

    def describe(self) -> str:
        raise NotImplementedError

    def group(self, name: str, *, memory_bytes: int | None, pids_max: int | None,
              cpu_millicores: int | None) -> Group | None:
        """A new group ``name`` with these limits (None: unlimited; cpu 0 too). The memory limit covers
        swap as well (no extra swap), so it cannot be dodged by swapping out."""
        _check_name(name)
        _check_limits(memory_bytes, pids_max, cpu_millicores)
        with self._lock:
            if self._closed:
                raise RuntimeError("resource controller is closed")
            if name in self._groups:
                raise ValueError(f"resource group {name!r} exists")
            group = self._make(name, memory_bytes, pids_max, cpu_millicores)
            if group is not None:
                self._groups[name] = group
            return group

    def _make(self, name, memory_bytes, pids_max, cpu_millicores) -> Group | None:
        raise NotImplementedError

    def _forget(self, group: Group) -> None:
        with self._lock:
            if self._groups.get(group.name) is group:
                del self._groups[group.name]

    def groups(self) -> list[Group]:
        with self._lock:
            return list(self._groups.values())

    def close(self) -> None:
        """Remove every group this controller made, then its own parent group."""
        with self._lock:
            self._closed = True
        for group in self.groups():
            group.remove()
        self._remove_parent()

    def _remove_parent(self) -> None:
        pass


class RlimitController(Controller):
    """No cgroups: the engine limits each process with setrlimit (and its CPU throttle)."""

    kind = "rlimit"

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason

    def describe(self) -> str:
        return f"rlimit (per-process setrlimit, no cgroups: {self.reason})"

    def _make(self, name, memory_bytes, pids_max, cpu_millicores) -> None:
        return None


class _CgroupController(Controller):
    _group_class: type[Group]

    def __init__(self, parents: dict[str, str], controllers: tuple[str, ...], notes: list[str]):
        super().__init__()
        self._parents = parents  # hierarchy → this controller's parent directory
        self.controllers = controllers
        self._notes = notes

    @property
    def parent_dirs(self) -> list[str]:
        return list(dict.fromkeys(self._parents.values()))

    def _make(self, name, memory_bytes, pids_max, cpu_millicores) -> Group:
        dirs = {hierarchy: os.path.join(parent, name) for hierarchy, parent in self._parents.items()}
        made: list[str] = []
        try:
            for directory in dict.fromkeys(dirs.values()):
                os.mkdir(directory)
                made.append(directory)
            self._limit(dirs, memory_bytes, pids_max, cpu_millicores)
        except BaseException:
            for directory in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
            raise
        return self._group_class(self, name, dirs)

    def _limit(self, dirs, memory_bytes, pids_max, cpu_millicores) -> None:
        raise NotImplementedError

    def _remove_parent(self) -> None:
        deadline = time.monotonic() + RMDIR_RETRY_SECONDS
        for directory in self.parent_dirs:
            _rmdir(directory, deadline)


class CgroupV1Controller(_CgroupController):
    kind = "cgroup-v1"
    _group_class = _V1Group

    def __init__(self, parents: dict[str, str], controllers: tuple[str, ...], notes: list[str],
                 mounts: dict[str, str]):
        super().__init__(parents, controllers, notes)
        self._mounts = mounts  # hierarchy → its mount point, for describe()

    def describe(self) -> str:
        by_rest: dict[tuple[str, str], list[str]] = {}
        for hierarchy, parent in self._parents.items():
            mount, rest = self._mounts[hierarchy], os.path.relpath(parent, self._mounts[hierarchy])
            by_rest.setdefault((os.path.dirname(mount), rest), []).append(os.path.basename(mount))
        places = ", ".join(f"{base}/{names[0] if len(names) == 1 else '{' + ','.join(names) + '}'}/{rest}"
                           for (base, rest), names in by_rest.items())
        limits = ", ".join(c for c in self.controllers)
        extra = "; freezer for kill_all" if "freezer" in self._parents else ""
        notes = f"; {'; '.join(self._notes)}" if self._notes else ""
        return f"cgroup v1 ({limits}{extra}) under {places}{notes}"

    def _limit(self, dirs, memory_bytes, pids_max, cpu_millicores) -> None:
        memory = dirs["memory"]
        if memory_bytes is not None:
            _write(os.path.join(memory, "memory.limit_in_bytes"), str(memory_bytes))
            # memsw is memory + swap: the same number means no swap on top. Present only with swap
            # accounting (CONFIG_MEMCG_SWAP / swapaccount=1); without it a swapped page escapes the limit.
            memsw = os.path.join(memory, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                _write(memsw, str(memory_bytes))
        # Keep a sandbox's anonymous memory out of swap.
        _try_write(os.path.join(memory, "memory.swappiness"), "0")
        # Hitting the limit must kill, not pause the group in the OOM handler forever. A new group inherits
        # oom_kill_disable from its parent, so only a parent set up that way needs the write (recent
        # kernels log a deprecation warning for any write to this file).
        oom_control = os.path.join(memory, "memory.oom_control")
        if "oom_kill_disable 1" in (_read(oom_control) or ""):
            _try_write(oom_control, "0")
        if pids_max is not None and "pids" in dirs:
            _write(os.path.join(dirs["pids"], "pids.max"), str(pids_max))
        if cpu_millicores and "cpu" in dirs:
            period = int((_read(os.path.join(dirs["cpu"], "cpu.cfs_period_us")) or "").strip() or CPU_PERIOD_US)
            _write(os.path.join(dirs["cpu"], "cpu.cfs_quota_us"), str(_cpu_quota_us(cpu_millicores, period)))


class CgroupV2Controller(_CgroupController):
    kind = "cgroup-v2"
    _group_class = _V2Group

    def describe(self) -> str:
        notes = f"; {'; '.join(self._notes)}" if self._notes else ""
        return f"cgroup v2 ({', '.join(self.controllers)}) under {self.parent_dirs[0]}{notes}"

    def _limit(self, dirs, memory_bytes, pids_max, cpu_millicores) -> None:
        directory = dirs["unified"]
        if memory_bytes is not None:
            _write(os.path.join(directory, "memory.max"), str(memory_bytes))
            # memory.swap.max is swap on top of memory.max: 0 for none. Absent without swap accounting.
            _try_write(os.path.join(directory, "memory.swap.max"), "0")
        if pids_max is not None and "pids" in self.controllers:
            _write(os.path.join(directory, "pids.max"), str(pids_max))
        if cpu_millicores and "cpu" in self.controllers:
            _write(os.path.join(directory, "cpu.max"),
                   f"{_cpu_quota_us(cpu_millicores, CPU_PERIOD_US)} {CPU_PERIOD_US}")


# ---- detection ------------------------------------------------------------------------------------------

def detect(*, root: str = "/sys/fs/cgroup", prefix: str = "nimbus", mode: str = "auto",
           self_cgroup: Callable[[], str] = read_self_cgroup) -> Controller:
    """The resource controller for this machine. ``mode``: "auto" (cgroups when writable, else rlimit;
    the caller logs which it got), "cgroup" (cgroups or ResourceControlUnavailable with the reason) or
    "rlimit". ``self_cgroup`` returns the text of /proc/self/cgroup (tests pass a fake)."""
    mode = (mode or "auto").lower()
    if mode not in ("auto", "cgroup", "rlimit"):
        raise ValueError(f"unknown resource control mode {mode!r}; use auto, cgroup or rlimit")
    if not NAME_RE.fullmatch(prefix):
        raise ValueError(f"invalid cgroup prefix {prefix!r}")
    if mode == "rlimit":
        return RlimitController("rlimit mode chosen in the settings")
    try:
        return _detect_cgroup(root, prefix, self_cgroup)
    except ResourceControlUnavailable as exc:
        if mode == "cgroup":
            raise
        return RlimitController(str(exc))


def _detect_cgroup(root: str, prefix: str, self_cgroup: Callable[[], str]) -> Controller:
    root = str(root)
    if not os.path.isdir(root):
        raise ResourceControlUnavailable(f"no cgroup filesystem at {root}")
    v1_paths, v2_path = parse_proc_cgroup(self_cgroup())
    parent_name = f"{prefix}-{os.getpid()}-{next(_parent_sequence)}"
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        if v2_path is None:
            raise ResourceControlUnavailable("cgroup v2 is mounted but /proc/self/cgroup has no v2 entry")
        return _detect_v2(root, v2_path, parent_name)
    if "memory" in v1_paths and _v1_mount(root, "memory"):
        return _detect_v1(root, v1_paths, parent_name)
    raise ResourceControlUnavailable(f"no usable cgroup memory controller under {root} (neither a v1 "
                                     f"memory hierarchy nor a v2 mount)")


def _v1_mount(root: str, hierarchy: str) -> str | None:
    """The mount of a v1 hierarchy: root/<name>, or a co-mount such as root/cpu,cpuacct."""
    candidates = [os.path.join(root, hierarchy)]
    with contextlib.suppress(OSError):
        candidates += [os.path.join(root, entry) for entry in sorted(os.listdir(root))
                       if hierarchy in entry.split(",") and entry != hierarchy]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "cgroup.procs")) and \
                not os.path.exists(os.path.join(candidate, "cgroup.controllers")):
            return candidate
    return None


def _unavailable_reason(path: str, exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot create {path}: {exc.strerror} (the portal is not root, or the cgroup is not delegated)"
    if exc.errno == errno.EROFS:
        return f"cannot create {path}: the cgroup filesystem is mounted read-only"
    return f"cannot create {path}: {exc.strerror or exc}"


def _detect_v1(root: str, v1_paths: dict[str, str], parent_name: str) -> Controller:
    parents: dict[str, str] = {}
    mounts: dict[str, str] = {}
    notes: list[str] = []
    try:
        for hierarchy in V1_HIERARCHIES:
            mount = _v1_mount(root, hierarchy) if hierarchy in v1_paths else None
            own = _own_dir(mount, v1_paths[hierarchy]) if mount else None
            if own is None or (hierarchy == "cpu" and not os.path.exists(os.path.join(own, "cpu.cfs_quota_us"))):
                if hierarchy == "memory":
                    raise ResourceControlUnavailable(f"cannot find the portal's memory cgroup under {root}")
                notes.append(f"no {hierarchy} hierarchy")
                continue
            parent = os.path.join(own, parent_name)
            try:
                os.mkdir(parent)
            except OSError as exc:
                if hierarchy == "memory":
                    raise ResourceControlUnavailable(_unavailable_reason(parent, exc)) from exc
                notes.append(f"no {hierarchy}: {exc.strerror}")
                continue
            parents[hierarchy] = parent
            mounts[hierarchy] = mount
            if hierarchy == "memory":
                # Always 1 on recent kernels; on old ones a child's usage must count in the portal's group.
                _try_write(os.path.join(parent, "memory.use_hierarchy"), "1")
                if not os.path.exists(os.path.join(parent, "memory.memsw.limit_in_bytes")):
                    notes.append("no swap accounting (memsw): swapped-out pages escape the memory limit")
    except BaseException:
        for parent in parents.values():
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        raise
    return CgroupV1Controller(parents, tuple(h for h in parents if h != "freezer"), notes, mounts)


def _move_processes(source: str, target: str) -> None:
    for pid in _procs(source):
        with contextlib.suppress(ProcessLookupError):
            _write(os.path.join(target, "cgroup.procs"), str(pid))


def _enable(directory: str, controllers: Iterable[str], leaf: str | None) -> tuple[list[str], bool]:
    """Enable ``controllers`` for the children of ``directory`` (cgroup.subtree_control). Where the
    directory holds processes (EBUSY: "no internal processes") and ``leaf`` is given, they move there
    first. Returns (controllers enabled, whether processes were moved). memory is required."""
    enabled: list[str] = []
    moved = False
    subtree = os.path.join(directory, "cgroup.subtree_control")
    for controller in controllers:
        if controller in _tokens(subtree):
            enabled.append(controller)
            continue
        for _attempt in range(5):
            try:
                _write(subtree, f"+{controller}")
                enabled.append(controller)
                break
            except OSError as exc:
                if exc.errno == errno.EBUSY and leaf is not None:
                    # Processes forked into the directory meanwhile are moved on the next attempt.
                    leaf_dir = os.path.join(directory, leaf)
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(leaf_dir)
                    _move_processes(directory, leaf_dir)
                    moved = True
                    continue
                if controller == "memory":
                    raise ResourceControlUnavailable(
                        f"cannot enable the memory controller in {subtree}: {exc.strerror}") from exc
                log.info("cgroup: %s controller not enabled in %s: %s", controller, subtree, exc)
                break
        else:
            if controller == "memory":
                raise ResourceControlUnavailable(f"cannot enable the memory controller in {subtree}: "
                                                 f"processes keep appearing in {directory}")
    return enabled, moved


def _detect_v2(root: str, v2_path: str, parent_name: str) -> Controller:
    own = _own_dir(root, v2_path)
    if own is None:
        raise ResourceControlUnavailable(f"cannot find the portal's cgroup {v2_path} under {root}")
    base = own
    notes: list[str] = []
    # A controller made earlier in this process already moved the portal into the leaf: nest beside it.
    if os.path.basename(own) == PORTAL_LEAF and "memory" in _tokens(
            os.path.join(os.path.dirname(own), "cgroup.subtree_control")):
        base = os.path.dirname(own)
    available = _tokens(os.path.join(base, "cgroup.controllers"))
    if "memory" not in available:
        raise ResourceControlUnavailable(f"the memory controller is not available in {base} "
                                         f"(cgroup.controllers: {' '.join(sorted(available)) or 'none'})")
    wanted = [c for c in V2_CONTROLLERS if c in available]
    try:
        enabled, moved = _enable(base, wanted, PORTAL_LEAF)
    except OSError as exc:
        raise ResourceControlUnavailable(_unavailable_reason(os.path.join(base, PORTAL_LEAF), exc)) from exc
    if moved:
        notes.append(f"moved the portal's processes into {os.path.join(base, PORTAL_LEAF)}")
        log.info("cgroup: moved the processes of %s into %s/%s so controllers can be enabled for sandboxes",
                 base, base, PORTAL_LEAF)
    parent = os.path.join(base, parent_name)
    try:
        os.mkdir(parent)
    except OSError as exc:
        raise ResourceControlUnavailable(_unavailable_reason(parent, exc)) from exc
    try:
        # The parent holds no processes, so this cannot hit the no-internal-processes rule.
        enabled, _ = _enable(parent, enabled, None)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(parent)
        raise
    missing = [c for c in V2_CONTROLLERS if c not in enabled]
    if missing:
        notes.append(f"without {', '.join(missing)}")
    return CgroupV2Controller({"unified": parent}, tuple(enabled), notes)
