"""How an instance process is started: bubblewrap run as the tenant's own unprivileged host uid, with a
seccomp filter, a fixed launcher environment, the function's variables handed over inside the sandbox, its
cgroup (or rlimits), and no network unless it has egress (then a filtered user-mode one)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from functions.engines import envpolicy
from functions.engines.base import RevisionSpec
from functions.engines.local import egress, seccomp
from functions.engines.local.resources import Controller, Group
from portal.errors import EngineError

log = logging.getLogger(__name__)

RUNTIMES_DIR = Path(__file__).resolve().parent.parent.parent / "runtimes"
# Where things appear inside the sandbox (the same paths the runtime images use).
SANDBOX_CODE = "/var/nimbus/code"
SANDBOX_DEPS = "/var/nimbus/deps"
SANDBOX_RUNTIME = "/var/nimbus/runtime"
SANDBOX_TOOLS = "/var/nimbus/tools"
SANDBOX_UID = 65534
# Far above the ranges useradd hands out in /etc/subuid (100000 + 65536 per user) and systemd's.
DEFAULT_UID_BASE = 2_000_000_000
DEFAULT_UID_COUNT = 65536
# What the sandbox's /etc holds: written by the engine, so no host account or host name shows through.
ETC_PASSWD = b"root:x:0:0::/:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/tmp:/usr/sbin/nologin\n"
ETC_GROUP = b"root:x:0:\nnogroup:x:65534:\n"
ETC_HOSTS = b"127.0.0.1 localhost\n::1 localhost\n"
# Read-only host files a process needs for TLS and time zones, and nothing else of /etc.
ETC_HOST_FILES = ("ssl", "ca-certificates", "localtime", "nsswitch.conf")
# The launcher (bwrap, or the interpreter without a sandbox) gets only this environment; nothing the
# tenant sets reaches a process outside the sandbox.
LAUNCHER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


# ---- modes and identities --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """The unprivileged host uid/gid a tenant's processes run as."""

    uid: int
    gid: int


@dataclass(frozen=True)
class Isolation:
    """How one tenant's processes are held: its host identity, the engine's resource controller, the
    private ranges egress may reach, and the interpreter Python functions run on."""

    identity: Identity | None
    resources: Controller
    allow_cidrs: tuple[str, ...] = ()
    python: str = ""


def identity_for(tenant_id: int, settings: dict) -> Identity | None:
    """The tenant's host identity, from the configured range; None when the portal is not root (its
    processes then run as the portal's own uid: tenants are apart by namespaces, not by uid)."""
    if os.geteuid() != 0:
        return None
    base = int(settings.get("SANDBOX_UID_BASE", DEFAULT_UID_BASE))
    count = int(settings.get("SANDBOX_UID_COUNT", DEFAULT_UID_COUNT))
    if not 0 < int(tenant_id) < count:
        # Wrapping around would give two tenants one uid: refuse rather than share.
        raise EngineError(f"Tenant {tenant_id} is beyond the sandbox uid range (NIMBUS_SANDBOX_UID_COUNT={count}).")
    uid = base + int(tenant_id)
    return Identity(uid, uid)


def uid_range_problem(settings: dict) -> str | None:
    """Why the configured uid range is unsafe (it overlaps a range /etc/subuid or /etc/subgid hands to a
    user, who could then act as a tenant), or None."""
    base = int(settings.get("SANDBOX_UID_BASE", DEFAULT_UID_BASE))
    count = int(settings.get("SANDBOX_UID_COUNT", DEFAULT_UID_COUNT))
    if base < 65536 or base + count > 2**31:
        return f"NIMBUS_SANDBOX_UID_BASE={base} with COUNT={count} must lie between 65536 and 2^31"
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                start, length = int(parts[1]), int(parts[2])
                if start < base + count and base < start + length:
                    return (f"the sandbox uids {base}–{base + count - 1} overlap {path}'s range for {parts[0]} "
                            f"({start}–{start + length - 1}): set NIMBUS_SANDBOX_UID_BASE elsewhere")
    return None


@functools.lru_cache(maxsize=4)
def bwrap_problem(uid: int | None = None) -> str | None:
    """None when bubblewrap can build an unprivileged sandbox here (as ``uid`` when given), else why."""
    path = shutil.which("bwrap")
    if not path:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    try:
        result = subprocess.run(
            [path, "--unshare-all", "--unshare-user", "--disable-userns", "--ro-bind", "/usr", "/usr",
             "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc",
             "--dev", "/dev", "--", "/usr/bin/true"],
            capture_output=True, timeout=10, env=LAUNCHER_ENV,
            preexec_fn=(lambda: _become(Identity(uid, uid))) if uid is not None else None)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not run: {exc}"
    if result.returncode != 0:
        return ("bubblewrap cannot create an unprivileged sandbox here "
                f"({result.stderr.decode(errors='replace').strip() or result.returncode}); "
                "unprivileged user namespaces must be enabled (sysctl user.max_user_namespaces)")
    return None


def resolve_mode(mode: str) -> str:
    """The sandbox mode: "bwrap" (required to work) or "none" (explicitly unisolated)."""
    mode = (mode or "bwrap").lower()
    if mode == "none":
        return "none"
    if mode != "bwrap":
        raise EngineError(f"Unknown sandbox mode {mode!r} (NIMBUS_LOCAL_SANDBOX): use bwrap, or none to run "
                          "functions without isolation.")
    problem = bwrap_problem()
    if problem:
        raise EngineError(f"The local engine's sandbox does not work: {problem}. Fix it, or set "
                          "NIMBUS_LOCAL_SANDBOX=none to run functions without isolation.")
    return mode


def reachable(path: str | Path) -> bool:
    """Whether any uid may reach ``path``: every folder on the way searchable by others."""
    real = Path(os.path.realpath(path))
    try:
        if not all(os.stat(folder).st_mode & stat.S_IXOTH for folder in real.parents):
            return False
        return bool(os.stat(real).st_mode & (stat.S_IXOTH if real.is_dir() else stat.S_IROTH | stat.S_IXOTH))
    except OSError:
        return False


def reachable_copy(source: Path, root: Path) -> Path:
    """``source`` when every uid may reach it, else a read-only copy of it under ``root`` (named by its
    content), for a checkout or virtualenv in a private folder that the tenants' uids cannot enter."""
    source = Path(source)
    if os.geteuid() != 0 or reachable(source):
        return source
    digest = hashlib.sha256()
    for path in sorted(source.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(f"{path.relative_to(source)}\0{path.stat().st_size}\0{path.stat().st_mtime_ns}\0".encode())
    container = Path(root) / f"{source.name}-{digest.hexdigest()[:16]}"
    target = container / source.name  # keeps its name: a package (pip) is imported by it
    if target.is_dir():
        return target
    Path(root).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    work = Path(tempfile.mkdtemp(prefix=f".{container.name}-", dir=root))
    shutil.copytree(source, work / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [work, *work.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    try:
        os.rename(work, container)
    except OSError:  # made meanwhile by another engine
        shutil.rmtree(work, ignore_errors=True)
    return target


def python_executable(configured: str = "") -> str:
    """The interpreter functions run on: the configured one, else the portal's base interpreter when the
    tenants' uids can reach it, else the system's interpreter of the same version."""
    if configured:
        return os.path.realpath(configured)
    base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    if os.geteuid() != 0 or reachable(base):
        return base
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if os.path.exists(system) and reachable(system):
        return os.path.realpath(system)
    raise EngineError(f"The Python interpreter {base} is not reachable by the sandbox's uids (a folder on "
                      "its path is private): set NIMBUS_LOCAL_PYTHON to an interpreter of the same version "
                      "that every user may run.")


def node_executable() -> str | None:
    return shutil.which("node")


def pip_package_dir() -> str:
    """pip, for installers running on an interpreter without it (the system's): bound read-only."""
    import pip

    return os.path.dirname(os.path.realpath(pip.__file__))


# ---- what the sandbox sees -------------------------------------------------------------------------------

@dataclass
class Layout:
    """Host paths of one revision, and how the process inside sees them."""

    code_dir: Path
    deps_dir: Path | None
    sandboxed: bool
    runtime_dir: Path = RUNTIMES_DIR  # the shims (a reachable copy when the checkout is private)

    def inside(self, host_path: Path) -> str:
        """The path a process inside the sandbox uses for ``host_path``."""
        if not self.sandboxed:
            return str(host_path)
        host_path = Path(host_path)
        for host, inner in ((self.code_dir, SANDBOX_CODE), (self.deps_dir, SANDBOX_DEPS),
                            (self.runtime_dir, SANDBOX_RUNTIME)):
            if host is not None and (host_path == host or host in host_path.parents):
                return str(Path(inner) / host_path.relative_to(host))
        raise ValueError(f"{host_path} is not visible inside the sandbox")


def function_env(spec: RevisionSpec) -> dict[str, str]:
    """The function's own variables and secrets, minus any name the platform refuses (the API refuses
    them too; this is the second line for rows stored before that rule)."""
    values = {name: str(value) for name, value in spec.env.items()}
    values.update({name: str(value) for name, value in spec.secrets.items()})
    kept, dropped = envpolicy.allowed(values)
    if dropped:
        log.warning("%s: dropped refused variables %s", spec, ", ".join(sorted(dropped)))
    return kept


def platform_env(spec: RevisionSpec, layout: Layout, **extra: str) -> dict[str, str]:
    """The shim contract: what the platform sets (no secret among it)."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "MALLOC_ARENA_MAX": "2",
        "NIMBUS_CODE_DIR": layout.inside(layout.code_dir),
        "NIMBUS_HANDLER": spec.handler,
        "NIMBUS_TENANT": spec.function.tenant,
        "NIMBUS_FUNCTION": spec.function.name,
        "NIMBUS_REVISION": str(spec.number),
        "NIMBUS_TIMEOUT_SECONDS": str(spec.timeout_seconds),
        "NIMBUS_DEBUG": "1" if spec.debug else "0",
        "NIMBUS_MEMORY_MB": str(spec.memory_mb),
        "NIMBUS_CONCURRENCY": str(spec.concurrency),
    }
    if layout.deps_dir is not None:
        deps = layout.inside(layout.deps_dir)
        env["NIMBUS_DEPS_DIR"] = deps
        if spec.runtime.startswith("node"):
            env["NODE_PATH"] = str(Path(deps) / "node_modules")
    env.update(extra)
    return env


def limits(spec: RevisionSpec, settings: dict, *, cgroups: bool) -> dict:
    """Resource limits of one instance (setrlimit names → values). With cgroups, memory and process
    count are the cgroup's; without, the address space (Python) or data segment (Node: V8 reserves far
    more address space than it uses) and RLIMIT_NPROC stand in."""
    values = {
        "cpu": int(settings.get("INSTANCE_CPU_SECONDS", 600)),
        "nofile": int(settings.get("INSTANCE_OPEN_FILES", 256)),
        "core": 0,
    }
    if not cgroups:
        values["nproc"] = int(settings.get("INSTANCE_PROCESSES", 256))
        values["node_data" if spec.runtime.startswith("node") else "as"] = spec.memory_mb * 1024 * 1024
    return values


RLIMITS = {"cpu": "RLIMIT_CPU", "nofile": "RLIMIT_NOFILE", "core": "RLIMIT_CORE", "as": "RLIMIT_AS",
           "node_data": "RLIMIT_DATA", "nproc": "RLIMIT_NPROC", "fsize": "RLIMIT_FSIZE"}


def _set_limits(values: dict) -> None:
    """In the child before exec; a limit that cannot be set stops the start (no weaker process)."""
    for name, value in values.items():
        which = getattr(resource, RLIMITS.get(name, ""), None)
        if which is None or value is None:
            continue
        hard = value + 5 if name == "cpu" else value  # SIGXCPU at the soft limit, SIGKILL shortly after
        resource.setrlimit(which, (value, hard))


def _become(identity: Identity) -> None:
    os.setgroups([])
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)


def _data_fd(data: bytes) -> int:
    """An anonymous file holding ``data`` at offset 0, for bwrap's --ro-bind-data / the env hand-over."""
    fd = os.memfd_create("nimbus")  # close-on-exec: only pass_fds hand it on
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# ---- starting a sandbox -----------------------------------------------------------------------------------

@dataclass
class Launch:
    """One sandboxed process to start."""

    argv: list[str]
    layout: Layout
    env: dict[str, str]  # the platform's variables (set with --setenv / as the process environment)
    secret_env: dict[str, str]  # the function's own, handed over through NIMBUS_ENV_FD inside
    identity: Identity | None
    rlimits: dict
    group: Group | None = None
    egress: bool = False
    allow_cidrs: tuple[str, ...] = ()
    tmp_bytes: int = 64 * 1024 * 1024
    extra_ro: list[str] = field(default_factory=list)
    binds: list[tuple[str, str]] = field(default_factory=list)  # (host, inside) read-write: installers only
    ro_binds: list[tuple[str, str]] = field(default_factory=list)  # (host, inside) read-only
    # The operator's own settings an installer needs (index URL, proxy): kept off the command line (which
    # every host user can read), in the launcher's environment instead. Never anything of the tenant's.
    operator_env: dict[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()
    chdir: str = SANDBOX_CODE
    cwd: str | None = None
    stdin: int | None = subprocess.DEVNULL


@dataclass
class Started:
    process: subprocess.Popen
    pid: int  # the sandbox's init on the host (kill it and the sandbox ends), or the process
    network: egress.Network | None = None

    def close(self) -> None:
        if self.network is not None:
            self.network.close()


def bwrap_argv(launch: Launch, fds: dict[str, int]) -> list[str]:
    """The bubblewrap command line (no secret on it: other host users can read it in /proc)."""
    layout = launch.layout
    args = [shutil.which("bwrap") or "bwrap",
            "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid",
            str(SANDBOX_UID), "--cap-drop", "ALL", "--new-session", "--die-with-parent",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--proc", "/proc", "--dev", "/dev", "--size", str(launch.tmp_bytes), "--tmpfs", "/tmp",
            "--dir", "/var/nimbus", "--dir", "/etc",
            "--ro-bind-data", str(fds["passwd"]), "/etc/passwd", "--ro-bind-data", str(fds["group"]), "/etc/group",
            "--ro-bind-data", str(fds["hosts"]), "/etc/hosts"]
    if "resolv" in fds:
        args += ["--ro-bind-data", str(fds["resolv"]), "/etc/resolv.conf"]
    for name in ETC_HOST_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for path in launch.extra_ro:
        args += ["--ro-bind", path, path]
    args += ["--ro-bind", str(layout.runtime_dir), SANDBOX_RUNTIME, "--ro-bind", str(layout.code_dir), SANDBOX_CODE]
    if layout.deps_dir is not None:
        args += ["--ro-bind", str(layout.deps_dir), SANDBOX_DEPS]
    for host, inside in launch.ro_binds:
        args += ["--ro-bind", host, inside]
    for host, inside in launch.binds:
        args += ["--bind", host, inside]
    if not launch.operator_env:
        args.append("--clearenv")
    for name, value in launch.env.items():
        args += ["--setenv", name, value]
    args += ["--setenv", "NIMBUS_ENV_FD", str(fds["env"]), "--seccomp", str(fds["seccomp"]),
             "--info-fd", str(fds["info"])]
    if "block" in fds:
        args += ["--block-fd", str(fds["block"])]
    args += ["--chdir", launch.chdir, "--"]
    return args + launch.argv


def start(launch: Launch, *, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) -> Started:
    """Start ``launch``: in bubblewrap when its layout is sandboxed, else as a plain process (still as the
    tenant's uid, with its cgroup and limits). Blocks until the sandbox runs (and has its network)."""
    fds: dict[str, int] = {}
    ours: list[int] = []
    network = None
    process = None
    try:
        fds["env"] = _data_fd(json.dumps(launch.secret_env).encode())
        ours.append(fds["env"])
        join_fds = launch.group.procs_fds() if launch.group is not None else []
        ours += join_fds
        if launch.layout.sandboxed:
            for name, data in (("passwd", ETC_PASSWD), ("group", ETC_GROUP), ("hosts", ETC_HOSTS)):
                fds[name] = _data_fd(data)
                ours.append(fds[name])
            if launch.egress:
                fds["resolv"] = _data_fd(egress.RESOLV_CONF.encode())
                ours.append(fds["resolv"])
            fds["seccomp"] = seccomp.program_fd()
            ours.append(fds["seccomp"])
            info_read, fds["info"] = os.pipe()
            ours += [info_read, fds["info"]]
            if launch.egress:
                fds["block"], block_write = os.pipe()
                ours += [fds["block"], block_write]
            argv = bwrap_argv(launch, fds)
            env = {**LAUNCHER_ENV, **launch.operator_env}
        else:
            argv = launch.argv
            env = {**launch.env, **launch.operator_env, "NIMBUS_ENV_FD": str(fds["env"])}
        inherited = tuple(fd for name, fd in fds.items()) + tuple(launch.pass_fds)
        identity, rlimits = launch.identity, launch.rlimits

        parent = os.getpid()

        def prepare_child() -> None:
            # In the child, before exec: join the cgroup, set limits, drop to the tenant's uid, then die
            # with the engine (a change of uid clears the parent-death signal, so it comes last). Nothing
            # here may allocate much or take locks.
            pid = str(os.getpid()).encode()
            for fd in join_fds:
                os.write(fd, pid)
            _set_limits(rlimits)
            if identity is not None:
                _become(identity)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the engine died in between
                os._exit(1)

        process = subprocess.Popen(argv, env=env, cwd=launch.cwd or str(launch.layout.code_dir),
                                   stdin=launch.stdin, stdout=stdout, stderr=stderr, start_new_session=True,
                                   pass_fds=inherited, preexec_fn=prepare_child)
        for fd in [fds[name] for name in ("info", "block") if name in fds] + join_fds:
            os.close(fd)
            ours.remove(fd)
        pid = process.pid
        if launch.layout.sandboxed:
            pid = _read_child_pid(info_read)
            if pid is None:  # bubblewrap gave up before the sandbox ran: say why
                raise EngineError(f"The sandbox could not start: {_last_words(process)}")
            if launch.egress:
                network = egress.Network.attach(
                    pid, uid=identity.uid if identity else None, gid=identity.gid if identity else None,
                    allow_cidrs=launch.allow_cidrs)
                try:
                    os.write(block_write, b"1")
                except BrokenPipeError:
                    raise EngineError(f"The sandbox ended before it ran: {_last_words(process)}") from None
        return Started(process=process, pid=pid, network=network)
    except BaseException as exc:
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        if network is not None:
            network.close()
        if isinstance(exc, (egress.EgressUnavailable, ValueError)):
            raise EngineError(f"The function's network could not be set up: {exc}") from None
        if isinstance(exc, seccomp.SeccompUnavailable):
            raise EngineError(f"The sandbox's seccomp filter is not available: {exc}") from None
        if isinstance(exc, (OSError, subprocess.SubprocessError)):
            raise EngineError(f"The sandbox could not start: {exc}") from None
        raise
    finally:
        for fd in ours:
            with contextlib.suppress(OSError):
                os.close(fd)


def _last_words(process: subprocess.Popen) -> str:
    """What a sandbox that ended early printed (bubblewrap's reason), or its exit status."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    output = ""
    if process.stdout is not None:
        with contextlib.suppress(OSError, ValueError):
            output = process.stdout.read().decode("utf-8", "replace")
    return output.strip()[-500:] or f"exit status {process.returncode}"


def _read_child_pid(fd: int) -> int | None:
    """bwrap's --info-fd JSON (several lines), read whole: closing early would SIGPIPE bubblewrap."""
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
        try:
            return int(json.loads(data).get("child-pid") or 0) or None
        except ValueError:
            continue


# ---- the runtimes' command lines --------------------------------------------------------------------------

def interpreter_roots(executable: str) -> list[str]:
    """Host folders an interpreter outside /usr needs (e.g. a pyenv prefix), bound read-only."""
    real = os.path.realpath(executable)
    if real.startswith("/usr/"):
        return []
    prefix = Path(real).parent.parent
    return [str(prefix)]


def python_command(layout: Layout, *, zygote: bool, python: str = "") -> tuple[list[str], list[str]]:
    """(argv, extra read-only binds) for the Python shim or its fork server."""
    exe = python_executable(python)
    script = "nimbus_zygote.py" if zygote else "nimbus_runtime.py"
    script_path = layout.inside(layout.runtime_dir / "python" / script)
    extra = interpreter_roots(exe) if layout.sandboxed else []
    # -I -S: no site hooks, no user or portal packages, no PYTHON* variables (and ~60 ms faster).
    return [exe, "-I", "-S", script_path], extra


def node_command(layout: Layout, memory_mb: int) -> tuple[list[str], list[str]]:
    exe = node_executable()
    if exe is None:
        raise RuntimeError("Node.js is not installed on this machine.")
    script_path = layout.inside(layout.runtime_dir / "node" / "shim.js")
    extra = interpreter_roots(exe) if layout.sandboxed else []
    return [exe, f"--max-old-space-size={max(16, memory_mb - 32)}", script_path], extra
