"""A revision's dependencies (requirements.txt / package.json), installed once per content hash
into the shared cache; an unchanged file costs nothing on the next deploy."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from functions.engines.local import sandbox
from portal.errors import EngineError

INSTALL_TIMEOUT = 600
_build_numbers = itertools.count(1)
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass
class DepsResult:
    path: Path | None  # None: the revision has no dependency file
    cached: bool
    output: str = ""
    manifest: str = ""


def manifest_name(runtime: str) -> str:
    return "package.json" if runtime.startswith("node") else "requirements.txt"


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _meaningful(runtime: str, text: str) -> bool:
    if runtime.startswith("node"):
        return bool(text.strip())
    return any(line.strip() and not line.strip().startswith("#") for line in text.splitlines())


@dataclass(frozen=True)
class Installer:
    """Where installers run (a requirements file can run code: setup.py, npm scripts): the tenant's own
    sandbox, identity and cgroup, with filtered egress (the package index, never the host), seeing only
    the target folder, the manifest, the interpreter and the operator's local package folders
    (``NIMBUS_LOCAL["DEPS_LOCAL_DIRS"]``)."""

    sandboxed: bool = False
    local_dirs: tuple[str, ...] = ()
    python: str = ""
    memory_mb: int = 1024
    tools_root: str = ""  # where a reachable copy of pip goes when the portal's virtualenv is private


def ensure_deps(runtime: str, files: dict[str, str], cache_dir: Path,
                installer: Installer = Installer(), isolation: sandbox.Isolation | None = None) -> DepsResult:
    """Install the revision's dependencies unless the cache already holds them.

    ``cache_dir`` is the tenant's own (installs are never shared between tenants). Raises EngineError
    carrying the installer's output when installation fails.
    """
    name = manifest_name(runtime)
    text = files.get(name)
    if text is None or not _meaningful(runtime, text):
        return DepsResult(path=None, cached=True, manifest=name)
    target = cache_path(runtime, text, cache_dir)
    kind, key = target.parent.name, target.name
    if target.is_dir():
        return DepsResult(path=target, cached=True, manifest=name)
    with _lock_for(str(target)):
        if target.is_dir():
            return DepsResult(path=target, cached=True, manifest=name)
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=target.parent))
        identity = isolation.identity if isolation is not None else None
        try:
            if identity is not None:
                os.chown(work, identity.uid, identity.gid)
            if kind == "python":
                output = _pip_install(text, work, installer, isolation)
            else:
                output = _npm_install(text, work, installer, isolation)
            _seal(work)
            os.rename(work, target)  # atomic: a half-installed folder is never seen as a cache hit
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return DepsResult(path=target, cached=False, output=output, manifest=name)


def _seal(folder: Path) -> None:
    """The install becomes the platform's: owned by this process, read-only to everyone else, so neither
    the tenant's later processes nor anyone else's can change it. Walked by directory descriptors and
    opened without following links: a process left over from the install cannot swap in a symlink to a
    host file."""
    uid, gid = os.geteuid(), os.getegid()
    for _, dirnames, filenames, dir_fd in os.fwalk(folder, follow_symlinks=False):
        for name in [*dirnames, *filenames]:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError:  # a symlink (left as it is: it points inside the sandbox) or gone
                with contextlib.suppress(OSError):
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                continue
            try:
                info = os.fstat(fd)
                if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
                    os.fchown(fd, uid, gid)
                    executable = stat.S_ISDIR(info.st_mode) or info.st_mode & 0o111
                    os.fchmod(fd, 0o755 if executable else 0o644)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)


def cache_path(runtime: str, manifest_text: str, cache_dir: Path) -> Path:
    """Where the install of this exact manifest lives (or will live) in the cache."""
    kind = "node" if runtime.startswith("node") else "python"
    return Path(cache_dir) / kind / hashlib.sha256(f"{runtime}\0{manifest_text}".encode()).hexdigest()


def _run(launch: sandbox.Launch, what: str) -> str:
    try:
        started = sandbox.start(launch, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise EngineError(f"Could not run the {what} installer: {exc}") from None
    try:
        stdout, _ = started.process.communicate(timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started.process.pid, signal.SIGKILL)
        stdout, _ = started.process.communicate()
        raise EngineError(f"Installing dependencies took longer than {INSTALL_TIMEOUT} s.",
                          details={"output": stdout.decode("utf-8", "replace")}) from None
    finally:
        started.close()
    output = stdout.decode("utf-8", "replace")
    if started.process.returncode != 0:
        last = [line for line in output.strip().splitlines() if line.strip()]
        summary = last[-1] if last else f"exit status {started.process.returncode}"
        if launch.group is not None and launch.group.oom_killed():
            summary = f"the installer ran out of memory ({launch.group.name})"
        raise EngineError(f"Installing dependencies failed: {summary}", details={"output": output})
    return output


# The operator's index and proxy settings the installers need (and nothing else of the portal's). The
# tenant's install code can read them: use a mirror or proxy without credentials in its URL.
OPERATOR_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                "http_proxy", "https_proxy", "no_proxy", "npm_config_registry")


def _installer_env(**extra: str) -> dict:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


INSIDE_TARGET = "/var/nimbus/deps"
INSIDE_MANIFEST = "/var/nimbus/code"
# pip, run from its package folder on an interpreter that may not have it (the system's).
PIP_MAIN = ("import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'pip'; "
            "from pip._internal.cli.main import main; sys.exit(main())")


def _launch(argv: list[str], work: Path, manifest_dir: Path, installer: Installer,
            isolation: sandbox.Isolation | None, extra_ro: list[str], env: dict) -> sandbox.Launch:
    layout = sandbox.Layout(code_dir=manifest_dir, deps_dir=None, sandboxed=installer.sandboxed,
                            runtime_dir=sandbox.reachable_copy(sandbox.RUNTIMES_DIR, Path(installer.tools_root))
                            if installer.tools_root else sandbox.RUNTIMES_DIR)
    group = None
    if isolation is not None:
        group = isolation.resources.group(f"b{next(_build_numbers)}", memory_bytes=installer.memory_mb * 1024 * 1024,
                                          pids_max=512, cpu_millicores=None)
    return sandbox.Launch(
        argv=argv, layout=layout, env=env, secret_env={},
        identity=isolation.identity if isolation is not None else None,
        rlimits={"cpu": INSTALL_TIMEOUT, "nofile": 1024, "core": 0} if group is not None or isolation is None
        else {"cpu": INSTALL_TIMEOUT, "nofile": 1024, "core": 0, "nproc": 512},
        group=group, egress=installer.sandboxed, allow_cidrs=isolation.allow_cidrs if isolation else (),
        tmp_bytes=installer.memory_mb * 1024 * 1024, extra_ro=[*extra_ro, *installer.local_dirs],
        binds=[(str(work), INSIDE_TARGET)] if installer.sandboxed else [],
        operator_env={k: v for k, v in os.environ.items() if k in OPERATOR_ENV},
        chdir=INSIDE_TARGET, cwd=str(work), stdin=subprocess.DEVNULL)


def _pip_install(requirements: str, work: Path, installer: Installer, isolation: sandbox.Isolation | None) -> str:
    folder = Path(tempfile.mkdtemp(prefix=f"{work.name}-manifest-", dir=work.parent))
    (folder / "requirements.txt").write_text(requirements)
    os.chmod(folder, 0o755)
    os.chmod(folder / "requirements.txt", 0o644)
    python = sandbox.python_executable(installer.python)
    pip_dir = sandbox.pip_package_dir()
    if installer.tools_root:
        pip_dir = str(sandbox.reachable_copy(Path(pip_dir), Path(installer.tools_root)))
    tools = str(Path(pip_dir).parent)
    try:
        if installer.sandboxed:
            argv = [python, "-I", "-S", "-c", PIP_MAIN, sandbox.SANDBOX_TOOLS, "install", "--no-input",
                    "--no-warn-script-location", "--target", INSIDE_TARGET, "-r", f"{INSIDE_MANIFEST}/requirements.txt"]
            extra = sandbox.interpreter_roots(python)
        else:
            argv = [python, "-I", "-S", "-c", PIP_MAIN, tools, "install", "--no-input", "--no-warn-script-location",
                    "--target", str(work), "-r", str(folder / "requirements.txt")]
            extra = []
        env = _installer_env(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
        launch = _launch(argv, work, folder, installer, isolation, extra, env)
        if installer.sandboxed:
            launch.ro_binds.append((pip_dir, f"{sandbox.SANDBOX_TOOLS}/pip"))
        try:
            return _run(launch, "pip")
        finally:
            if launch.group is not None:
                launch.group.remove()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _npm_install(package_json: str, work: Path, installer: Installer, isolation: sandbox.Isolation | None) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise EngineError("npm is not installed on this machine; Node dependencies cannot be installed.")
    manifest = work / "package.json"
    manifest.write_text(package_json)
    if isolation is not None and isolation.identity is not None:
        os.chown(manifest, isolation.identity.uid, isolation.identity.gid)
    env = _installer_env(npm_config_update_notifier="false", npm_config_fund="false", npm_config_audit="false",
                         npm_config_cache="/tmp/npm-cache")
    # --install-links copies local folders instead of symlinking them (links would dangle in the sandbox).
    argv = [npm, "install", "--omit=dev", "--no-audit", "--no-fund", "--install-links", "--no-package-lock"]
    launch = _launch(argv, work, work, installer, isolation, sandbox.interpreter_roots(npm), env)
    try:
        return _run(launch, "npm")
    finally:
        if launch.group is not None:
            launch.group.remove()
