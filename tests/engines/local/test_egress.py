"""Egress of bwrap sandboxes (functions/engines/local/egress.py): real unprivileged sandboxes started as a test uid,
a real slirp4netns and real nftables rules, and a probe inside that connects out and reports what happened."""

import functools
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from functions.engines.local import egress
from tests.engines.local.conftest import wait_for

TEST_UID = 200077  # like a tenant's 200000 + id: owns nothing on this host
PYTHON = "/usr/bin/python3.11"
ROOT = Path(__file__).resolve().parents[3]


def _drop():
    os.setgroups([])
    os.setgid(TEST_UID)
    os.setuid(TEST_UID)


@functools.lru_cache(maxsize=1)
def _sandbox_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the sandbox and its helper are started as a dropped test uid"
    if not os.path.exists(PYTHON):
        return f"{PYTHON} is missing (the probe runs with the system interpreter)"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed: apt-get install bubblewrap"
    reason = egress.check()
    if reason:
        return reason
    result = subprocess.run(["bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
                             "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64",
                             "/lib64", "--", "/usr/bin/true"], preexec_fn=_drop, cwd="/", capture_output=True, timeout=30)
    if result.returncode != 0:
        return f"unprivileged user namespaces don't work here: {result.stderr.decode(errors='replace').strip()}"
    return None


needs_sandbox = pytest.mark.skipif(bool(_sandbox_unavailable()), reason=str(_sandbox_unavailable()))

# Runs inside the sandbox: tries to flush the rules and take the interface down, then connects and resolves.
PROBE = r"""
import errno, json, socket, struct, sys, fcntl
spec = json.loads(sys.argv[1])
out = {"connect": {}, "resolve": {}}
def name(exc):
    return "timeout" if isinstance(exc, socket.timeout) else errno.errorcode.get(exc.errno, str(exc))
status = open("/proc/self/status").read()
out["capeff"] = int(status.split("CapEff:")[1].split()[0], 16)
try:  # what `nft flush ruleset` sends: a batch with NFT_MSG_DELTABLE for every family
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    s.settimeout(3)
    def msg(kind, flags, seq, res_id):
        return struct.pack("=IHHIIBBH", 20, kind, flags, seq, 0, 0, 0, socket.htons(res_id))
    s.send(msg(0x10, 1, 1, 10) + msg((10 << 8) | 2, 1 | 4, 2, 0) + msg(0x11, 1, 3, 10))
    data = s.recv(65536)
    kind = struct.unpack_from("=IH", data)[1]
    code = -struct.unpack_from("=i", data, 16)[0] if kind == 2 else None
    out["flush"] = "ok" if code == 0 else errno.errorcode.get(code, str(code))
except OSError as exc:
    out["flush"] = name(exc)
try:  # SIOCSIFFLAGS: take tap0 down
    fcntl.ioctl(socket.socket(), 0x8914, struct.pack("16sH14x", b"tap0", 0))
    out["ifdown"] = "ok"
except OSError as exc:
    out["ifdown"] = name(exc)
for host, port in spec.get("connect", []):
    try:
        socket.create_connection((host, port), timeout=5).close()
        out["connect"][f"{host}:{port}"] = "ok"
    except OSError as exc:
        out["connect"][f"{host}:{port}"] = name(exc)
for host in spec.get("resolve", []):
    try:
        out["resolve"][host] = sorted({a[4][0] for a in socket.getaddrinfo(host, 443, socket.AF_INET)})
    except OSError as exc:
        out["resolve"][host] = "error: %s" % exc
print(json.dumps(out))
"""


class Sandbox:
    """An unprivileged sandbox as the engine starts one, blocked until run() so that egress can be attached."""

    def __init__(self, spec: dict):
        info_r, info_w = os.pipe()
        block_r, self._block_w = os.pipe()
        resolv_r, resolv_w = os.pipe()
        os.write(resolv_w, egress.RESOLV_CONF.encode())
        os.close(resolv_w)
        argv = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534",
                "--cap-drop", "ALL", "--die-with-parent", "--info-fd", str(info_w), "--block-fd", str(block_r),
                "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                "--file", str(resolv_r), "/etc/resolv.conf",
                "--", PYTHON, "-I", "-S", "-c", PROBE, json.dumps(spec)]
        self.process = subprocess.Popen(argv, pass_fds=(info_w, block_r, resolv_r), preexec_fn=_drop, cwd="/",
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for fd in (info_w, block_r, resolv_r):
            os.close(fd)
        data = b""
        with os.fdopen(info_r, "rb") as info:
            while chunk := info.read1(4096):
                data += chunk
                try:
                    self.pid = json.loads(data)["child-pid"]
                    break
                except ValueError:
                    continue
            else:
                self.process.kill()
                raise AssertionError(f"bwrap did not start: {self.process.communicate()[1].decode()}")

    def run(self) -> dict:
        os.write(self._block_w, b"go")
        os.close(self._block_w)
        self._block_w = None
        out, err = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, err.decode()
        return json.loads(out)

    def close(self):
        if self._block_w is not None:
            os.close(self._block_w)
            self._block_w = None
        if self.process.returncode is not None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)  # the sandbox's init: bwrap then exits
        except ProcessLookupError:
            pass
        self.process.communicate(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _listen(family, address):
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # v4 and v6 on one port
    sock.bind((address, 0))
    sock.listen(64)  # the kernel completes handshakes: nothing needs to accept
    return sock


@pytest.fixture(scope="module")
def listeners():
    """Host listeners a sandbox must not reach: one on the host's loopback, one on every address."""
    loopback = _listen(socket.AF_INET, "127.0.0.1")
    try:
        anywhere = _listen(socket.AF_INET6, "::")
    except OSError:  # no IPv6 on this host
        anywhere = _listen(socket.AF_INET, "0.0.0.0")
    yield loopback.getsockname()[1], anywhere.getsockname()[1]
    loopback.close()
    anywhere.close()


def _host_can_connect(address, port) -> bool:
    try:
        socket.create_connection((address, port), timeout=3).close()
        return True
    except OSError:
        return False


def _outside_addresses():
    """Non-loopback addresses of this host that its own listener answers on (link-local needs a zone: left out)."""
    found = []
    for address in egress.host_addresses():
        ip = ipaddress.ip_address(address)
        if not ip.is_loopback and not ip.is_link_local:
            found.append(address)
    return found


def _denied(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(c) for c in egress.DENIED_V4 + egress.DENIED_V6)


@pytest.fixture(scope="module")
def outside():
    """(host, port) out there that this host reaches, or the reason to skip."""
    reasons = []
    for host, port in (("pypi.org", 443), ("deb.debian.org", 80)):
        try:
            addresses = {a[4][0] for a in socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)}
        except OSError as exc:
            reasons.append(f"{host} does not resolve here ({exc})")
            continue
        if any(_denied(a) for a in addresses):
            reasons.append(f"{host} resolves to a private address here ({', '.join(sorted(addresses))}), "
                           "which the egress rules deny by design")
            continue
        if _host_can_connect(host, port):
            return host, port
        reasons.append(f"{host}:{port} is unreachable from this host")
    pytest.skip("nothing outside is reachable from this host: " + "; ".join(reasons))


@needs_sandbox
def test_sandbox_cannot_reach_the_host_nor_private_ranges_nor_change_the_rules(listeners):
    loopback_port, any_port = listeners
    addresses = _outside_addresses()
    for address in addresses:  # else a failure inside would prove nothing
        assert _host_can_connect(address, any_port), address
    targets = [("127.0.0.1", loopback_port), ("10.0.2.2", loopback_port), ("10.0.2.2", any_port),
               ("169.254.169.254", 80), ("10.0.2.3", 80)] + [(a, any_port) for a in addresses]

    with Sandbox({"connect": targets}) as box, egress.Network.attach(box.pid, uid=TEST_UID, gid=TEST_UID):
        result = box.run()

    assert result["capeff"] == 0
    assert result["flush"] == "EPERM"
    assert result["ifdown"] == "EPERM"
    connect = result["connect"]
    # Its own loopback (nothing listens there), not the host's, whose listener is on that very port.
    assert connect[f"127.0.0.1:{loopback_port}"] == "ECONNREFUSED"
    # Rejected by the rules (admin-prohibited → EHOSTUNREACH), after the flush attempt above: they are still there.
    for host, port in [("10.0.2.2", loopback_port), ("10.0.2.2", any_port), ("169.254.169.254", 80), ("10.0.2.3", 80)]:
        assert connect[f"{host}:{port}"] == "EHOSTUNREACH", (host, port, connect)
    for address in addresses:
        expected = {"EHOSTUNREACH"} if ipaddress.ip_address(address).version == 4 else {"EHOSTUNREACH", "ENETUNREACH"}
        assert connect[f"{address}:{any_port}"] in expected, (address, connect)


@needs_sandbox
def test_sandbox_reaches_outside_by_name(outside):
    host, port = outside
    with Sandbox({"connect": [outside], "resolve": [host]}) as box, \
            egress.Network.attach(box.pid, uid=TEST_UID, gid=TEST_UID):
        result = box.run()
    assert result["connect"][f"{host}:{port}"] == "ok", result
    assert isinstance(result["resolve"][host], list) and result["resolve"][host], result  # DNS through 10.0.2.3


@needs_sandbox
def test_allowed_cidr_reaches_the_host(listeners):
    loopback_port, any_port = listeners
    v4 = [a for a in _outside_addresses() if ipaddress.ip_address(a).version == 4]
    if not v4:
        pytest.skip("this host has no non-loopback IPv4 address")
    address = v4[0]
    targets = [(address, any_port), ("10.0.2.2", loopback_port)]
    with Sandbox({"connect": targets}) as box, \
            egress.Network.attach(box.pid, uid=TEST_UID, gid=TEST_UID, allow_cidrs=[f"{address}/32"]):
        result = box.run()
    # The same connection the first test sees rejected: the deny comes from the rules, and the allow list wins.
    assert result["connect"][f"{address}:{any_port}"] == "ok", result
    assert result["connect"][f"10.0.2.2:{loopback_port}"] == "EHOSTUNREACH", result


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _helpers_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm, rest = (entry / "stat").read_text().split("(", 1)[1].rsplit(")", 1)
            except OSError:
                continue
            if comm == "slirp4netns" and int(rest.split()[1]) == parent and _running(int(entry.name)):
                found.append(int(entry.name))
    return found


@needs_sandbox
def test_helper_runs_as_the_given_uid_and_close_stops_it():
    with Sandbox({}) as box:
        network = egress.Network.attach(box.pid, uid=TEST_UID, gid=TEST_UID)
        status = _status(network.helper_pid)
        assert status["Uid"].split() == [str(TEST_UID)] * 4
        assert status["Gid"].split() == [str(TEST_UID)] * 4
        assert status["Groups"].split() == []
        assert status["CapEff"].strip() == "0000000000000000"
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"
        network.close()
        network.close()
        assert not _running(network.helper_pid)
        assert _helpers_of(os.getpid()) == []


@needs_sandbox
def test_helper_exits_when_the_sandbox_ends():
    with Sandbox({}) as box:
        network = egress.Network.attach(box.pid, uid=TEST_UID, gid=TEST_UID)
        box.close()
        assert wait_for(lambda: not _running(network.helper_pid), timeout=10)
        network.close()
    assert _helpers_of(os.getpid()) == []


@needs_sandbox
def test_helper_exits_when_the_engine_dies():
    engine = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from functions.engines.local import egress
network = egress.Network.attach({{pid}}, uid={TEST_UID}, gid={TEST_UID})
print(network.helper_pid, flush=True)
sys.stdin.read()
"""
    with Sandbox({}) as box:
        process = subprocess.Popen([sys.executable, "-c", engine.replace("{pid}", str(box.pid))],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        helper = int(process.stdout.readline())
        assert _running(helper)
        process.kill()  # no close(), no watcher: only the exit pipe's other end going away
        process.wait()
        assert wait_for(lambda: not _running(helper), timeout=10)


@needs_sandbox
def test_attach_refuses_a_process_of_the_host_network():
    with pytest.raises(egress.EgressUnavailable, match="host's network namespace"):
        egress.Network.attach(os.getpid(), uid=TEST_UID, gid=TEST_UID)


@needs_sandbox
def test_attach_to_a_gone_process():
    process = subprocess.Popen(["true"])
    process.wait()
    with pytest.raises(egress.EgressUnavailable, match="gone"):
        egress.Network.attach(process.pid, uid=TEST_UID, gid=TEST_UID)


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "10.1.2.3/8", "example.com", ""])
def test_allow_cidrs_are_validated(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        egress.Network.attach(1, uid=TEST_UID, gid=TEST_UID, allow_cidrs=["192.0.2.0/24", bad])


def test_ruleset_accepts_allowed_and_dns_before_denying():
    script = egress.ruleset(["198.51.100.0/24", "2001:db8::/32"], ["192.0.2.7", "2001:db8:1::7", "10.1.1.1"])
    sets = {line.split()[1]: line for line in script.splitlines() if line.strip().startswith("set ")}
    assert "198.51.100.0/24" in sets["allow4"] and "2001:db8::/32" in sets["allow6"]
    assert "192.0.2.7/32" in sets["deny4"] and "2001:db8:1::7/128" in sets["deny6"]
    assert "10.0.0.0/8" in sets["deny4"] and "10.1.1.1" not in sets["deny4"]  # collapsed into 10/8
    assert "fc00::/7" in sets["deny6"] and "::ffff:0:0/96" in sets["deny6"]
    order = [line.strip() for line in script.splitlines()]
    dns = order.index("ip daddr 10.0.2.3 udp dport 53 accept")
    assert dns < order.index("ip daddr @allow4 accept") < order.index(
        "ip daddr @deny4 reject with icmpx type admin-prohibited")


@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed")
def test_host_addresses_match_iproute2():
    shown = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, check=True).stdout)
    expected = {info["local"] for link in shown for info in link.get("addr_info", []) if "local" in info}
    assert set(egress.host_addresses()) == expected


@needs_sandbox
def test_a_failed_attach_cleans_up():
    with Sandbox({}) as box, egress.Network.attach(box.pid, uid=TEST_UID, gid=TEST_UID) as first:
        with pytest.raises(egress.EgressUnavailable, match="slirp4netns failed"):  # tap0 is taken
            egress.Network.attach(box.pid, uid=TEST_UID, gid=TEST_UID)
        assert _helpers_of(os.getpid()) == [first.helper_pid]
