"""Isolation: function code sees neither the portal's files nor its secrets (with bubblewrap), never
the portal's environment (with or without it), and no network unless egress is allowed."""

import json
import os
from pathlib import Path

import pytest
from django.conf import settings

from tests.engines.local.conftest import host_listener, needs_bwrap

pytestmark = pytest.mark.django_db(transaction=True)

PROBE = """
import json, os

PATHS = json.loads({paths!r})

def handle(event, context):
    readable = {{}}
    for path in PATHS:
        try:
            with open(path, "rb") as f:
                readable[path] = f.read(200000).decode("latin-1")
        except OSError as exc:
            readable[path] = None
    environ_hits = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{{pid}}/environ", "rb") as f:
                    if b"SECRET_KEY" in f.read():
                        environ_hits.append(pid)
            except OSError:
                pass
    return {{"env": dict(os.environ), "readable": readable, "environ_hits": environ_hits,
             "uid": os.getuid(), "cwd": os.getcwd()}}
"""


@pytest.fixture
def portal_files(tmp_path):
    """Files standing for the portal's: its SQLite database and data dir, its settings, its source."""
    data_dir = Path(settings.NIMBUS_DATA_DIR)
    data_dir.mkdir(parents=True, exist_ok=True)
    database = data_dir / "nimbus.sqlite3"
    created = not database.exists()
    if created:
        database.write_bytes(b"SQLite format 3\x00 portal database stand-in " + settings.SECRET_KEY.encode())
    paths = [str(database), str(Path(settings.BASE_DIR) / "portal" / "settings.py"),
             str(Path(settings.BASE_DIR) / "pyproject.toml")]
    yield paths
    if created:
        database.unlink()


def probe(deploy, gateway, name, paths, **config):
    deploy(name, {"handler.py": PROBE.format(paths=json.dumps(paths))}, **config)
    response = gateway.get(f"/fn/acme/{name}/")
    assert response.status == 200, response
    return response.json()


def test_environment_is_scrubbed_without_sandbox(make_engine, deploy, gateway, portal_files, members):
    from functions.models import Function
    from functions.services import function_deploy, function_env_set, function_secret_set

    make_engine(sandbox_mode="none")
    os.environ["NIMBUS_TEST_PORTAL_ONLY"] = "portal-secret-value"
    try:
        deploy("probe", {"handler.py": PROBE.format(paths=json.dumps([]))})
        function = Function.objects.get(name="probe")
        function_env_set(acting_user=members["developer"], function=function, name="GREETING", value="hi")
        function_secret_set(acting_user=members["developer"], function=function, name="API_KEY", value="s3cr3t")
        function_deploy(acting_user=members["developer"], function=function)
        response = gateway.get("/fn/acme/probe/")
        assert response.status == 200, response
        result = response.json()
    finally:
        del os.environ["NIMBUS_TEST_PORTAL_ONLY"]
    env = result["env"]
    assert env["GREETING"] == "hi" and env["API_KEY"] == "s3cr3t"
    assert env["NIMBUS_FUNCTION"] == "probe" and env["NIMBUS_TENANT"] == "acme"
    assert "SECRET_KEY" not in env and "DJANGO_SETTINGS_MODULE" not in env
    assert "NIMBUS_TEST_PORTAL_ONLY" not in env and "NIMBUS_DATA_DIR" not in env
    assert settings.SECRET_KEY not in "".join(env.values())


@needs_bwrap
def test_sandbox_hides_portal_files_and_secrets(make_engine, deploy, gateway, portal_files):
    make_engine(sandbox_mode="bwrap")
    result = probe(deploy, gateway, "probe", portal_files)
    assert result["readable"] == {path: None for path in portal_files}
    assert result["environ_hits"] == []  # not even through /proc/<portal pid>/environ
    assert "SECRET_KEY" not in result["env"]
    assert result["uid"] == 65534
    assert result["cwd"] == "/var/nimbus/code"


@needs_bwrap
def test_sandbox_system_is_read_only_and_tmp_private(make_engine, deploy, gateway, tmp_path):
    code = """
import os

def handle(event, context):
    results = {}
    for path in ("/usr/nimbus-probe", "/var/nimbus/code/probe.txt", "/tmp/probe.txt"):
        try:
            with open(path, "w") as f:
                f.write("x")
            results[path] = "written"
        except OSError as exc:
            results[path] = type(exc).__name__
    results["tmp"] = sorted(os.listdir("/tmp"))
    return results
"""
    make_engine(sandbox_mode="bwrap")
    (Path("/tmp") / "nimbus-host-marker").write_text("host")
    try:
        deploy("writer", {"handler.py": code})
        result = gateway.get("/fn/acme/writer/").json()
    finally:
        (Path("/tmp") / "nimbus-host-marker").unlink()
    assert result["/usr/nimbus-probe"] != "written"
    assert result["/var/nimbus/code/probe.txt"] != "written"
    assert result["/tmp/probe.txt"] == "written"
    assert "nimbus-host-marker" not in result["tmp"]


CONNECT = """
import socket

def handle(event, context):
    try:
        with socket.create_connection(("127.0.0.1", int(event.query["port"])), timeout=2) as s:
            return {"connected": True, "data": s.recv(100).decode()}
    except OSError as exc:
        return {"connected": False, "error": type(exc).__name__}
"""


@needs_bwrap
def test_no_network_unless_egress_and_never_the_host(make_engine, deploy, gateway):
    make_engine(sandbox_mode="bwrap")
    port, stop = host_listener()
    try:
        deploy("closed", {"handler.py": CONNECT})
        deploy("open", {"handler.py": CONNECT}, allow_egress=True)
        closed = gateway.get("/fn/acme/closed/", query=f"port={port}").json()
        opened = gateway.get("/fn/acme/open/", query=f"port={port}").json()
    finally:
        stop.set()
    assert closed["connected"] is False
    # Egress is the outside world, never the host: its loopback stays out of reach.
    assert opened["connected"] is False


@needs_bwrap
def test_a_private_checkout_still_runs_functions(make_engine, deploy, gateway, tmp_path, monkeypatch):
    """A checkout in a folder the tenants' uids cannot enter (pytest's tmp_path is one): the engine runs
    the shims from a read-only copy under its data folder instead of failing every start."""
    import shutil

    from functions.engines.local import sandbox

    private = tmp_path / "checkout" / "runtimes"
    shutil.copytree(sandbox.RUNTIMES_DIR, private)
    assert not sandbox.reachable(private)
    monkeypatch.setattr(sandbox, "RUNTIMES_DIR", private)
    engine = make_engine(sandbox_mode="bwrap")
    assert engine.runtime_dir != private and sandbox.reachable(engine.runtime_dir)
    assert (engine.runtime_dir / "python" / "nimbus_zygote.py").read_bytes() == \
        (private / "python" / "nimbus_zygote.py").read_bytes()
    deploy("private", {"handler.py": "def handle(event, context):\n    return 'from a copy'\n"})
    assert gateway.get("/fn/acme/private/").text == "from a copy"


def test_tenant_uids_never_wrap_or_overlap_subordinate_ranges(tmp_path, monkeypatch):
    from functions.engines.local import sandbox
    from portal.errors import EngineError

    if os.geteuid() != 0:
        pytest.skip("identities are only used when the portal is root")
    settings_ = {"SANDBOX_UID_BASE": 3_000_000, "SANDBOX_UID_COUNT": 1000}
    assert sandbox.identity_for(7, settings_) == sandbox.Identity(3_000_007, 3_000_007)
    with pytest.raises(EngineError, match="beyond the sandbox uid range"):
        sandbox.identity_for(1000, settings_)  # would be tenant 0's uid with a wrap-around
    subuid = tmp_path / "subuid"
    subuid.write_text("alice:100000:65536\nbob:3000500:65536\n")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: real(subuid) if str(self) == "/etc/subuid"
                        else real(self, *a, **k))
    assert "overlap /etc/subuid's range for bob" in sandbox.uid_range_problem(settings_)
    assert sandbox.uid_range_problem({"SANDBOX_UID_BASE": 4_000_000, "SANDBOX_UID_COUNT": 1000}) is None
