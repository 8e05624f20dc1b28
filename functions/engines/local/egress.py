"""Filtered egress for a bwrap sandbox: slirp4netns run as the tenant uid, nftables deny rules in the sandbox's netns.
slirp4netns over pasta: it has --ready-fd/--exit-fd and a fixed 10.0.2.0/24; pasta daemonizes, reuses host addresses."""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import platform
import select
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from typing import Sequence

# What slirp4netns --configure gives the sandbox (its defaults).
SLIRP_CIDR = "10.0.2.0/24"
SLIRP_GATEWAY = "10.0.2.2"
SLIRP_DNS = "10.0.2.3"
TAP = "tap0"
# The sandbox's /etc/resolv.conf must point at slirp's forwarder, the only private address it may reach.
RESOLV_CONF = f"nameserver {SLIRP_DNS}\n"
NFT_TABLE = "nimbus_egress"

DENIED_V4 = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
)
DENIED_V6 = (
    "::/128", "::1/128",
    "::ffff:0:0/96",  # v4-mapped: a v6 socket reaching v4 ranges by another spelling
    "64:ff9b::/96", "64:ff9b:1::/48",  # NAT64 prefixes embed v4 addresses, private ones included
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
)

NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1): the user namespace that owns a namespace
SLIRP_SEARCH_PATH = "/usr/local/bin:/usr/bin:/bin"
NFT_SEARCH_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
TUN_DEVICE = "/dev/net/tun"
HELPER_ROOT = "/tmp"  # mount point (in the helper's own mount namespace only) for its minimal root

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_NO_NEW_PRIVS = 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}.get(platform.machine())  # no libc wrapper


class EgressUnavailable(RuntimeError):
    """Egress cannot be given to this sandbox; the message says what is missing."""


def _which(name: str, path: str) -> str | None:
    return shutil.which(name, path=path)


def check() -> str | None:
    """None if egress can work on this host, else the reason."""
    if _which("slirp4netns", SLIRP_SEARCH_PATH) is None:
        return "slirp4netns is not installed: apt-get install slirp4netns"
    if _which("nft", NFT_SEARCH_PATH) is None:
        return "nft is not installed: apt-get install nftables"
    if _which("nsenter", NFT_SEARCH_PATH) is None:
        return "nsenter is not installed: apt-get install util-linux"
    if not hasattr(os, "pidfd_open"):
        return "os.pidfd_open is missing (needs Linux >= 5.3)"
    try:
        mode = os.stat(TUN_DEVICE).st_mode
    except OSError:
        return f"{TUN_DEVICE} is missing: modprobe tun (in a container: --device {TUN_DEVICE})"
    if not stat.S_ISCHR(mode):
        return f"{TUN_DEVICE} is not a character device"
    # As root the helper gets its own node (see _confine_helper); otherwise it opens the host's.
    if os.geteuid() == 0 and _SYS_PIVOT_ROOT is None:
        return f"confining the helper needs pivot_root's syscall number for {platform.machine()}"
    if os.geteuid() != 0 and not os.access(TUN_DEVICE, os.R_OK | os.W_OK):
        return (f"{TUN_DEVICE} is not usable by uid {os.geteuid()} (mode {stat.S_IMODE(mode):04o}): "
                f"chmod 0666 {TUN_DEVICE}, udev's default (it grants nothing without CAP_NET_ADMIN)")
    return None


def host_addresses() -> list[str]:
    """Every address of this host's interfaces (v4 + v6), from an RTM_GETADDR netlink dump."""
    nlmsg, ifaddrmsg = struct.Struct("=IHHII"), struct.Struct("=BBBBI")
    rtm_newaddr, rtm_getaddr, nlmsg_done, nlmsg_error = 20, 22, 3, 2
    ifa_address, ifa_local = 1, 2
    found: set[str] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        body = ifaddrmsg.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(nlmsg.pack(nlmsg.size + len(body), rtm_getaddr, 0x1 | 0x300, 1, 0) + body)  # REQUEST|DUMP
        while True:
            data = sock.recv(1 << 17)
            offset = 0
            while offset + nlmsg.size <= len(data):
                length, kind = nlmsg.unpack_from(data, offset)[:2]
                if kind == nlmsg_done:
                    return sorted(found, key=lambda a: (":" in a, a))
                if kind == nlmsg_error:
                    errno_ = -struct.unpack_from("=i", data, offset + nlmsg.size)[0]
                    raise OSError(errno_, "RTM_GETADDR failed")
                if kind == rtm_newaddr:
                    family = data[offset + nlmsg.size]
                    attrs: dict[int, bytes] = {}
                    pos = offset + nlmsg.size + ifaddrmsg.size
                    while pos + 4 <= offset + length:
                        rta_len, rta_type = struct.unpack_from("=HH", data, pos)
                        if rta_len < 4:
                            break
                        attrs[rta_type] = data[pos + 4:pos + rta_len]
                        pos += (rta_len + 3) & ~3
                    # IFA_LOCAL is this end of a point-to-point link (IFA_ADDRESS is then the peer).
                    raw = attrs.get(ifa_local) or attrs.get(ifa_address)
                    if raw is not None and family in (socket.AF_INET, socket.AF_INET6):
                        found.add(str(ipaddress.ip_address(raw)))
                offset += (length + 3) & ~3


def _parse_cidrs(cidrs: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    if isinstance(cidrs, str):
        raise ValueError("allow_cidrs must be a list of CIDRs, not one string")
    networks = []
    for entry in cidrs:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip()))
        except ValueError as exc:
            raise ValueError(f"invalid CIDR in egress allow list: {entry!r} ({exc})") from None
    return networks


def ruleset(allow_cidrs: Sequence[str] = (), host: Sequence[str] = ()) -> str:
    """The nftables script for a sandbox's netns: allowed CIDRs, then DNS, then the deny list."""
    allow = _parse_cidrs(allow_cidrs)
    deny = [ipaddress.ip_network(c) for c in DENIED_V4 + DENIED_V6 + (SLIRP_GATEWAY,)]
    deny += [ipaddress.ip_network(a.split("%")[0]) for a in host]
    sets = []
    for name, version, nets in (("allow4", 4, allow), ("allow6", 6, allow), ("deny4", 4, deny), ("deny6", 6, deny)):
        # Collapsed here so that overlaps (a host address inside 10/8) don't need nft's auto-merge.
        nets = list(ipaddress.collapse_addresses(n for n in nets if n.version == version))
        kind = "ipv4_addr" if version == 4 else "ipv6_addr"
        elements = f" elements = {{ {', '.join(map(str, nets))} }};" if nets else ""
        sets.append(f"  set {name} {{ type {kind}; flags interval;{elements} }}")
    # add+delete first makes a re-attach replace the table instead of failing; all of it is one transaction.
    return "\n".join([
        f"add table inet {NFT_TABLE}",
        f"delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE} {{",
        *sets,
        "  chain egress {",
        '    oif "lo" accept',  # the sandbox's own loopback, not the host's
        f"    ip daddr {SLIRP_DNS} udp dport 53 accept",
        f"    ip daddr {SLIRP_DNS} tcp dport 53 accept",
        "    ip daddr @allow4 accept",
        "    ip6 daddr @allow6 accept",
        # Rejected, not dropped: the function gets an immediate error instead of a connect timeout.
        "    ip daddr @deny4 reject with icmpx type admin-prohibited",
        "    ip6 daddr @deny6 reject with icmpx type admin-prohibited",
        "  }",
        "  chain output { type filter hook output priority filter; policy accept; jump egress; }",
        # Nothing is routed through a sandbox; should forwarding ever get enabled, it is filtered too.
        "  chain forward { type filter hook forward priority filter; policy drop; }",
        "}",
        "",
    ])


def _syscall_ok(result: int, what: str) -> None:
    if result != 0:
        errno_ = ctypes.get_errno()
        raise OSError(errno_, f"{what}: {os.strerror(errno_)}")


def _confine_helper(userns_fd: int, netns_fd: int) -> None:
    """In the helper's forked child, as root, before dropping to the tenant uid: a mount namespace whose root
    holds only /usr, /etc, the two namespace files and its own tun node.

    slirp4netns --enable-sandbox can't do this here (it needs uid 0 mapped in the sandbox's user namespace,
    which maps only 65534), and the helper lives in the host's netns, so it should at least not see the
    host's files and sockets. The private tun node (0666, like udev's) is for hosts whose /dev/net/tun is
    0600: opening it grants nothing without CAP_NET_ADMIN over the netns, which the tenant uid has anyway."""
    _syscall_ok(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _syscall_ok(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    root = HELPER_ROOT.encode()
    _syscall_ok(_libc.mount(b"tmpfs", root, b"tmpfs", _MS_NOSUID, b"mode=0755,size=64k"), "tmpfs root")
    for name in ("usr", "etc", "ns", "dev", "dev/net"):
        os.mkdir(f"{HELPER_ROOT}/{name}", 0o755)
    for name in ("usr", "etc"):
        _syscall_ok(_libc.mount(f"/{name}".encode(), f"{HELPER_ROOT}/{name}".encode(), None, _MS_BIND | _MS_REC,
                                None), f"bind /{name}")
    # A resolv.conf symlinked out of /etc (systemd-resolved) needs its real directory for slirp's DNS.
    real = os.path.dirname(os.path.realpath("/etc/resolv.conf"))
    if real != "/etc" and not real.startswith("/usr/") and os.path.isdir(real):
        os.makedirs(HELPER_ROOT + real, 0o755)
        _syscall_ok(_libc.mount(real.encode(), (HELPER_ROOT + real).encode(), None, _MS_BIND, None), "bind " + real)
    for name in ("lib", "lib64", "lib32", "libx32", "bin", "sbin"):
        if os.path.islink(f"/{name}"):  # merged /usr
            os.symlink(os.readlink(f"/{name}"), f"{HELPER_ROOT}/{name}")
        elif os.path.isdir(f"/{name}"):
            os.mkdir(f"{HELPER_ROOT}/{name}", 0o755)
            _syscall_ok(_libc.mount(f"/{name}".encode(), f"{HELPER_ROOT}/{name}".encode(), None,
                                    _MS_BIND | _MS_REC, None), f"bind /{name}")
    tun = os.stat(TUN_DEVICE).st_rdev
    os.mknod(f"{HELPER_ROOT}/dev/net/tun", stat.S_IFCHR | 0o666, tun)
    os.chmod(f"{HELPER_ROOT}/dev/net/tun", 0o666)  # past the umask
    os.mknod(f"{HELPER_ROOT}/dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(f"{HELPER_ROOT}/dev/null", 0o666)
    # Namespace files instead of /proc: no view of the host's processes.
    for name, fd in (("user", userns_fd), ("net", netns_fd)):
        path = f"{HELPER_ROOT}/ns/{name}"
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o444))
        _syscall_ok(_libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, _MS_BIND, None),
                    f"bind {name} namespace")
    os.chdir(HELPER_ROOT)
    os.mkdir(".old", 0o700)
    _syscall_ok(_libc.syscall(_SYS_PIVOT_ROOT, b".", b".old"), "pivot_root")
    os.chdir("/")
    _syscall_ok(_libc.umount2(b"/.old", _MNT_DETACH), "detach the host's root")
    os.rmdir("/.old")
    _syscall_ok(_libc.mount(None, b"/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None), "read-only root")


def _helper_preexec(uid: int, gid: int, confine: bool, userns_fd: int, netns_fd: int, log_fd: int):
    def run() -> None:
        try:
            if confine:
                _confine_helper(userns_fd, netns_fd)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            _syscall_ok(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        except BaseException as exc:
            # subprocess only reports "Exception occurred in preexec_fn": the log keeps what it was.
            os.write(log_fd, f"helper setup failed: {exc}".encode())
            raise
    return run


def _alive(pidfd: int) -> bool:
    return not select.select([pidfd], [], [], 0)[0]


class Network:
    """slirp4netns attached to one sandbox, plus the rules in its netns; close() (or the sandbox ending, or
    this process dying) stops the helper."""

    def __init__(self, process: subprocess.Popen, exit_w: int, pidfd: int, log) -> None:
        self.process = process
        self._exit_w = exit_w
        self._pidfd = pidfd
        self._log = log
        self._stop_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._stopped = self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        self._watcher = threading.Thread(target=self._watch, name=f"egress-{process.pid}", daemon=True)
        self._watcher.start()

    @property
    def helper_pid(self) -> int:
        return self.process.pid

    @classmethod
    def attach(cls, pid: int, *, uid: int | None, gid: int | None, allow_cidrs: Sequence[str] = (),
               timeout: float = 5.0) -> "Network":
        """Give the sandbox whose process is ``pid`` (bwrap's child-pid, still blocked) filtered egress.

        ``uid``/``gid``: the host identity the helper runs as, the owner of the sandbox's user namespace
        (None: this process's own, for a portal that isn't root)."""
        _parse_cidrs(allow_cidrs)  # ValueError before anything starts
        reason = check()
        if reason:
            raise EgressUnavailable(reason)
        if (uid is None) != (gid is None):
            raise ValueError("uid and gid go together (both None: this process's own)")
        root = os.geteuid() == 0
        if uid is None:
            uid, gid = os.geteuid(), os.getegid()
        if uid == 0:
            raise EgressUnavailable("refusing to run the network helper as root: pass the sandbox owner's uid/gid")
        if not root and (uid, gid) != (os.geteuid(), os.getegid()):
            raise EgressUnavailable(f"running the network helper as uid {uid} needs root")
        deadline = time.monotonic() + timeout
        fds: list[int] = []
        process = None
        log = tempfile.TemporaryFile()
        try:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                raise EgressUnavailable(f"sandbox process {pid} is gone") from None
            fds.append(pidfd)
            try:
                netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise EgressUnavailable(f"cannot open the network namespace of {pid}: {exc}") from None
            fds.append(netns_fd)
            # bwrap --disable-userns moves its child into a nested user namespace; the one that owns the netns
            # is the one that gives CAP_NET_ADMIN over it.
            userns_fd = fcntl.ioctl(netns_fd, NS_GET_USERNS)
            fds.append(userns_fd)
            if not _alive(pidfd):  # the fds above may belong to a recycled pid
                raise EgressUnavailable(f"sandbox process {pid} is gone")
            if os.fstat(netns_fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
                raise EgressUnavailable(f"process {pid} shares this host's network namespace: not a sandbox")
            if os.fstat(userns_fd).st_ino == os.stat("/proc/self/ns/user").st_ino:
                raise EgressUnavailable(f"the network namespace of {pid} is not owned by a sandbox user namespace")

            ready_r, ready_w = os.pipe()
            fds += [ready_r, ready_w]
            # The helper exits when this pipe's write end closes: on close(), when the sandbox ends (the watcher),
            # or when this process dies for any reason. (PR_SET_PDEATHSIG would fire when the calling *thread*
            # exits.)
            exit_r, exit_w = os.pipe()
            fds += [exit_r, exit_w]
            if root:  # the namespace files are bound into the helper's root (_confine_helper)
                ns_paths = ["--userns-path=/ns/user", "--netns-type=path", "/ns/net"]
                keep = (ready_w, exit_r)
            else:
                ns_paths = [f"--userns-path=/proc/self/fd/{userns_fd}", "--netns-type=path",
                            f"/proc/self/fd/{netns_fd}"]
                keep = (ready_w, exit_r, userns_fd, netns_fd)
            argv = [_which("slirp4netns", SLIRP_SEARCH_PATH), "--configure", "--mtu=65520",
                    "--disable-host-loopback", "--enable-seccomp", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}",
                    *ns_paths, TAP]
            # No --enable-ipv6: v6 stays unreachable for the sandbox (the deny rules cover it anyway).
            # No --api-socket: nothing from the host is ever forwarded in.
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                       env={"PATH": SLIRP_SEARCH_PATH, "LANG": "C.UTF-8"},
                                       pass_fds=keep,
                                       preexec_fn=_helper_preexec(uid, gid, root, userns_fd, netns_fd,
                                                                  log.fileno()))
            for fd in (ready_w, exit_r):
                os.close(fd)
                fds.remove(fd)

            # The rules go in while the helper starts (it halves attach()): the sandbox is still blocked, so
            # nothing in it can send before both are done.
            nsenter = [_which("nsenter", NFT_SEARCH_PATH), f"--net=/proc/self/fd/{netns_fd}"]
            if not root:  # the owner of the user namespace gets CAP_NET_ADMIN over the netns by joining it
                nsenter[1:1] = [f"--user=/proc/self/fd/{userns_fd}", "--preserve-credentials"]
            script = ruleset(allow_cidrs, host_addresses())
            try:
                result = subprocess.run([*nsenter, _which("nft", NFT_SEARCH_PATH), "-f", "-"], input=script.encode(),
                                        capture_output=True, pass_fds=(netns_fd, userns_fd),
                                        timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise EgressUnavailable("nft timed out installing the egress rules") from None
            if result.returncode != 0:
                raise EgressUnavailable(f"nft failed installing the egress rules: "
                                        f"{result.stderr.decode(errors='replace').strip()}")
            for fd in (userns_fd, netns_fd):
                os.close(fd)
                fds.remove(fd)

            ready = select.select([ready_r], [], [], max(0.0, deadline - time.monotonic()))[0]
            answer = os.read(ready_r, 1) if ready else None
            os.close(ready_r)
            fds.remove(ready_r)
            if answer != b"1":
                what = "timed out" if answer is None else "failed"
                raise EgressUnavailable(f"slirp4netns {what}: {_tail(log, process)}")
            network = cls(process, exit_w, pidfd, log)
            fds.remove(exit_w)
            fds.remove(pidfd)
            return network
        except BaseException as exc:
            detail = _tail(log, process) if isinstance(exc, subprocess.SubprocessError) else ""
            if process is not None:
                process.kill()
                process.wait()
            for fd in fds:
                os.close(fd)
            log.close()
            if isinstance(exc, (OSError, subprocess.SubprocessError)):
                raise EgressUnavailable(f"egress setup for {pid} failed: {detail or exc}") from exc
            raise

    def _watch(self) -> None:
        # The helper holds the tap fd, which keeps the sandbox's netns alive: it would outlive the sandbox
        # unless told, so the sandbox's end (its pidfd becoming readable) stops it.
        select.select([self._pidfd, self._wake_r], [], [])
        self._stop_helper()
        with self._close_lock:
            if not self._closed:  # the sandbox ended before close(): nothing is left to wait for
                self._closed = True
                self._release()

    def _stop_helper(self) -> None:
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            os.close(self._exit_w)  # slirp4netns exits on its own when this closes
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        """Stop the helper (idempotent)."""
        self._stop_helper()
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            os.write(self._wake_w, b"x")
        self._watcher.join()
        self._release()

    def _release(self) -> None:
        for fd in (self._pidfd, self._wake_r, self._wake_w):
            os.close(fd)
        self._log.close()

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tail(log, process: subprocess.Popen | None) -> str:
    if process is not None:
        try:
            process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    log.seek(0)
    text = log.read()[-2000:].decode(errors="replace").strip()
    return text or ("not started" if process is None else f"exit status {process.returncode}")
