"""The sandbox's seccomp filter (functions/engines/local/seccomp.py), tried on real processes in
bubblewrap: every denied call refused, namespaces refused through clone and unshare, calls from other
ABIs killing the process, and what functions and installers do (threads, fork, exec, sockets, asyncio,
Node serving HTTP, pip and npm running build scripts) still working."""

import errno
import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from functions.engines.local import seccomp
from functions.engines.local.seccomp import NAMESPACE_FLAGS, TIOCLINUX, TIOCSTI

BWRAP = "/usr/bin/bwrap"
PYTHON = "/usr/bin/python3.11"
NODE = shutil.which("node")
NPM = shutil.which("npm")
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
TIMEOUT = 120  # Only so that a hung sandbox fails the test instead of the whole run.

def _libseccomp_missing():
    try:
        seccomp.program()
    except seccomp.SeccompUnavailable as exc:
        return str(exc)
    return None


LIBSECCOMP_MISSING = _libseccomp_missing()
needs_libseccomp = pytest.mark.skipif(LIBSECCOMP_MISSING is not None, reason=str(LIBSECCOMP_MISSING))
needs_x86_64 = pytest.mark.skipif(platform.machine() != "x86_64",
                                  reason="the probes call system calls by their x86_64 numbers")


def bwrap_argv(*, seccomp_fd=None, unprivileged=False, binds=(), chdir=None):
    argv = [BWRAP, "--unshare-all", "--unshare-user", "--new-session", "--die-with-parent",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if unprivileged:
        # As the engine runs instances: nobody, no capabilities.
        argv += ["--uid", "65534", "--gid", "65534", "--cap-drop", "ALL"]
    for host, inside in binds:
        argv += ["--bind", str(host), inside]
    if chdir:
        argv += ["--chdir", chdir]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--"]


def run_sandboxed(command, *, filtered=True, env=None, **options):
    """``command`` in bubblewrap, under the filter unless ``filtered`` is false."""
    fd = seccomp.program_fd() if filtered else None
    try:
        return subprocess.run(bwrap_argv(seccomp_fd=fd, **options) + list(command),
                              pass_fds=(fd,) if fd is not None else (), env=env or CLEAN_ENV,
                              capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        if fd is not None:
            os.close(fd)


def run_probe(code, *, filtered=True, **options):
    """The JSON a Python probe prints as its last line, run as functions are (-I -S)."""
    result = run_sandboxed([PYTHON, "-I", "-S", "-c", textwrap.dedent(code)], filtered=filtered, **options)
    assert result.returncode == 0, f"probe failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sandbox():
    if not os.path.exists(BWRAP):
        pytest.skip(f"bubblewrap is not installed ({BWRAP} missing; apt-get install bubblewrap)")
    if not os.path.exists(PYTHON):
        pytest.skip(f"{PYTHON} (the interpreter the probes run on) is missing")
    if LIBSECCOMP_MISSING:
        pytest.skip(LIBSECCOMP_MISSING)
    try:
        result = run_sandboxed(["/usr/bin/true"], filtered=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"bubblewrap cannot run here: {exc}")
    if result.returncode != 0:
        pytest.skip(f"bubblewrap cannot create its namespaces here: {result.stderr.strip()}")


# ---- the module, without processes -------------------------------------------------------------------------

REQUIRED = {
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "bpf",
    "perf_event_open", "kexec_load", "kexec_file_load", "keyctl", "add_key", "request_key", "userfaultfd",
    "setns", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl",
    "open_by_handle_at", "name_to_handle_at", "syslog", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "iopl", "ioperm", "vhangup", "lookup_dcookie", "io_uring_setup", "io_uring_enter",
    "io_uring_register",
}


def test_the_policy_denies_at_least_what_escapes_and_kernel_exploits_use():
    assert REQUIRED <= set(seccomp.DENIED)
    assert len(set(seccomp.DENIED)) == len(seccomp.DENIED)
    assert set(NAMESPACE_FLAGS.values()) == {0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000,
                                             0x20000000, 0x40000000, 0x00000080}


@needs_libseccomp
def test_program_is_a_cached_classic_bpf_program():
    data = seccomp.program()
    assert data is seccomp.program()
    assert data and len(data) % 8 == 0  # struct sock_filter: 8 bytes an instruction


@needs_libseccomp
def test_program_fd_is_a_fresh_sealed_descriptor_at_offset_zero():
    first, second = seccomp.program_fd(), seccomp.program_fd()
    try:
        assert first != second
        assert os.lseek(first, 0, os.SEEK_CUR) == 0
        assert os.read(first, len(seccomp.program()) + 1) == seccomp.program()
        seals = fcntl.fcntl(second, fcntl.F_GET_SEALS)
        for seal in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SEAL):
            assert seals & seal
        with pytest.raises(PermissionError):
            os.write(second, b"\x06\x00\x00\x00\x00\x00\xff\x7f")  # RET ALLOW, were it let in
    finally:
        os.close(first)
        os.close(second)


def test_a_missing_libseccomp_is_reported_as_seccomp_unavailable(monkeypatch):
    seccomp.program.cache_clear()
    monkeypatch.setitem(sys.modules, "pyseccomp", None)  # import pyseccomp → ImportError
    try:
        with pytest.raises(seccomp.SeccompUnavailable, match="libseccomp"):
            seccomp.program()
        with pytest.raises(seccomp.SeccompUnavailable):
            seccomp.program_fd()
    finally:
        seccomp.program.cache_clear()


@needs_libseccomp
def test_only_the_native_architecture_is_allowed_and_others_kill():
    import pyseccomp as sc

    f = seccomp._build(sc)
    assert f.get_attr(sc.Attr.ACT_BADARCH) == sc.KILL_PROCESS
    assert f.get_attr(sc.Attr.ACT_DEFAULT) == sc.ALLOW
    assert f.exist_arch(sc.Arch.NATIVE)
    for other in (sc.Arch.X86, sc.Arch.X32, sc.Arch.X86_64, sc.Arch.AARCH64, sc.Arch.ARM):
        if other != sc.system_arch():
            assert not f.exist_arch(other), hex(other)


# ---- denied calls, on real processes -----------------------------------------------------------------------

# name → (number on x86_64, arguments). The arguments are chosen so that, were a call let through (the
# unfiltered control run lets them all through), it would fail or do nothing: the probe must never
# mount, reboot or trace anything for real. "pid" stands for the probe's pid, other strings for paths.
CALLS = {
    "mount": (165, (0, 0, 0, 0, 0)),
    "umount2": (166, (0, 0)),
    "pivot_root": (155, (0, 0)),
    "chroot": (161, (0,)),
    "move_mount": (429, (-1, 0, -1, 0, 0)),
    "open_tree": (428, (-1, 0, 0)),
    "open_tree_attr": (467, (-1, 0, 0, 0, 0)),
    "fsopen": (430, (0, 0)),
    "fsconfig": (431, (-1, 0, 0, 0, 0)),
    "fsmount": (432, (-1, 0, 0)),
    "fspick": (433, (-1, 0, 0)),
    "mount_setattr": (442, (-1, 0, 0, 0, 0)),
    "ptrace": (101, (2, 0, 0, 0)),  # PTRACE_PEEKDATA of pid 0: ESRCH
    "process_vm_readv": (310, ("pid", 0, 0, 0, 0, 0)),  # nothing to copy: 0
    "process_vm_writev": (311, ("pid", 0, 0, 0, 0, 0)),
    "kcmp": (312, ("pid", "pid", 1, 0, 0)),  # KCMP_VM of itself: 0
    "pidfd_getfd": (438, (-1, 0, 0)),
    "process_madvise": (440, (-1, 0, 0, 0, 0)),
    "bpf": (321, (-1, 0, 0)),
    "perf_event_open": (298, (0, 0, -1, -1, 0)),
    "lookup_dcookie": (212, (0, 0, 0)),
    "fanotify_init": (300, (0xFFFFFFFF, 0)),
    "kexec_load": (246, (0, 0, 0, 0xFFFFFFFF)),
    "kexec_file_load": (320, (-1, -1, 0, 0, 0xFFFFFFFF)),
    "init_module": (175, (0, 0, 0)),
    "finit_module": (313, (-1, 0, 0)),
    "delete_module": (176, (0, 0)),
    "create_module": (174, (0, 0)),
    "get_kernel_syms": (177, (0,)),
    "query_module": (178, (0, 0, 0, 0, 0)),
    "uselib": (134, (0,)),
    "keyctl": (250, (-1, 0, 0, 0, 0)),
    "add_key": (248, (0, 0, 0, 0, 0)),
    "request_key": (249, (0, 0, 0, 0)),
    "userfaultfd": (323, (0xFFFFFFFF,)),
    "setns": (308, (-1, 0)),
    "reboot": (169, (0, 0, 0, 0)),  # no magic numbers: EINVAL
    "swapon": (167, (0, 0)),
    "swapoff": (168, (0,)),
    "acct": (163, (1,)),  # a bad pointer, never NULL (which would switch accounting off)
    "quotactl": (179, (0, 0, 0, 0)),
    "quotactl_fd": (443, (-1, 0, 0, 0)),
    "syslog": (103, (0, 0, 0)),  # SYSLOG_ACTION_CLOSE: a no-op
    "settimeofday": (164, (0, 0)),  # neither time nor zone: a no-op
    "clock_settime": (227, (-1, 0)),
    "clock_adjtime": (305, (-1, 0)),
    "adjtimex": (159, (0,)),
    "iopl": (172, (4,)),  # levels stop at 3: EINVAL
    "ioperm": (173, (0, 0, 0)),
    "sethostname": (170, (0, 4096)),
    "setdomainname": (171, (0, 4096)),
    "vhangup": (153, ()),  # harmless with --new-session: no controlling terminal
    "open_by_handle_at": (304, (-1, 0, 0)),
    "name_to_handle_at": (303, (-100, "/", 0, 0, 0)),  # no handle buffer: EFAULT
    "io_uring_setup": (425, (0, 0)),
    "io_uring_enter": (426, (-1, 0, 0, 0, 0, 0)),
    "io_uring_register": (427, (-1, 0, 0, 0)),
    "_sysctl": (156, (0,)),
    "ustat": (136, (0, 0)),
    "sysfs": (139, (0, 0, 0)),
    "nfsservctl": (180, (0, 0, 0)),
}

SYSCALLS_PROBE = """
import ctypes, json, os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(number, *args):
    converted = []
    for arg in args:
        if arg == "pid":
            arg = os.getpid()
        converted.append(ctypes.c_char_p(arg.encode()) if isinstance(arg, str) else ctypes.c_long(arg))
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *converted)
    return errno_name(ctypes.get_errno()) if result == -1 else "ok"

def errno_name(n):
    import errno
    return errno.errorcode.get(n, str(n))

CALLS = {calls!r}
out = {{"denied": {{name: call(number, *args) for name, (number, args) in CALLS.items()}}}}

# Namespace flags through clone and unshare. CLONE_SIGHAND without CLONE_VM (clone) and CLONE_PTRACE
# (unshare) make the kernel answer EINVAL were the call let through, so nothing is ever created here.
FLAGS = {flags!r}
out["clone"] = {{name: call(56, flag | 0x800 | 17, 0, 0, 0, 0) for name, flag in FLAGS.items()}}
out["clone"]["none"] = call(56, 0x800 | 17, 0, 0, 0, 0)
out["clone"]["high bits"] = call(56, (1 << 32) | 0x10000000 | 0x800 | 17, 0, 0, 0, 0)
out["unshare"] = {{name: call(272, flag | 0x2000) for name, flag in FLAGS.items()}}
out["unshare"]["none"] = call(272, 0x2000)
out["clone3"] = call(435, 0, 0)

# Terminal injection, on a pipe: were the ioctl let through, ENOTTY.
r, w = os.pipe()
out["ioctl"] = {{
    "TIOCSTI": call(16, r, {tiocsti}, 0),
    "TIOCSTI, upper bits set": call(16, r, (1 << 32) | {tiocsti}, 0),
    "TIOCLINUX": call(16, r, {tioclinux}, 0),
    "FIONREAD": call(16, r, 0x541B, ctypes.addressof(ctypes.c_int())),
    "TCGETS": call(16, r, 0x5401, ctypes.addressof(ctypes.create_string_buffer(64))),
}}

def personality(value):
    result = call(135, value)
    if result == "ok":
        libc.syscall(ctypes.c_long(135), ctypes.c_long(0))
    return result

values = [0, 0xFFFFFFFF, 1 << 32, (1 << 64) - 1, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, 0x0040000, 0x0008,
          (1 << 32) | 0x0008, 0xFFFFFFFF00000000 | 0x0040000]
values += [1 << bit for bit in range(32)] + [0xFFFFFFFF ^ (1 << bit) for bit in range(32)]
values += [(0x9E3779B9 * i) & 0xFFFFFFFF for i in range(1, 200)]
out["personality"] = {{str(value): personality(value) for value in values}}
print(json.dumps(out))
"""


def syscalls_probe():
    return SYSCALLS_PROBE.format(calls=CALLS, flags=NAMESPACE_FLAGS, tiocsti=TIOCSTI, tioclinux=TIOCLINUX)


@pytest.fixture(scope="module")
def confined(sandbox):
    return run_probe(syscalls_probe())


@pytest.fixture(scope="module")
def unconfined(sandbox):
    return run_probe(syscalls_probe(), filtered=False)


def test_every_denied_call_has_a_probe():
    assert set(seccomp.DENIED) <= set(CALLS)


@needs_x86_64
def test_every_denied_call_is_refused_with_eperm(confined):
    assert {name: result for name, result in confined["denied"].items() if result != "EPERM"} == {}


@needs_x86_64
def test_namespace_flags_are_refused_through_clone_and_unshare(confined):
    for call in ("clone", "unshare"):
        results = dict(confined[call])
        # Flags without a namespace reach the kernel, which refuses this deliberately invalid combination.
        assert results.pop("none") == "EINVAL", call
        assert set(results.values()) == {"EPERM"}, (call, results)
    assert confined["clone3"] == "ENOSYS"


@needs_x86_64
def test_terminal_injection_is_refused_and_other_ioctls_are_not(confined):
    assert confined["ioctl"] == {"TIOCSTI": "EPERM", "TIOCSTI, upper bits set": "EPERM", "TIOCLINUX": "EPERM",
                                 "FIONREAD": "ok", "TCGETS": "ENOTTY"}


@needs_x86_64
def test_personality_can_only_be_queried_or_reset(confined):
    # The kernel reads the persona as 32 bits: what counts is the lower half.
    allowed = {str(v) for v in map(int, confined["personality"]) if v & 0xFFFFFFFF in (0, 0xFFFFFFFF)}
    assert {"0", str(0xFFFFFFFF), str(1 << 32), str((1 << 64) - 1)} <= allowed
    for value, result in confined["personality"].items():
        assert result == ("ok" if value in allowed else "EPERM"), hex(int(value))


@needs_x86_64
def test_the_filter_is_what_refuses(confined, unconfined):
    """Without the filter the same calls get other answers: EPERM is the filter's, not missing privileges'."""
    reached = [name for name, result in unconfined["denied"].items() if result != "EPERM"]
    assert len(reached) > len(unconfined["denied"]) // 2, reached
    assert unconfined["denied"]["process_vm_readv"] == "ok"
    assert unconfined["denied"]["name_to_handle_at"] != "EPERM"
    assert set(unconfined["clone"].values()) == {"EINVAL"}
    assert set(unconfined["unshare"].values()) == {"EINVAL"}
    assert unconfined["clone3"] != "ENOSYS"
    assert unconfined["ioctl"]["TIOCSTI"] == "ENOTTY"
    assert unconfined["personality"][str(0x0008)] == "ok"


REAL_NAMESPACES_PROBE = """
import ctypes, json, os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}
for name, flags in (("unshare(CLONE_NEWUSER)", 0x10000000), ("unshare(CLONE_NEWNET)", 0x40000000),
                    ("unshare(CLONE_NEWNS)", 0x00020000)):
    out[name] = "ok" if libc.unshare(ctypes.c_int(flags)) == 0 else os.strerror(ctypes.get_errno())
# A real clone into a new user namespace (no stack: the child returns here, like fork's).
pid = libc.syscall(ctypes.c_long(56), ctypes.c_long(0x10000000 | 17), 0, 0, 0, 0)
if pid == 0:
    os._exit(0)
if pid > 0:
    os.waitpid(pid, 0)
out["clone(CLONE_NEWUSER)"] = "ok" if pid > 0 else os.strerror(ctypes.get_errno())
print(json.dumps(out))
"""


@needs_x86_64
def test_no_namespace_can_be_created(sandbox):
    results = run_probe(REAL_NAMESPACES_PROBE)
    assert set(results.values()) == {os.strerror(errno.EPERM)}, results


# ---- other ABIs --------------------------------------------------------------------------------------------

ARCH_CALL = """
import ctypes, mmap, os, sys
if sys.argv[1] == "i386":
    # mov eax, 20 (getpid in the i386 table); int 0x80; ret
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    result = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
else:
    # getpid with the x32 bit set
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(ctypes.c_long(0x40000000 | 39))
print("pid" if result == os.getpid() else f"returned {result}")
"""

ARCH_PROBE = """
import json, subprocess, sys
out = {}
for kind in ("i386", "x32"):
    done = subprocess.run([sys.executable, "-I", "-S", "-c", %r, kind], capture_output=True, text=True)
    out[kind] = [done.returncode, done.stdout.strip()]
print(json.dumps(out))
""" % ARCH_CALL


@needs_x86_64
def test_calls_through_other_abis_kill_the_process(sandbox):
    results = run_probe(ARCH_PROBE)
    assert results["x32"][0] == -signal.SIGSYS, results
    host = subprocess.run([PYTHON, "-I", "-S", "-c", ARCH_CALL, "i386"], capture_output=True, text=True,
                          timeout=TIMEOUT)
    if host.stdout.strip() != "pid":
        pytest.skip(f"this kernel runs no i386 system calls (int 0x80 → {host.returncode}), nothing to filter")
    assert results["i386"][0] == -signal.SIGSYS, results


# ---- what must keep working --------------------------------------------------------------------------------

WORKLOAD_PROBE = """
import asyncio, ctypes, json, mmap, os, select, signal, socket, subprocess, sys, threading

out = {}

box = []
thread = threading.Thread(target=box.append, args=("thread",))
thread.start()
thread.join()
out["thread"] = box == ["thread"]

pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7

out["subprocess"] = subprocess.run(["/bin/true"]).returncode == 0
out["exec output"] = subprocess.run(["/bin/sh", "-c", "echo hi"], capture_output=True, text=True).stdout == "hi\\n"
spawned = os.posix_spawn("/bin/true", ["true"], {})
out["posix_spawn"] = os.waitstatus_to_exitcode(os.waitpid(spawned, 0)[1]) == 0

a, b = socket.socketpair()
a.sendall(b"ping")
out["socketpair"] = b.recv(4) == b"ping"

server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.create_connection(server.getsockname())
peer, _ = server.accept()
client.sendall(b"tcp")
out["inet"] = peer.recv(3) == b"tcp"

memory = mmap.mmap(-1, 1 << 20)
memory[:5] = b"mmap!"
out["mmap"] = memory[:5] == b"mmap!"

got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
os.kill(os.getpid(), signal.SIGUSR1)
out["signal"] = got == [1]

poller = select.epoll()
poller.register(b, select.EPOLLIN)
a.sendall(b"x")
out["epoll"] = len(poller.poll(5)) == 1

libc = ctypes.CDLL(None, use_errno=True)
out["personality query"] = libc.personality(ctypes.c_ulong(0xFFFFFFFF)) != -1

async def main():
    async def echo(reader, writer):
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()
    server = await asyncio.start_unix_server(echo, "/tmp/echo.sock")
    reader, writer = await asyncio.open_unix_connection("/tmp/echo.sock")
    writer.write(b"asyncio\\n")
    line = await reader.readline()
    writer.close()
    server.close()
    in_thread = await asyncio.get_running_loop().run_in_executor(None, lambda: "executor")
    child = await asyncio.create_subprocess_exec("/bin/sh", "-c", "echo child", stdout=asyncio.subprocess.PIPE)
    stdout, _ = await child.communicate()
    await asyncio.sleep(0.01)
    return line == b"asyncio\\n" and in_thread == "executor" and stdout == b"child\\n"

out["asyncio"] = asyncio.run(main())
print(json.dumps(out))
"""


WORKLOAD_CHECKS = ("thread", "fork", "subprocess", "exec output", "posix_spawn", "socketpair", "inet", "mmap",
                   "signal", "epoll", "personality query", "asyncio")


@pytest.mark.parametrize("unprivileged", [False, True], ids=["root in its namespace", "as instances run"])
def test_threads_processes_sockets_signals_and_asyncio_work(sandbox, unprivileged):
    results = run_probe(WORKLOAD_PROBE, unprivileged=unprivileged)
    assert results == dict.fromkeys(WORKLOAD_CHECKS, True)


NODE_PROBE = r"""
const fs = require('fs'), http = require('http'), cp = require('child_process');
const socketPath = '/tmp/node.sock';
const out = {};
fs.writeFileSync('/tmp/a.txt', 'hello');
fs.promises.readFile('/tmp/a.txt', 'utf8').then((text) => {
  out.fs = text;
  out.execSync = cp.execFileSync('/bin/sh', ['-c', 'echo sync']).toString().trim();
  cp.execFile(process.execPath, ['-e', 'console.log(6 * 7)'], (err, stdout) => {
    out.child = err ? String(err) : stdout.trim();
    const server = http.createServer((req, res) => res.end('pong ' + req.url));
    server.listen(socketPath, () => {
      http.get({ socketPath, path: '/ping' }, (res) => {
        let body = '';
        res.on('data', (chunk) => { body += chunk; });
        res.on('end', () => {
          out.http = body;
          setTimeout(() => { out.timer = true; server.close(); console.log(JSON.stringify(out)); }, 5);
        });
      });
    });
  });
});
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize("io_uring", ["0", "1"], ids=["default", "libuv asked to use io_uring"])
def test_node_starts_and_serves_http(sandbox, io_uring):
    # UV_USE_IO_URING=1 makes libuv try io_uring: it must fall back on the refusal, not fail.
    result = run_sandboxed([NODE, "-e", NODE_PROBE], env=dict(CLEAN_ENV, UV_USE_IO_URING=io_uring))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "fs": "hello", "execSync": "sync", "child": "42", "http": "pong /ping", "timer": True}


def test_pip_builds_and_installs_a_package(sandbox, tmp_path):
    """pip runs setup.py in subprocesses, as for any source distribution."""
    if subprocess.run([PYTHON, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip(f"pip is not installed for {PYTHON}")
    if subprocess.run([PYTHON, "-c", "import setuptools, wheel"], capture_output=True).returncode != 0:
        pytest.skip(f"setuptools and wheel are not installed for {PYTHON}")
    source = tmp_path / "src"
    (source / "nimbusprobe").mkdir(parents=True)
    (source / "setup.py").write_text('from setuptools import setup\n'
                                     'setup(name="nimbusprobe", version="1.0", packages=["nimbusprobe"])\n')
    (source / "nimbusprobe" / "__init__.py").write_text("VALUE = 42\n")
    env = dict(CLEAN_ENV, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    result = run_sandboxed([PYTHON, "-I", "-m", "pip", "install", "--no-input", "--no-index", "--no-build-isolation",
                            "--target", "/work/out", "/work/src"], env=env, binds=[(tmp_path, "/work")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out" / "nimbusprobe" / "__init__.py").read_text() == "VALUE = 42\n"


@pytest.mark.skipif(NPM is None, reason="npm is not installed")
def test_npm_installs_a_package_and_runs_a_script(sandbox, tmp_path):
    """npm install, then a script (a shell and node as child processes) that loads what it installed."""
    package, app = tmp_path / "package", tmp_path / "app"
    package.mkdir()
    app.mkdir()
    (package / "package.json").write_text(json.dumps({"name": "nimbus-probe", "version": "1.0.0"}))
    (package / "index.js").write_text("module.exports = 'installed';\n")
    (app / "package.json").write_text(json.dumps({
        "name": "app", "version": "1.0.0", "dependencies": {"nimbus-probe": "file:/work/package"},
        "scripts": {"probe": "node -e \"require('fs').writeFileSync('ran.txt', require('nimbus-probe'))\""}}))
    env = dict(CLEAN_ENV, npm_config_update_notifier="false", npm_config_cache="/tmp/npm-cache")
    install = "npm install --omit=dev --no-audit --no-fund --install-links --no-package-lock --offline"
    result = run_sandboxed(["/bin/sh", "-c", f"{install} && npm run probe"], env=env,
                           binds=[(tmp_path, "/work")], chdir="/work/app")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (app / "node_modules" / "nimbus-probe" / "index.js").exists()
    assert (app / "ran.txt").read_text() == "installed"
