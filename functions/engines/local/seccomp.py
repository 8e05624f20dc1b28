"""The seccomp filter bubblewrap puts on every sandboxed process: it closes the kernel interfaces a
tenant's function (or its pip/npm install) has no use for and that attackers use to leave a sandbox."""

from __future__ import annotations

import errno
import fcntl
import functools
import os

# Refused with EPERM whatever the arguments. A denylist, like Docker's default profile, so that
# anything a runtime or a native extension needs keeps working; stricter than Docker only where a
# function has no business (Docker leaves some of these to CAP_SYS_ADMIN, which a sandbox may hold
# inside its own user namespace).
DENIED: tuple[str, ...] = (
    # Mounts and the root directory: rearranging the file system is how sandboxes are escaped.
    "mount", "umount2", "pivot_root", "chroot",
    "move_mount", "open_tree", "open_tree_attr", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # Other processes' memory and file descriptors.
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    # Programs loaded into the kernel, and kernel tracing/profiling.
    "bpf", "perf_event_open", "lookup_dcookie", "fanotify_init",
    # Replacing or extending the running kernel.
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module", "uselib",
    # The kernel keyring is not namespaced: keys would be shared with other tenants and the host.
    "keyctl", "add_key", "request_key",
    # userfaultfd stalls kernel page faults at will, the classic way to win a kernel race.
    "userfaultfd",
    # Joining another namespace (unshare and clone are checked by their flags below).
    "setns",
    # The machine's state, shared with everyone: power, swap, accounting, quotas, clock, log, ports.
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm",
    "sethostname", "setdomainname", "vhangup",
    # File handles bypass path lookup, and so the mount namespace (the "shocker" escape).
    "open_by_handle_at", "name_to_handle_at",
    # io_uring does file and socket work where this filter never sees it, and has been the source of
    # many kernel exploits. EPERM is also what kernel.io_uring_disabled answers: libuv (Node) then
    # falls back to its thread pool.
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # Obsolete interfaces nothing current calls: only attack surface.
    "_sysctl", "ustat", "sysfs", "nfsservctl",
)

# clone3 passes its flags in a struct that seccomp cannot read, so it cannot be checked the way clone
# is. ENOSYS makes glibc fall back to clone, whose flags are checked (what container runtimes do).
_UNCHECKABLE = ("clone3",)

# Any of these in the flags of clone or unshare creates a namespace: a new user namespace grants every
# capability inside it, and with them the whole kernel surface the rest of this filter closes.
NAMESPACE_FLAGS = {
    "CLONE_NEWTIME": 0x00000080,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

# Terminal ioctls that type into or drive the terminal another process reads from.
TIOCSTI = 0x5412
TIOCLINUX = 0x541C

# Calls this libseccomp (2.5.4 on Debian 12) is too old to name, by their number on x86_64.
_NEWER_THAN_LIBSECCOMP_X86_64 = {"open_tree_attr": 467}

_PERSONALITY_QUERY = 0xFFFFFFFF


class SeccompUnavailable(RuntimeError):
    """libseccomp cannot be loaded here, so no filter can be built."""


def _libseccomp():
    try:
        import pyseccomp
    except (ImportError, OSError, RuntimeError, AttributeError) as exc:
        raise SeccompUnavailable(
            f"Cannot build the sandbox's seccomp filter: libseccomp could not be loaded ({exc}). "
            "Install libseccomp2 (apt-get install libseccomp2) and the pyseccomp package.") from exc
    return pyseccomp


def _syscall_number(sc, name: str) -> int | None:
    """The native number of ``name``, or None where this architecture has no such call."""
    number = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if number >= 0:
        return number
    # Negative: unknown to libseccomp, or a pseudo-number for a call only other architectures have.
    if sc.system_arch() == sc.Arch.X86_64:
        return _NEWER_THAN_LIBSECCOMP_X86_64.get(name)
    return None


def _build(sc):
    f = sc.SyscallFilter(sc.ALLOW)
    # The filter only knows this architecture's numbers: a call made through another ABI (i386 by
    # int 0x80, x32) would slip past it, so such a call kills the process. libseccomp's default kills
    # only the calling thread, which leaves a half-dead process behind.
    try:
        f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    except OSError:
        f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL)

    def rule(action, name, *args):
        number = _syscall_number(sc, name)
        if number is not None:
            f.add_rule(action, number, *args)

    eperm = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        rule(eperm, name)
    for name in _UNCHECKABLE:
        rule(sc.ERRNO(errno.ENOSYS), name)

    # One rule per flag: a rule may compare an argument only once, and rules are OR-ed.
    for flag in NAMESPACE_FLAGS.values():
        rule(eperm, "unshare", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        # x86_64's clone takes the flags first (some architectures order the arguments differently).
        # There CLONE_NEWTIME falls in the exit-signal byte: refusing it refuses only "signals" above
        # 127, which do not exist.
        rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))

    # The kernel reads the request as 32 bits: compare only those, or setting any of the upper 32
    # would walk past an exact comparison.
    for request in (TIOCSTI, TIOCLINUX):
        rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))

    # personality may only be queried (0xffffffff) or reset to Linux (0); other personas turn off
    # address space randomisation or emulate other systems. libseccomp cannot say "neither 0 nor
    # 0xffffffff" of one argument, but those are exactly the 32-bit values that have, somewhere
    # around the ring of bits, a 1 followed by a 0: one rule for each such pair. (The kernel ignores
    # the upper 32 bits, and so do these rules.)
    for bit in range(32):
        low, high = 1 << bit, 1 << ((bit + 1) % 32)
        rule(eperm, "personality", sc.Arg(0, sc.MASKED_EQ, low | high, low))
    return f


@functools.lru_cache(maxsize=1)
def program() -> bytes:
    """The filter as a classic BPF program, what ``bwrap --seccomp FD`` reads from FD."""
    sc = _libseccomp()
    try:
        f = _build(sc)
        fd = os.memfd_create("nimbus-seccomp-export", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as out:
                f.export_bpf(out)
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except (OSError, AttributeError) as exc:
        raise SeccompUnavailable(f"Cannot build the sandbox's seccomp filter with libseccomp: {exc}") from exc
    data = b"".join(chunks)
    if not data or len(data) % 8:
        raise SeccompUnavailable(f"libseccomp exported a malformed BPF program ({len(data)} bytes).")
    return data


def program_fd() -> int:
    """A new file descriptor, at offset 0, reading program(); the caller passes it to bubblewrap and
    closes it. It is sealed: nothing can change the filter between here and bubblewrap."""
    data = program()
    fd = os.memfd_create("nimbus-seccomp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
