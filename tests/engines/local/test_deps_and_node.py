"""Dependencies installed per revision into the hash-keyed cache (from local packages, no network),
their failures, and the Node.js runtime end to end."""

import base64
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from functions.engines.base import DeployEvent
from functions.engines.local.deps import cache_path, ensure_deps
from functions.models import Revision
from portal.errors import EngineError
from tests.engines.local.conftest import needs_bwrap

pytestmark = pytest.mark.django_db(transaction=True)


def build_wheel(folder: Path, name: str, version: str, module_source: str) -> Path:
    """A minimal pure-Python wheel, written by hand so that no build backend (or network) is needed."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": module_source,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: nimbus-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record_lines = []
    for path, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=").decode()
        record_lines.append(f"{path},sha256={digest},{len(content.encode())}")
    record_lines.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record_lines) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, content in files.items():
            archive.writestr(path, content)
    return wheel


@pytest.fixture
def wheelhouse(shared_tmp):
    folder = shared_tmp / "wheels"
    folder.mkdir()
    build_wheel(folder, "nimbusgreet", "1.0", "def greet(name):\n    return f'Greetings, {name}!'\n")
    return folder


USES_DEP = "import nimbusgreet\n\ndef handle(event, context):\n    return nimbusgreet.greet('Ada')\n"


def test_requirements_installed_then_cached(make_engine, deploy, gateway, wheelhouse):
    engine = make_engine(deps_local_dirs=[str(wheelhouse)])
    requirements = f"--no-index\n--find-links {wheelhouse}\nnimbusgreet==1.0\n"
    files = {"handler.py": USES_DEP, "requirements.txt": requirements}
    deploy("greeter", files)
    response = gateway.get("/fn/acme/greeter/")
    assert response.status == 200
    assert response.text == "Greetings, Ada!"

    # The same requirements again: a cache hit, no installer run.
    cache_root = Path(engine.deps_root) / "acme"  # installs are per tenant
    before = sorted(p.name for p in (cache_root / "python").iterdir() if not p.name.startswith("."))
    result = ensure_deps("python3.11", files, cache_root, engine.installer)
    assert result.cached is True and result.output == ""
    after = sorted(p.name for p in (cache_root / "python").iterdir() if not p.name.startswith("."))
    assert before == after and len(after) == 1


def test_cache_hit_is_reported_in_the_deploy(make_engine, members, tenant, wheelhouse):
    engine = make_engine(deps_local_dirs=[str(wheelhouse)])
    from functions.services import function_create, function_deploy, revision_spec

    requirements = f"--no-index\n--find-links {wheelhouse}\nnimbusgreet==1.0\n"
    function = function_create(acting_user=members["developer"], tenant=tenant, name="cached",
                               files={"handler.py": USES_DEP, "requirements.txt": requirements})
    revision = function_deploy(acting_user=members["developer"], function=function)
    events: list[DeployEvent] = []
    engine.deploy(revision_spec(revision), traffic=[], progress=events.append)
    deps = [e for e in events if e.step == "dependencies"]
    assert deps[-1].status == "ok" and "cached" in deps[-1].message


def test_install_failure_fails_the_deploy_with_the_installer_output(make_engine, members, tenant, shared_tmp):
    engine = make_engine(deps_local_dirs=[str(shared_tmp)])
    from functions.services import function_create, function_deploy, revision_spec

    requirements = f"--no-index\n--find-links {shared_tmp}\nno-such-package-anywhere==9.9\n"
    function = function_create(acting_user=members["developer"], tenant=tenant, name="broken-deps",
                               files={"handler.py": USES_DEP, "requirements.txt": requirements})
    revision = function_deploy(acting_user=members["developer"], function=function)
    revision.refresh_from_db()
    assert revision.status == Revision.Status.FAILED
    assert "Installing dependencies failed" in revision.status_message
    events: list[DeployEvent] = []
    with pytest.raises(EngineError):
        engine.deploy(revision_spec(revision), traffic=[], progress=events.append)
    failed = [e for e in events if e.step == "dependencies" and e.status == "failed"]
    assert failed and "no-such-package-anywhere" in failed[0].output
    assert not cache_path("python3.11", requirements, engine.deps_root / "acme").exists()  # nothing half-installed cached


needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")


@needs_node
def test_node_runtime(engine, deploy, gateway):
    from functions.starters import starter_files

    deploy("nodejs", starter_files("node20", "http-json"), runtime="node20")
    response = gateway.post("/fn/acme/nodejs/", json.dumps({"items": [{"price": 2.5, "quantity": 2}]}).encode(),
                            headers={"Content-Type": "application/json"})
    assert response.status == 200, response
    body = response.json()
    assert body["total"] == 5 and body["items"] == 1
    assert body["invocation"] == response.headers["x-nimbus-invocation-id"]
    assert response.headers["x-nimbus-cold-start"] == "yes"
    again = gateway.get("/fn/acme/nodejs/")
    assert again.headers["x-nimbus-cold-start"] == "no"
    assert again.json()["message"] == "Send me JSON with POST"


@needs_node
def test_node_handler_error_and_logs(engine, deploy, gateway):
    code = ("module.exports.handle = async (event, context) => {\n"
            "  console.log('about to fail', event.path);\n"
            "  throw new Error('node says no');\n"
            "};\n")
    function, _ = deploy("nodefail", {"handler.js": code}, runtime="node20")
    response = gateway.get("/fn/acme/nodefail/x")
    assert response.status == 500
    assert "node says no" not in response.text
    from functions.models import Invocation
    from tests.engines.local.conftest import wait_for

    def logged():
        engine.records.flush()
        record = Invocation.objects.filter(pk=response.headers["x-nimbus-invocation-id"]).first()
        return record and record.logs.count() >= 2 and record

    record = wait_for(logged)
    assert record.status == "error"
    messages = list(record.logs.values_list("message", flat=True))
    assert "about to fail /x" in messages
    assert any("node says no" in m for m in messages)


@needs_node
def test_node_broken_handler_fails_the_deploy(engine, deploy):
    function, revision = deploy("nodebroken", {"handler.js": "module.exports.handle = ;\n"}, runtime="node20",
                                expect_ready=False)
    assert revision.status == Revision.Status.FAILED
    assert "could not be imported" in revision.status_message


@needs_node
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_node_dependencies_from_a_local_folder(make_engine, deploy, gateway, shared_tmp):
    make_engine(deps_local_dirs=[str(shared_tmp)])
    package = shared_tmp / "nimbus-shout"
    package.mkdir()
    (package / "package.json").write_text(json.dumps({"name": "nimbus-shout", "version": "1.0.0", "main": "index.js"}))
    (package / "index.js").write_text("module.exports = (s) => s.toUpperCase() + '!';\n")
    manifest = json.dumps({"name": "fn", "version": "1.0.0", "dependencies": {"nimbus-shout": f"file:{package}"}})
    code = "const shout = require('nimbus-shout');\nmodule.exports.handle = async () => shout('hello');\n"
    deploy("shouter", {"handler.js": code, "package.json": manifest}, runtime="node20")
    response = gateway.get("/fn/acme/shouter/")
    assert response.status == 200, response
    assert response.text == "HELLO!"


@needs_bwrap
def test_installer_runs_sandboxed(make_engine, members, tenant, tmp_path):
    """A requirements file is code the tenant controls: the installer sees none of the portal's files."""
    from functions.services import function_create, function_deploy

    secret = tmp_path / "portal-secret.txt"
    secret.write_text("portal-only-value==1.0\n")
    make_engine(sandbox_mode="bwrap")
    function = function_create(acting_user=members["developer"], tenant=tenant, name="nosy",
                               files={"handler.py": USES_DEP, "requirements.txt": f"--no-index\n-r {secret}\n"})
    revision = function_deploy(acting_user=members["developer"], function=function)
    revision.refresh_from_db()
    assert revision.status == Revision.Status.FAILED
    assert "portal-only-value" not in revision.status_message
    assert "No such file" in revision.status_message or "Could not open" in revision.status_message
