"""A test run leaves nothing behind in the temporary folder: the data folder tests/settings.py makes
for a run (SQLite databases, revision code, development keys, the shared folders of live-portal
tests) goes when the run ends. Checked on a real pytest run in a folder of its own."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The child runs on SQLite: on PostgreSQL it would name the same test database as this run.
NOT_INHERITED = ("NIMBUS_TEST_DATA_DIR_OWNER", "DATABASE_URL", "SQLITE_PATH", "REDIS_URL")


def test_a_test_run_removes_its_data_folder(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NIMBUS_DATA_DIR", *NOT_INHERITED)}
    env["TMPDIR"] = str(temp)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/portal/test_websocket_origin.py::test_parse_origin",
                             "tests/observability/test_metrics_access.py::test_deploy_check_warns_without_a_token"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # pytest keeps its own tmp_path folders (pytest-of-<user>, the last three runs); nothing else stays.
    assert [p.name for p in temp.iterdir() if not p.name.startswith("pytest-of-")] == []


def test_a_data_folder_given_to_the_run_is_kept(tmp_path):
    given = tmp_path / "data"
    given.mkdir()
    given.chmod(0o711)
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update({"NIMBUS_DATA_DIR": str(given), "TMPDIR": str(tmp_path)})
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/portal/test_websocket_origin.py::test_parse_origin"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert given.is_dir()
