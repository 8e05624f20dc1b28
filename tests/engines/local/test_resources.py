"""The local engine's resource controller (functions/engines/local/resources.py): real cgroups with real
processes (OOM kill, tmpfs pages counted as memory, pids.max against a fork bomb, the CPU quota,
kill_all reaching a detached grandchild, nothing left behind), the rlimit fallback, and the cgroup v2
code path against a fake directory tree that imitates the kernel's rules."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from functions.engines.local import resources
from functions.engines.local.resources import ResourceControlUnavailable, detect
from tests.engines.local.conftest import wait_for

MiB = 1 << 20


def _probe() -> tuple[str | None, str]:
    if os.geteuid() != 0:
        return None, "not root: cgroups are not writable"
    try:
        controller = detect(mode="cgroup", prefix="nimbus-probe")
    except ResourceControlUnavailable as exc:
        return None, f"cgroups are not writable here: {exc}"
    kind = controller.kind
    controller.close()
    return kind, ""


CGROUP_KIND, WHY_NOT = _probe()
needs_cgroups = pytest.mark.skipif(CGROUP_KIND is None, reason=WHY_NOT or "no cgroups")


@pytest.fixture
def controller():
    made = detect(mode="cgroup", prefix="nimbus-test")
    yield made
    made.close()
    assert not [d for d in made.parent_dirs if os.path.exists(d)]


def spawn(group, argv, **kwargs):
    """Start ``argv`` inside ``group``: the child joins every hierarchy before exec."""
    fds = group.procs_fds()

    def join():
        for fd in fds:
            os.write(fd, str(os.getpid()).encode())

    try:
        return subprocess.Popen(argv, preexec_fn=join, **kwargs)
    finally:
        for fd in fds:
            os.close(fd)


def python(code):
    return [sys.executable, "-S", "-c", textwrap.dedent(code)]


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gone(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ---- real cgroups ---------------------------------------------------------------------------------------

@needs_cgroups
def test_a_process_over_its_memory_limit_is_oom_killed(controller):
    group = controller.group("m1", memory_bytes=64 * MiB, pids_max=None, cpu_millicores=None)
    assert not group.oom_killed()
    process = spawn(group, python("block = b'x' * (256 << 20)"))
    assert process.wait(timeout=20) == -signal.SIGKILL
    assert group.oom_killed()
    assert 16 * MiB < group.memory_peak() <= 64 * MiB + MiB

    calm = controller.group("m2", memory_bytes=64 * MiB, pids_max=None, cpu_millicores=None)
    assert spawn(calm, python("block = b'x' * (8 << 20)")).wait(timeout=20) == 0
    assert not calm.oom_killed()


@needs_cgroups
@pytest.mark.skipif(not shutil.which("unshare"), reason="unshare (util-linux) is not installed")
def test_tmpfs_pages_count_against_the_memory_limit(controller, tmp_path):
    """A private tmpfs (in the writer's own mount namespace, so the host never sees it) written past
    the limit: the pages are charged to the writer's group and, with nowhere to swap them, it is killed."""
    mountpoint = tmp_path / "tmp"
    mountpoint.mkdir()
    writer = textwrap.dedent("""
        import os, sys
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)
        chunk = b"x" * (1 << 20)
        for n in range(1, 257):
            os.write(fd, chunk)
            print(n, flush=True)
    """)
    group = controller.group("t1", memory_bytes=48 * MiB, pids_max=None, cpu_millicores=None)
    script = (f"mount -t tmpfs -o size=512m nimbus-test {mountpoint} && "
              f"exec {sys.executable} -S -c \"$0\" {mountpoint}/fill")
    process = spawn(group, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, writer],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=20)
    written = int(out.split()[-1]) if out.split() else 0
    assert process.returncode == -signal.SIGKILL, (process.returncode, err)
    assert written < 48, written
    assert group.oom_killed()
    assert not os.path.ismount(mountpoint)


@needs_cgroups
def test_pids_max_caps_a_fork_bomb(controller):
    group = controller.group("p1", memory_bytes=None, pids_max=8, cpu_millicores=None)
    bomb = python("""
        import os, time
        forks = 0
        while forks < 100:
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
            except BlockingIOError:
                break
            forks += 1
        print(forks, flush=True)
        time.sleep(30)
    """)
    process = spawn(group, bomb, stdout=subprocess.PIPE, text=True)
    forks = int(process.stdout.readline())
    assert 1 <= forks <= 8 - 1  # the bomb itself is one of the eight
    assert len(group.pids()) == forks + 1
    group.kill_all()
    assert group.pids() == []
    assert process.wait(timeout=5) == -signal.SIGKILL
    process.stdout.close()


@needs_cgroups
@pytest.mark.parametrize("freezer", [True, False], ids=["freezer", "kill-loop"])
def test_kill_all_wins_against_a_live_fork_bomb(freezer, monkeypatch):
    """Every member forks as fast as it can, refilling each slot pids.max frees; kill_all still empties
    the group (frozen first on v1 when the freezer hierarchy is there, by repeated passes without it)."""
    if not freezer:
        monkeypatch.setattr(resources, "V1_HIERARCHIES", ("memory", "pids", "cpu"))
    made = detect(mode="cgroup", prefix="nimbus-test")
    try:
        if made.kind == "cgroup-v1":
            assert ("freezer" in made._parents) is freezer
        group = made.group("b1", memory_bytes=256 * MiB, pids_max=12, cpu_millicores=None)
        process = spawn(group, python("""
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        """))
        assert wait_for(lambda: len(group.pids()) >= 10, timeout=5)
        started = time.monotonic()
        group.kill_all(timeout=5)
        assert group.pids() == []
        assert time.monotonic() - started < 3
        assert process.wait(timeout=5) == -signal.SIGKILL
    finally:
        made.close()
    assert not [d for d in made.parent_dirs if os.path.exists(d)]


@needs_cgroups
def test_kill_all_reaches_a_detached_grandchild(controller):
    group = controller.group("g1", memory_bytes=None, pids_max=16, cpu_millicores=None)
    process = spawn(group, python("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                print(os.getpid(), flush=True)
                time.sleep(30)
            os._exit(0)
        os.wait()
    """), stdout=subprocess.PIPE, text=True)
    grandchild = int(process.stdout.readline())
    assert process.wait(timeout=5) == 0  # the starter and the middle process are gone
    process.stdout.close()
    assert os.getsid(grandchild) not in (os.getsid(0), process.pid)  # a session of its own, orphaned
    assert group.pids() == [grandchild]
    group.kill_all()
    assert group.pids() == []
    assert wait_for(lambda: gone(grandchild), timeout=5)


@needs_cgroups
def test_add_moves_a_running_process_and_remove_kills_it(controller):
    group = controller.group("a1", memory_bytes=64 * MiB, pids_max=4, cpu_millicores=None)
    process = subprocess.Popen(["sleep", "30"])
    group.add(process.pid)
    assert group.pids() == [process.pid]
    directories = group.directories
    group.remove()
    assert process.wait(timeout=5) == -signal.SIGKILL
    assert not [d for d in directories if os.path.exists(d)]
    group.remove()  # again: nothing to do
    other = controller.group("a2", memory_bytes=None, pids_max=None, cpu_millicores=None)
    with pytest.raises(ProcessLookupError):
        other.add(process.pid)


@needs_cgroups
def test_cpu_millicores_hold_a_busy_loop_to_its_share(controller):
    group = controller.group("c1", memory_bytes=None, pids_max=None, cpu_millicores=200)
    process = spawn(group, python("""
        print("go", flush=True)
        while True:
            pass
    """), stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "go"
        used, started = cpu_seconds(process.pid), time.monotonic()
        time.sleep(1.0)
        share = (cpu_seconds(process.pid) - used) / (time.monotonic() - started)
    finally:
        group.remove()
        process.wait(timeout=5)
        process.stdout.close()
    assert 0.05 < share < 0.4, share


@needs_cgroups
@pytest.mark.skipif(CGROUP_KIND != "cgroup-v1", reason="cgroup v1 control files")
def test_v1_limits_are_written(controller):
    group = controller.group("v1", memory_bytes=64 * MiB, pids_max=20, cpu_millicores=200)
    dirs = group._dirs

    def read(hierarchy, name):
        return Path(dirs[hierarchy], name).read_text().strip()

    assert read("memory", "memory.limit_in_bytes") == str(64 * MiB)
    if Path(dirs["memory"], "memory.memsw.limit_in_bytes").exists():
        assert read("memory", "memory.memsw.limit_in_bytes") == str(64 * MiB)
    assert "oom_kill_disable 0" in read("memory", "memory.oom_control")
    assert read("pids", "pids.max") == "20"
    assert read("cpu", "cpu.cfs_quota_us") == "20000"
    unlimited = controller.group("v2", memory_bytes=None, pids_max=None, cpu_millicores=0)
    assert Path(unlimited._dirs["cpu"], "cpu.cfs_quota_us").read_text().strip() == "-1"
    assert Path(unlimited._dirs["pids"], "pids.max").read_text().strip() == "max"
    # Nested under the portal's own cgroup, so its limits still apply.
    own = resources.parse_proc_cgroup(Path("/proc/self/cgroup").read_text())[0]["memory"]
    assert dirs["memory"].startswith(os.path.join("/sys/fs/cgroup/memory", own.lstrip("/")).rstrip("/") + "/")


UNIFIED = "/sys/fs/cgroup/unified"


@pytest.mark.skipif(CGROUP_KIND != "cgroup-v1" or not os.access(UNIFIED, os.W_OK)
                    or not os.path.exists(os.path.join(UNIFIED, "cgroup.procs")),
                    reason="needs the writable cgroup2 mount of a hybrid host (and v1 pids to bound the bomb)")
@pytest.mark.parametrize("how", ["cgroup.kill", "cgroup.freeze"])
def test_v2_kill_all_on_the_hybrid_hosts_unified_mount(how, controller, monkeypatch):
    """The v2 kill paths on the real kernel: the hybrid's cgroup2 mount has no controllers, so the
    bomb is bounded by a v1 pids group it joins as well."""
    parent = os.path.join(UNIFIED, f"nimbus-test-{os.getpid()}")
    os.mkdir(parent)
    unified = resources.CgroupV2Controller({"unified": parent}, (), [])
    try:
        cap = controller.group("cap", memory_bytes=256 * MiB, pids_max=12, cpu_millicores=None)
        group = unified.group("z1", memory_bytes=None, pids_max=None, cpu_millicores=None)
        if how == "cgroup.freeze":
            real_exists = os.path.exists
            monkeypatch.setattr(os.path, "exists", lambda p: not p.endswith("cgroup.kill") and real_exists(p))
        fds = cap.procs_fds() + group.procs_fds()

        def join():
            for fd in fds:
                os.write(fd, str(os.getpid()).encode())

        try:
            process = subprocess.Popen(python("""
                import os
                while True:
                    try:
                        os.fork()
                    except OSError:
                        pass
            """), preexec_fn=join)
        finally:
            for fd in fds:
                os.close(fd)
        assert wait_for(lambda: len(group.pids()) >= 10, timeout=5)
        group.kill_all(timeout=5)
        assert group.pids() == [] and cap.pids() == []
        assert process.wait(timeout=5) == -signal.SIGKILL
    finally:
        unified.close()
    assert not os.path.exists(parent)


@needs_cgroups
def test_remove_and_close_leave_no_directories():
    made = detect(mode="cgroup", prefix="nimbus-test")
    first = made.group("r1", memory_bytes=32 * MiB, pids_max=4, cpu_millicores=100)
    second = made.group("r2", memory_bytes=32 * MiB, pids_max=4, cpu_millicores=100)
    process = spawn(second, ["sleep", "30"])
    everything = first.directories + second.directories + made.parent_dirs
    assert all(os.path.isdir(d) for d in everything)
    assert "nimbus-test-" in made.describe()
    with pytest.raises(ValueError):
        made.group("r1", memory_bytes=None, pids_max=None, cpu_millicores=None)
    first.remove()
    assert not [d for d in first.directories if os.path.exists(d)]
    made.close()
    assert process.wait(timeout=5) == -signal.SIGKILL
    assert not [d for d in everything if os.path.exists(d)]
    made.close()
    second.remove()
    with pytest.raises(RuntimeError):
        made.group("r3", memory_bytes=None, pids_max=None, cpu_millicores=None)


@needs_cgroups
def test_two_controllers_in_one_process_do_not_collide():
    one, two = detect(mode="cgroup"), detect(mode="cgroup")
    try:
        assert set(one.parent_dirs).isdisjoint(two.parent_dirs)
        one.group("z1", memory_bytes=None, pids_max=None, cpu_millicores=None)
        two.group("z1", memory_bytes=None, pids_max=None, cpu_millicores=None)
    finally:
        one.close()
        two.close()


# ---- without cgroups ------------------------------------------------------------------------------------

def test_rlimit_mode_makes_no_groups():
    made = detect(mode="rlimit")
    assert made.kind == "rlimit"
    assert made.controllers == ()
    assert made.group("i12-3", memory_bytes=64 * MiB, pids_max=8, cpu_millicores=200) is None
    assert made.describe().startswith("rlimit")
    made.close()


def test_no_cgroups_raise_in_cgroup_mode_and_fall_back_in_auto(tmp_path):
    with pytest.raises(ResourceControlUnavailable, match="no usable cgroup memory controller"):
        detect(root=str(tmp_path), mode="cgroup", self_cgroup=lambda: "0::/\n")
    with pytest.raises(ResourceControlUnavailable, match="no cgroup filesystem"):
        detect(root=str(tmp_path / "missing"), mode="cgroup")
    fallback = detect(root=str(tmp_path), mode="auto", self_cgroup=lambda: "0::/\n")
    assert fallback.kind == "rlimit"
    assert "no usable cgroup memory controller" in fallback.describe()
    with pytest.raises(ValueError):
        detect(mode="sometimes")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../z1", "memory.max", "a b", "x" * 64, 12])
def test_group_names_are_checked(name):
    with pytest.raises(ValueError):
        detect(mode="rlimit").group(name, memory_bytes=None, pids_max=None, cpu_millicores=None)


def test_limits_are_checked():
    made = detect(mode="rlimit")
    for limits in ({"memory_bytes": 0}, {"pids_max": -1}, {"cpu_millicores": -5}, {"memory_bytes": 1.5}):
        arguments = {"memory_bytes": None, "pids_max": None, "cpu_millicores": None} | limits
        with pytest.raises(ValueError):
            made.group("z1", **arguments)


# ---- cgroup v2, on a fake tree --------------------------------------------------------------------------

OWN = "/system.slice/nimbus.service"


class FakeCgroup2:
    """A directory tree laid out like a cgroup2 mount, and the kernel rules the controller meets:
    cgroup.subtree_control takes "+x" edits (not replacement) and refuses them with EBUSY while the
    cgroup holds processes ("no internal processes", the root excepted); writing a pid to cgroup.procs
    moves it out of wherever it was; rmdir removes the control files with the directory."""

    def __init__(self, root: Path, monkeypatch, procs=""):
        self.root = root
        (root / "system.slice" / "nimbus.service").mkdir(parents=True)
        (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
        (root / "system.slice" / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (root / "system.slice" / "cgroup.subtree_control").write_text("cpu io memory pids\n")
        self.own = root / OWN.lstrip("/")
        (self.own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        (self.own / "cgroup.subtree_control").write_text("")
        (self.own / "cgroup.procs").write_text(procs)
        self.real_write, self.real_rmdir = resources._write, os.rmdir
        monkeypatch.setattr(resources, "_write", self.write)
        monkeypatch.setattr(os, "rmdir", self.rmdir)
        self.proc_self_cgroup = f"0::{OWN}\n"

    def self_cgroup(self):
        return self.proc_self_cgroup

    def procs(self, directory):
        path = Path(directory, "cgroup.procs")
        return path.read_text().split() if path.exists() else []

    def write(self, path, value):
        path = Path(path)
        if path.name == "cgroup.subtree_control":
            if path.parent != self.root and self.procs(path.parent):
                raise OSError(errno.EBUSY, "Device or resource busy")
            enabled = path.read_text().split() if path.exists() else []
            for token in value.split():
                name = token[1:]
                if token.startswith("+") and name not in enabled:
                    enabled.append(name)
                elif token.startswith("-") and name in enabled:
                    enabled.remove(name)
            path.write_text(" ".join(enabled) + "\n")
        elif path.name == "cgroup.procs":
            for procs in self.root.rglob("cgroup.procs"):
                procs.write_text("".join(f"{p}\n" for p in procs.read_text().split() if p != value))
            path.write_text(path.read_text() + f"{value}\n" if path.exists() else f"{value}\n")
        else:
            self.real_write(str(path), value)

    def rmdir(self, path, *args, **kwargs):
        if args or kwargs or not str(path).startswith(str(self.root)):
            return self.real_rmdir(path, *args, **kwargs)  # not ours (shutil.rmtree's, with dir_fd)
        if self.procs(path):
            raise OSError(errno.EBUSY, "Device or resource busy")
        if os.path.isdir(path):
            for entry in Path(path).iterdir():
                if entry.is_file():
                    entry.unlink()
        self.real_rmdir(path)


def test_v2_group_limits_are_written(tmp_path, monkeypatch):
    fake = FakeCgroup2(tmp_path, monkeypatch)
    made = detect(root=str(tmp_path), mode="cgroup", self_cgroup=fake.self_cgroup)
    assert made.kind == "cgroup-v2"
    assert made.controllers == ("memory", "pids", "cpu")
    parent = Path(made.parent_dirs[0])
    assert parent.parent == fake.own and parent.name.startswith(f"nimbus-{os.getpid()}-")
    assert made.describe() == f"cgroup v2 (memory, pids, cpu) under {parent}"
    assert (fake.own / "cgroup.subtree_control").read_text().split() == ["memory", "pids", "cpu"]
    assert (parent / "cgroup.subtree_control").read_text().split() == ["memory", "pids", "cpu"]
    assert not (fake.own / resources.PORTAL_LEAF).exists()  # nothing had to move

    group = made.group("z12", memory_bytes=256 * MiB, pids_max=32, cpu_millicores=200)
    directory = parent / "z12"
    assert group.directories == [str(directory)]
    assert (directory / "memory.max").read_text() == str(256 * MiB)
    assert (directory / "memory.swap.max").read_text() == "0"
    assert (directory / "pids.max").read_text() == "32"
    assert (directory / "cpu.max").read_text() == "20000 100000"

    small = made.group("i12-3", memory_bytes=None, pids_max=None, cpu_millicores=2500)
    assert (parent / "i12-3" / "cpu.max").read_text() == "250000 100000"
    assert not (parent / "i12-3" / "memory.max").exists()  # unlimited: the kernel's default "max"
    tiny = made.group("i12-4", memory_bytes=None, pids_max=None, cpu_millicores=1)
    assert (parent / "i12-4" / "cpu.max").read_text() == "1000 100000"  # the kernel's minimum quota
    made.group("i12-5", memory_bytes=None, pids_max=None, cpu_millicores=0)
    assert not (parent / "i12-5" / "cpu.max").exists()

    assert not group.oom_killed() and group.memory_peak() is None
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 41\noom 2\noom_kill 1\noom_group_kill 0\n")
    (directory / "memory.peak").write_text(f"{200 * MiB}\n")
    assert group.oom_killed()
    assert group.memory_peak() == 200 * MiB

    small.remove()
    assert not (parent / "i12-3").exists()
    assert tiny in made.groups() and small not in made.groups()
    made.close()
    assert not parent.exists()
    assert fake.own.exists()


def test_v2_moves_the_portal_into_a_leaf_to_enable_controllers(tmp_path, monkeypatch):
    fake = FakeCgroup2(tmp_path, monkeypatch, procs="4242\n4243\n")
    made = detect(root=str(tmp_path), mode="cgroup", self_cgroup=fake.self_cgroup)
    leaf = fake.own / resources.PORTAL_LEAF
    assert fake.procs(leaf) == ["4242", "4243"]
    assert fake.procs(fake.own) == []
    assert (fake.own / "cgroup.subtree_control").read_text().split() == ["memory", "pids", "cpu"]
    assert f"moved the portal's processes into {leaf}" in made.describe()
    assert Path(made.parent_dirs[0]).parent == fake.own

    # /proc/self/cgroup now names the leaf: a second controller nests beside it, not inside it.
    fake.proc_self_cgroup = f"0::{OWN}/{resources.PORTAL_LEAF}\n"
    second = detect(root=str(tmp_path), mode="cgroup", self_cgroup=fake.self_cgroup)
    assert Path(second.parent_dirs[0]).parent == fake.own
    assert "moved" not in second.describe()
    second.close()
    made.close()
    assert sorted(p.name for p in fake.own.iterdir() if p.is_dir()) == [resources.PORTAL_LEAF]


def test_v2_without_a_memory_controller_is_unavailable(tmp_path, monkeypatch):
    fake = FakeCgroup2(tmp_path, monkeypatch)
    (fake.own / "cgroup.controllers").write_text("cpu pids\n")
    with pytest.raises(ResourceControlUnavailable, match="memory controller is not available"):
        detect(root=str(tmp_path), mode="cgroup", self_cgroup=fake.self_cgroup)
    assert detect(root=str(tmp_path), self_cgroup=fake.self_cgroup).kind == "rlimit"
    assert [p for p in fake.own.iterdir() if p.is_dir()] == []


def test_v2_without_cpu_still_limits_memory_and_pids(tmp_path, monkeypatch):
    fake = FakeCgroup2(tmp_path, monkeypatch)
    (fake.own / "cgroup.controllers").write_text("memory pids\n")
    made = detect(root=str(tmp_path), mode="cgroup", self_cgroup=fake.self_cgroup)
    assert made.controllers == ("memory", "pids")
    assert "without cpu" in made.describe()
    made.group("z1", memory_bytes=MiB, pids_max=2, cpu_millicores=500)
    assert not Path(made.parent_dirs[0], "z1", "cpu.max").exists()
    made.close()


def test_v2_unwritable_tree_is_unavailable(tmp_path, monkeypatch):
    fake = FakeCgroup2(tmp_path, monkeypatch)

    def refuse(path, value):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(resources, "_write", refuse)
    with pytest.raises(ResourceControlUnavailable, match="Permission denied"):
        detect(root=str(tmp_path), mode="cgroup", self_cgroup=fake.self_cgroup)
