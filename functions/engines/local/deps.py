"""A revision's dependencies (requirements.txt / package.json), installed once per content hash
into the shared cache; an unchanged file costs nothing on the next deploy."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from functions.engines.local import sandbox
from portal.errors import EngineError

INSTALL_TIMEOUT = 600
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
    """Where installers run: inside bubblewrap when the engine sandboxes (a requirements file can run
    code: setup.py, npm scripts), seeing only the target folder, the manifest, the interpreter and the
    operator's local package folders (``NIMBUS_LOCAL["DEPS_LOCAL_DIRS"]``), with network."""

    sandboxed: bool = False
    local_dirs: tuple[str, ...] = ()


def ensure_deps(runtime: str, files: dict[str, str], cache_dir: Path,
                installer: Installer = Installer()) -> DepsResult:
    """Install the revision's dependencies unless the cache already holds them.

    Raises EngineError carrying the installer's output when installation fails.
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
        try:
            if kind == "python":
                output = _pip_install(text, work, installer)
            else:
                output = _npm_install(text, work, installer)
            os.chmod(work, 0o755)
            os.rename(work, target)  # atomic: a half-installed folder is never seen as a cache hit
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return DepsResult(path=target, cached=False, output=output, manifest=name)


def cache_path(runtime: str, manifest_text: str, cache_dir: Path) -> Path:
    """Where the install of this exact manifest lives (or will live) in the cache."""
    kind = "node" if runtime.startswith("node") else "python"
    return Path(cache_dir) / kind / hashlib.sha256(f"{runtime}\0{manifest_text}".encode()).hexdigest()


def _run(argv: list[str], cwd: Path, what: str, env: dict | None = None) -> str:
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env)
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"Installing dependencies took longer than {INSTALL_TIMEOUT} s.",
                          details={"output": (exc.stdout or "") + (exc.stderr or "")}) from None
    except OSError as exc:
        raise EngineError(f"Could not run the {what} installer: {exc}") from None
    output = (result.stdout or "") + (result.stderr or "")
    if result.returncode != 0:
        last = [line for line in output.strip().splitlines() if line.strip()]
        summary = last[-1] if last else f"exit status {result.returncode}"
        raise EngineError(f"Installing dependencies failed: {summary}", details={"output": output})
    return output


def _installer_env() -> dict:
    # The installer runs as the portal but needs none of its secrets.
    keep = ("PATH", "HOME", "LANG", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "HTTP_PROXY",
            "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "npm_config_registry")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


INSIDE_TARGET = "/var/nimbus/deps"
INSIDE_MANIFEST = "/var/nimbus/manifest"


def _isolated(argv: list[str], work: Path, manifest: Path, installer: Installer, extra_ro: list[str]) -> list[str]:
    """``argv`` (written with the sandbox's paths) inside bubblewrap, when the installer is sandboxed."""
    args = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--share-net", "--uid", str(sandbox.SANDBOX_UID),
            "--gid", str(sandbox.SANDBOX_UID), "--cap-drop", "ALL", "--new-session", "--die-with-parent",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--dir", "/etc"]
    for name in sandbox.ETC_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for path in [*extra_ro, *installer.local_dirs]:
        args += ["--ro-bind", str(path), str(path)]
    args += ["--bind", str(work), INSIDE_TARGET, "--ro-bind", str(manifest), f"{INSIDE_MANIFEST}/{manifest.name}",
             "--chdir", INSIDE_TARGET, "--"]
    return args + argv


def _pip_install(requirements: str, work: Path, installer: Installer) -> str:
    folder = Path(tempfile.mkdtemp(prefix=f"{work.name}-manifest-", dir=work.parent))
    manifest = folder / "requirements.txt"
    manifest.write_text(requirements)
    try:
        env = _installer_env()
        env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
        if installer.sandboxed:
            python = sandbox.python_executable()
            argv = _isolated([python, "-m", "pip", "install", "--no-input", "--no-warn-script-location",
                              "--target", INSIDE_TARGET, "-r", f"{INSIDE_MANIFEST}/requirements.txt"],
                             work, manifest, installer, sandbox.interpreter_roots(python))
            env.update(HOME="/tmp", TMPDIR="/tmp")
        else:
            # The portal's interpreter carries pip; --target keeps the function's packages out of the
            # portal's own site-packages (both interpreters are the same Python version).
            argv = [sys.executable, "-m", "pip", "install", "--no-input", "--no-warn-script-location",
                    "--target", str(work), "-r", str(manifest)]
        return _run(argv, work, "pip", env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _npm_install(package_json: str, work: Path, installer: Installer) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise EngineError("npm is not installed on this machine; Node dependencies cannot be installed.")
    (work / "package.json").write_text(package_json)
    env = _installer_env()
    env.update(npm_config_update_notifier="false", npm_config_fund="false", npm_config_audit="false")
    # --install-links copies local folders instead of symlinking them (links would dangle in the sandbox).
    argv = [npm, "install", "--omit=dev", "--no-audit", "--no-fund", "--install-links", "--no-package-lock"]
    if installer.sandboxed:
        env.update(HOME="/tmp", TMPDIR="/tmp", npm_config_cache="/tmp/npm-cache")
        argv = _isolated(argv, work, work / "package.json", installer, sandbox.interpreter_roots(npm))
    return _run(argv, work, "npm", env)
