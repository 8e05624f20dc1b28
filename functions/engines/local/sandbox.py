"""How an instance process is started: its scrubbed environment, its resource limits, and the
bubblewrap command line that hides the portal's files (and the network) from it."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from functions.engines.base import RevisionSpec

RUNTIMES_DIR = Path(__file__).resolve().parent.parent.parent / "runtimes"
# Where things appear inside the sandbox (the same paths the runtime images use).
SANDBOX_CODE = "/var/nimbus/code"
SANDBOX_DEPS = "/var/nimbus/deps"
SANDBOX_RUNTIME = "/var/nimbus/runtime"
SANDBOX_SOCKETS = "/run/nimbus"
SANDBOX_UID = 65534
# Files from /etc a process needs for name resolution and TLS, and nothing else.
ETC_FILES = ("resolv.conf", "hosts", "nsswitch.conf", "ssl", "ca-certificates", "localtime", "passwd", "group")


def python_executable() -> str:
    """The base interpreter (not the portal's virtualenv: its packages are not the function's)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def node_executable() -> str | None:
    return shutil.which("node")


@functools.lru_cache(maxsize=1)
def bwrap_works() -> bool:
    path = shutil.which("bwrap")
    if not path:
        return False
    try:
        result = subprocess.run([path, "--ro-bind", "/", "/", "--unshare-user", "--unshare-pid", "--unshare-net",
                                 "--proc", "/proc", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def resolve_mode(mode: str) -> str:
    """auto → bwrap when bubblewrap is installed and usable here, else none."""
    mode = (mode or "auto").lower()
    if mode == "auto":
        return "bwrap" if bwrap_works() else "none"
    if mode == "bwrap" and not shutil.which("bwrap"):
        raise RuntimeError("NIMBUS_LOCAL['SANDBOX'] is 'bwrap' but bubblewrap is not installed (apt-get install bubblewrap).")
    if mode not in ("bwrap", "none"):
        raise RuntimeError(f"Unknown sandbox mode {mode!r}; use auto, bwrap or none.")
    return mode


@dataclass
class Layout:
    """Host paths of one revision, and how the process inside sees them."""

    code_dir: Path
    deps_dir: Path | None
    socket_dir: Path
    sandboxed: bool

    def inside(self, host_path: Path) -> str:
        """The path a process inside the sandbox uses for ``host_path``."""
        if not self.sandboxed:
            return str(host_path)
        host_path = Path(host_path)
        for host, inner in ((self.socket_dir, SANDBOX_SOCKETS), (self.code_dir, SANDBOX_CODE),
                            (self.deps_dir, SANDBOX_DEPS), (RUNTIMES_DIR, SANDBOX_RUNTIME)):
            if host is not None and (host_path == host or host in host_path.parents):
                return str(Path(inner) / host_path.relative_to(host))
        raise ValueError(f"{host_path} is not visible inside the sandbox")


def instance_env(spec: RevisionSpec, layout: Layout, **extra: str) -> dict[str, str]:
    """The whole environment of an instance: the shim contract, then the function's own variables.

    Nothing of the portal's environment is inherited (no SECRET_KEY, DATABASE_URL, …).
    """
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "MALLOC_ARENA_MAX": "2",
    }
    env.update({name: str(value) for name, value in spec.env.items()})
    env.update({name: str(value) for name, value in spec.secrets.items()})
    env.update({
        "NIMBUS_CODE_DIR": layout.inside(layout.code_dir),
        "NIMBUS_HANDLER": spec.handler,
        "NIMBUS_TENANT": spec.function.tenant,
        "NIMBUS_FUNCTION": spec.function.name,
        "NIMBUS_REVISION": str(spec.number),
        "NIMBUS_TIMEOUT_SECONDS": str(spec.timeout_seconds),
        "NIMBUS_DEBUG": "1" if spec.debug else "0",
        "NIMBUS_MEMORY_MB": str(spec.memory_mb),
        "NIMBUS_CONCURRENCY": str(spec.concurrency),
    })
    if layout.deps_dir is not None:
        deps = layout.inside(layout.deps_dir)
        env["NIMBUS_DEPS_DIR"] = deps
        if spec.runtime.startswith("node"):
            env["NODE_PATH"] = str(Path(deps) / "node_modules")
    env.update(extra)
    return env


def limits(spec: RevisionSpec, settings: dict) -> dict:
    """Resource limits of one instance (setrlimit names → values)."""
    values = {
        "cpu": int(settings.get("INSTANCE_CPU_SECONDS", 600)),
        "nofile": int(settings.get("INSTANCE_OPEN_FILES", 256)),
        "nproc": int(settings.get("INSTANCE_PROCESSES", 256)),
        "core": 0,
    }
    if spec.runtime.startswith("python"):
        # Address space rather than RSS: the only memory limit setrlimit offers. V8 reserves far more
        # address space than it uses, so Node gets --max-old-space-size instead.
        values["as"] = spec.memory_mb * 1024 * 1024
    return values


def wrap(argv: list[str], layout: Layout, *, allow_egress: bool, extra_ro: list[str] = (),
         info_fd: int | None = None) -> list[str]:
    """``argv`` inside bubblewrap when the layout is sandboxed, else unchanged.

    With ``info_fd``, bubblewrap writes {"child-pid": …} there: the sandbox's own init, the process to
    kill so that the whole sandbox ends and bubblewrap reaps it (killing bubblewrap itself would
    orphan the sandbox's processes)."""
    if not layout.sandboxed:
        return argv
    args = [shutil.which("bwrap") or "bwrap",
            "--unshare-all", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL",
            "--new-session", "--die-with-parent",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--dir", "/var/nimbus", "--dir", "/etc"]
    for name in ETC_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for path in extra_ro:
        args += ["--ro-bind", path, path]
    args += ["--ro-bind", str(RUNTIMES_DIR), SANDBOX_RUNTIME,
             "--ro-bind", str(layout.code_dir), SANDBOX_CODE,
             "--bind", str(layout.socket_dir), SANDBOX_SOCKETS]
    if layout.deps_dir is not None:
        args += ["--ro-bind", str(layout.deps_dir), SANDBOX_DEPS]
    if allow_egress:
        args.append("--share-net")
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    args += ["--chdir", SANDBOX_CODE, "--"]
    return args + argv


def interpreter_roots(executable: str) -> list[str]:
    """Host folders an interpreter outside /usr needs (e.g. a pyenv prefix), bound read-only."""
    real = os.path.realpath(executable)
    if real.startswith("/usr/"):
        return []
    prefix = Path(real).parent.parent
    return [str(prefix)]


def python_command(layout: Layout, *, zygote: bool) -> tuple[list[str], list[str]]:
    """(argv, extra read-only binds) for the Python shim or its fork server."""
    exe = python_executable()
    script = "nimbus_zygote.py" if zygote else "nimbus_runtime.py"
    script_path = layout.inside(RUNTIMES_DIR / "python" / script)
    extra = []
    if layout.sandboxed:
        extra = interpreter_roots(exe)
    # -I -S: no site hooks, no user or portal packages, no PYTHON* variables (and ~60 ms faster).
    return [exe, "-I", "-S", script_path], extra


def node_command(layout: Layout, memory_mb: int) -> tuple[list[str], list[str]]:
    exe = node_executable()
    if exe is None:
        raise RuntimeError("Node.js is not installed on this machine.")
    script_path = layout.inside(RUNTIMES_DIR / "node" / "shim.js")
    extra = interpreter_roots(exe) if layout.sandboxed else []
    return [exe, f"--max-old-space-size={max(16, memory_mb - 32)}", script_path], extra
