"""The escape suite: real functions, deployed through the services into the real sandbox, each trying one
way out — to the host, the portal or another tenant — and each attempt must fail. Runs as root in CI."""

import json
import os
import time
from pathlib import Path

import pytest

from tests.engines.local.conftest import host_listener as _listener, needs_bwrap, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), needs_bwrap]

REFUSED_ENV = ("LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "GCONV_PATH", "PYTHONSTARTUP", "PYTHONPATH",
               "NODE_OPTIONS", "BASH_ENV")


def _store_env(function, names, value):
    """Variables stored before the API refused them: the engine must drop them on its own."""
    from functions.models import EnvVar

    for name in names:
        EnvVar.objects.create(function=function, name=name, value=value)


def _redeploy(members, function):
    from functions.services import function_deploy

    revision = function_deploy(acting_user=members["developer"], function=function)
    revision.refresh_from_db()
    assert revision.status == "ready", revision.status_message
    return revision


def _host_uid(pid):
    with open(f"/proc/{pid}/status") as file:
        return int(next(line for line in file if line.startswith("Uid:")).split()[1])


def _processes_with(marker: bytes):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    if marker in file.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


ENV_PROBE = """
import os

def handle(event, context):
    return {"env": dict(os.environ)}
"""

NODE_ENV_PROBE = "module.exports.handle = async () => ({ env: process.env });\n"


def test_loader_variables_never_reach_the_launcher_or_the_function(engine, deploy, gateway, members):
    from functions.services import function_secret_set

    function, _ = deploy("envprobe", {"handler.py": ENV_PROBE})
    _store_env(function, REFUSED_ENV, "/tmp/evil.so")
    function_secret_set(acting_user=members["developer"], function=function, name="API_KEY", value="s3cr3t-v4lue")
    revision = _redeploy(members, function)
    env = gateway.get("/fn/acme/envprobe/").json()["env"]
    assert env["API_KEY"] == "s3cr3t-v4lue"
    assert not set(REFUSED_ENV) & set(env)
    # The process that starts the sandbox (on the host) carries neither the secret nor a loader variable.
    pool = engine.pool_for(revision.pk)
    launcher = pool.launcher.process.pid
    with open(f"/proc/{launcher}/environ", "rb") as file:
        host_env = file.read()
    with open(f"/proc/{launcher}/cmdline", "rb") as file:
        host_cmdline = file.read()
    assert b"s3cr3t-v4lue" not in host_env + host_cmdline
    assert b"LD_" not in host_env and b"/tmp/evil.so" not in host_env + host_cmdline


def test_node_functions_drop_loader_variables_too(engine, deploy, gateway, members):
    function, _ = deploy("nodeenv", {"handler.js": NODE_ENV_PROBE}, runtime="node20")
    _store_env(function, REFUSED_ENV, "--require /tmp/evil.js")
    _redeploy(members, function)
    env = gateway.get("/fn/acme/nodeenv/").json()["env"]
    assert not set(REFUSED_ENV) & set(env)


MOUNTS_PROBE = """
import os

def handle(event, context):
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mounts.append({"point": fields[4], "options": fields[5], "fstype": fields[sep + 1]})
    written = {}
    for mount in mounts:
        path = os.path.join(mount["point"], "nimbus-escape-probe")
        try:
            with open(path, "wb") as f:
                f.write(b"#!/bin/sh\\necho escaped\\n")
            os.chmod(path, 0o755)
            written[mount["point"]] = True
            os.unlink(path)
        except OSError:
            written[mount["point"]] = False
    return {"mounts": mounts, "written": written, "mountinfo": open("/proc/self/mountinfo").read()}
"""


def test_no_host_backed_mount_is_writable(engine, deploy, gateway, settings):
    deploy("mounts", {"handler.py": MOUNTS_PROBE})
    result = gateway.get("/fn/acme/mounts/").json()
    host_backed = [m for m in result["mounts"] if m["fstype"] not in ("tmpfs", "proc", "devtmpfs", "devpts", "mqueue")]
    assert host_backed, "the probe should see the read-only binds"
    for mount in host_backed:
        assert "ro" in mount["options"].split(","), mount
        assert result["written"][mount["point"]] is False, mount
    # Nothing of the engine's socket folder is mounted, so its host path is nowhere to be seen.
    assert str(settings.NIMBUS_LOCAL["SOCKET_DIR"]) not in result["mountinfo"]
    assert "/run/nimbus" not in result["mountinfo"]


PEEK_PROBE = """
import os, socket

def handle(event, context):
    out = {}
    for path in event.json()["paths"]:
        try:
            with open(path, "rb") as f:
                out[path] = f.read(100).decode("latin-1")
        except OSError as exc:
            out[path] = type(exc).__name__
    for path in event.json()["sockets"]:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            out[path] = "connected"
        except OSError as exc:
            out[path] = type(exc).__name__
    for pid in event.json()["pids"]:
        try:
            os.kill(pid, 0)
            out[str(pid)] = "signalled"
        except OSError as exc:
            out[str(pid)] = type(exc).__name__
    out["visible_pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return out
"""


def test_another_tenants_code_sockets_and_processes_are_out_of_reach(engine, deploy, gateway, outsider, members):
    from functions.models import Function
    from functions.services import function_create, function_deploy
    from tenancy.models import Tenant

    globex = Tenant.objects.get(slug="globex")
    victim = function_create(acting_user=outsider, tenant=globex, name="victim",
                             files={"handler.py": "SECRET = 'globex-code'\ndef handle(e, c):\n    return 'v'\n"})
    victim_revision = function_deploy(acting_user=outsider, function=victim)
    victim_revision.refresh_from_db()
    assert victim_revision.status == "ready", victim_revision.status_message
    assert gateway.get("/fn/globex/victim/").status == 200
    victim_pool = engine.pool_for(victim_revision.pk)
    victim_inst = next(iter(victim_pool.instances.values()))
    victim_pid = victim_pool.launcher.host_pid(victim_inst)
    victim_code = str(engine.code_dir(victim_pool.spec) / "handler.py")

    _, revision = deploy("peek", {"handler.py": PEEK_PROBE})
    body = json.dumps({"paths": [victim_code, "/etc/shadow", f"/proc/{os.getpid()}/environ"],
                       "sockets": [str(victim_inst.socket_path)], "pids": [victim_pid, os.getpid()]}).encode()
    result = gateway.post("/fn/acme/peek/", body, headers={"content-type": "application/json"}).json()
    assert result[victim_code] != "SECRET = 'globex-code'"[:100] and result[victim_code] in ("FileNotFoundError",
                                                                                              "PermissionError")
    assert result["/etc/shadow"] in ("FileNotFoundError", "PermissionError")
    assert result[str(victim_inst.socket_path)] in ("FileNotFoundError", "ConnectionRefusedError",
                                                    "PermissionError")
    assert max(result["visible_pids"]) < 100  # its own pid namespace only
    # Each tenant runs as its own unprivileged host uid: not root, not each other.
    pool = engine.pool_for(revision.pk)
    acme_pid = pool.launcher.host_pid(next(iter(pool.instances.values())))
    acme_uid, globex_uid = _host_uid(acme_pid), _host_uid(victim_pid)
    assert acme_uid != 0 and globex_uid != 0 and acme_uid != globex_uid
    # Even on the host, the code of one tenant is closed to the other's uid.
    tenant_dir = engine.code_root / "globex"
    assert tenant_dir.stat().st_mode & 0o007 == 0 and tenant_dir.stat().st_gid == globex_uid
    assert Function.objects.filter(tenant=globex, name="victim").exists()


CONNECT_PROBE = """
import json, socket

def handle(event, context):
    out = {}
    for host, port in event.json()["targets"]:
        try:
            with socket.create_connection((host, port), timeout=2):
                out[f"{host}:{port}"] = "connected"
        except OSError as exc:
            out[f"{host}:{port}"] = type(exc).__name__
    return out
"""


@pytest.mark.parametrize("allow_egress", [False, True])
def test_loopback_services_and_host_addresses_are_unreachable(engine, deploy, gateway, allow_egress):
    from functions.engines.local import egress

    if allow_egress and egress.check():
        pytest.skip(f"egress is not available here: {egress.check()}")
    loopback_port, stop_loopback = _listener("127.0.0.1")
    any_port, stop_any = _listener("0.0.0.0")
    try:
        targets = [["127.0.0.1", loopback_port], ["127.0.0.1", 5432], ["127.0.0.1", 6379], ["10.0.2.2", loopback_port],
                   ["169.254.169.254", 80]]
        targets += [[address, any_port] for address in egress.host_addresses() if ":" not in address]
        name = "egress" if allow_egress else "noegress"
        deploy(name, {"handler.py": CONNECT_PROBE}, allow_egress=allow_egress)
        result = gateway.post(f"/fn/acme/{name}/", json.dumps({"targets": targets}).encode(),
                              headers={"content-type": "application/json"}).json()
    finally:
        stop_loopback.set()
        stop_any.set()
    assert "connected" not in result.values(), result


FORK_BOMB = """
import os, time

def handle(event, context):
    children = 0
    error = ""
    for _ in range(2000):
        try:
            pid = os.fork()
        except OSError as exc:
            error = type(exc).__name__
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
    return {"children": children, "error": error}
"""


def test_a_fork_bomb_is_bounded(make_engine, deploy, gateway):
    make_engine(instance_processes=32)
    deploy("bomb", {"handler.py": FORK_BOMB}, timeout_seconds=20)
    result = gateway.get("/fn/acme/bomb/").json()
    assert result["children"] < 32 and result["error"] == "BlockingIOError", result


FILL_TMP = """
import os

def handle(event, context):
    if event.path == "/list":
        return {"tmp": os.listdir(os.environ["TMPDIR"]), "tmpdir": os.environ["TMPDIR"]}
    written = 0
    chunk = b"x" * (1024 * 1024)
    try:
        with open(os.path.join(os.environ["TMPDIR"], "fill"), "wb") as f:
            for _ in range(2048):
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as exc:
        return {"written": written, "error": type(exc).__name__}
    return {"written": written, "error": ""}
"""


def test_filling_tmp_is_held_to_the_functions_memory(engine, deploy, gateway):
    deploy("filler", {"handler.py": FILL_TMP}, memory_mb=128)
    response = gateway.get("/fn/acme/filler/")
    if response.status == 200:  # the tmpfs is full before the memory limit bites
        assert response.json()["written"] <= 130 * 1024 * 1024, response.json()
    else:  # or the writer is killed at its memory limit
        assert response.status == 502, response
    # A later instance starts with an empty /tmp of its own.
    listing = gateway.get("/fn/acme/filler/list").json()
    assert listing["tmp"] == []


@pytest.mark.parametrize("resources", ["cgroup", "rlimit"])
def test_memory_at_import_is_limited_python(make_engine, deploy, resources):
    _engine_with(make_engine, resources)
    code = "BLOB = bytearray(600 * 1024 * 1024)\n\ndef handle(event, context):\n    return len(BLOB)\n"
    _, revision = deploy("fatimport", {"handler.py": code}, memory_mb=128, expect_ready=False)
    assert revision.status == "failed"
    assert "memory" in revision.status_message.lower() or "MemoryError" in revision.status_message


@pytest.mark.parametrize("resources", ["cgroup", "rlimit"])
def test_memory_at_import_is_limited_node(make_engine, deploy, resources):
    _engine_with(make_engine, resources)
    code = "const blob = Buffer.alloc(1024 * 1024 * 1024, 1);\nmodule.exports.handle = async () => blob.length;\n"
    _, revision = deploy("fatnode", {"handler.js": code}, runtime="node20", memory_mb=144, expect_ready=False)
    assert revision.status == "failed"
    message = revision.status_message.lower()
    assert "memory" in message or "allocation failed" in message, revision.status_message


def _engine_with(make_engine, resources):
    from functions.engines.local.resources import ResourceControlUnavailable

    try:
        return make_engine(resources=resources)
    except ResourceControlUnavailable as exc:
        pytest.skip(f"cgroups are not writable here: {exc}")


DETACH_PY = """
import os, time

def handle(event, context):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/usr/bin/sleep", ["sleep", "{marker}"])
        os._exit(0)
    time.sleep(5)
    return "late"
"""

DETACH_NODE = """
const { spawn } = require("child_process");
module.exports.handle = async () => {
  spawn("/usr/bin/sleep", ["{marker}"], { detached: true, stdio: "ignore" }).unref();
  await new Promise((resolve) => setTimeout(resolve, 5000));
  return "late";
};
"""


@pytest.mark.parametrize("runtime", ["python3.11", "node20"])
def test_a_detached_grandchild_dies_with_its_timed_out_instance(engine, deploy, gateway, runtime):
    marker = f"{300 + (time.time_ns() % 1000) / 1000:.3f}"
    files = ({"handler.py": DETACH_PY.replace("{marker}", marker)} if runtime.startswith("python")
             else {"handler.js": DETACH_NODE.replace("{marker}", marker)})
    deploy(f"detach{runtime[:4]}", files, runtime=runtime, timeout_seconds=1)
    response = gateway.get(f"/fn/acme/detach{runtime[:4]}/")
    assert response.status == 504, response
    assert wait_for(lambda: not _processes_with(f"sleep\0{marker}".encode()), timeout=10), \
        "the detached grandchild outlived its instance"


SYSCALLS_PROBE = """
import ctypes, errno, os

libc = ctypes.CDLL(None, use_errno=True)
CALLS = {"unshare_user": (272, 0x10000000), "unshare_net": (272, 0x40000000), "mount": (165, 0, 0, 0, 0, 0),
         "ptrace": (101, 16, 1, 0, 0), "bpf": (321, 0, 0, 0), "keyctl": (250, 0, 0, 0),
         "userfaultfd": (323, 0), "kexec_load": (246, 0, 0, 0, 0), "setns": (308, -1, 0)}

def handle(event, context):
    out = {}
    for name, args in CALLS.items():
        ctypes.set_errno(0)
        result = libc.syscall(*args)
        out[name] = errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno())) if result == -1 else "allowed"
    return out
"""


def test_forbidden_syscalls_are_refused(engine, deploy, gateway):
    if os.uname().machine != "x86_64":
        pytest.skip("the probe uses x86_64 syscall numbers")
    deploy("syscalls", {"handler.py": SYSCALLS_PROBE})
    result = gateway.get("/fn/acme/syscalls/").json()
    assert result == {name: "EPERM" for name in result}, result


def test_installers_run_as_the_tenant_without_the_host_network(make_engine, shared_tmp, function):
    """A requirements file runs code (setup.py): it runs as the tenant's uid, in the sandbox, and reaches
    neither the host's loopback services nor the portal's files."""
    import re

    from functions.engines.local.deps import ensure_deps
    from functions.services import function_ref
    from portal.errors import EngineError

    port, stop = _listener("127.0.0.1")
    package = shared_tmp / "sneaky"
    package.mkdir()
    # An in-tree build backend: pip imports it (the tenant's code) to build the package.
    (package / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "probe"\n'
                                            'backend-path = ["."]\n')
    (package / "probe.py").write_text(
        "import os, socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2); reached = 'reached'\n"
        "except OSError as exc:\n"
        "    reached = type(exc).__name__\n"
        "try:\n"
        f"    open({str(Path(__file__))!r}).read(); portal = 'read'\n"
        "except OSError as exc:\n"
        "    portal = type(exc).__name__\n"
        "print(f'PROBE uid={os.getuid()} loopback={reached} portal={portal}', flush=True)\n"
        "raise RuntimeError(f'PROBE uid={os.getuid()} loopback={reached} portal={portal}')\n")
    for path in (package, *package.iterdir()):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    try:
        engine = make_engine(deps_local_dirs=[str(shared_tmp)])
        from functions.engines.base import RevisionSpec

        spec = RevisionSpec(function=function_ref(function), number=1, revision_id=1, content_hash="x",
                            runtime="python3.11", handler="handler.handle", files={})
        with pytest.raises(EngineError) as failed:
            ensure_deps("python3.11", {"requirements.txt": f"--no-index\n{package}\n"},
                        engine._tenant_dir(engine.deps_root, spec), engine.installer, engine.isolation(spec))
    finally:
        stop.set()
    output = str(failed.value.details.get("output", ""))
    probe = re.search(r"PROBE uid=(\d+) loopback=(\w+) portal=(\w+)", output)
    assert probe, (str(failed.value), output[-2000:])
    assert probe.group(2) != "reached" and probe.group(3) != "read"
    assert probe.group(1) == "65534"  # nobody inside; on the host, the tenant's own uid


def test_auto_is_not_a_sandbox_mode():
    from functions.engines.local.engine import LocalEngine
    from portal.errors import EngineError

    with pytest.raises(EngineError, match="Unknown sandbox mode"):
        LocalEngine(sandbox_mode="auto")
