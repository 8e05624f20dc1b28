"""The portal's own HTTP requests to addresses its users choose (delivery callbacks, and any later
webhook), all through one guarded client: a user must not be able to point the portal at its own
host, the private network behind it or a cloud metadata service (SSRF), nor learn about them from
what a delivery reports.

Each request: http(s) only; the host resolved once and every address it resolves to checked against
the policy; the connection made to the checked address itself (a second lookup could answer
differently: DNS rebinding), with the original host in the Host header and, for https, in SNI and the
certificate check; one deadline over resolving, connecting, sending and reading; at most a small
answer read; no redirect followed. What comes back is a typed outcome that says nothing about sockets.
"""

from __future__ import annotations

import enum
import functools
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

from portal.errors import ValidationFailed

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0
TOTAL_TIMEOUT = 10.0
# Enough for a receiver's acknowledgement; nothing the portal relays to anyone.
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "nimbus-outbound/1"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Refused unless NIMBUS_OUTBOUND_ALLOW_CIDRS names them. Python's is_global catches the rest of the
# IANA special-purpose registries; multicast is listed because is_global lets most of it through.
REFUSED_NETWORKS = tuple(ipaddress.ip_network(cidr) for cidr in (
    # "this" network (0.0.0.0), RFC 1918, CGNAT (RFC 6598), loopback, link-local (169.254.169.254 is
    # the metadata service of most clouds), IETF assignments, documentation, 6to4 relays, benchmarking,
    # multicast, reserved and broadcast.
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    # ::/8 holds the unspecified address, loopback and the v4-compatible and v4-mapped spellings of
    # v4 addresses; then discard-only, IETF assignments (Teredo among them), documentation, local-use
    # NAT64, unique local (fd00:ec2::254 is EC2's metadata service), link-local, site-local, multicast.
    "::/8", "100::/64", "2001::/23", "2001:db8::/32", "64:ff9b:1::/48", "fc00::/7", "fe80::/10",
    "fec0::/10", "ff00::/8",
))
# Addresses here embed a v4 address that a translator on the path would reach (as do 6to4's, 2002::/16).
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class DestinationRefused(ValidationFailed):
    """A URL the portal will not send requests to (scheme, form, or an address the policy refuses)."""

    code = "destination_refused"


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"    # the destination answered 2xx
    ANSWERED = "answered"      # it answered with another status
    REDIRECTED = "redirected"  # it answered 3xx; redirects are not followed
    REFUSED = "refused"        # the policy refused the destination: nothing was sent
    NO_ANSWER = "no_answer"    # no HTTP answer in time (unresolvable, unreachable, closed, silent, garbled)


@dataclass(frozen=True)
class OutboundResult:
    outcome: Outcome
    status: int | None = None
    body: bytes = b""
    truncated: bool = False  # the answer was longer than allowed, or stopped at the deadline

    @property
    def summary(self) -> str:
        """What a user is told (a delivery's callback status): the outcome and the HTTP status,
        never the socket error behind a failure, which would tell open ports from closed ones."""
        if self.outcome is Outcome.DELIVERED:
            return f"delivered: {self.status}"
        if self.outcome is Outcome.REDIRECTED:
            return f"failed: redirect not followed ({self.status})"
        if self.outcome is Outcome.ANSWERED:
            return f"failed: answered {self.status}"
        if self.outcome is Outcome.REFUSED:
            return "failed: destination refused by policy"
        return "failed: no answer"


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str    # IDNA-encoded name or address literal, without brackets
    port: int
    target: str  # path and query


# ---- the policy --------------------------------------------------------------------------------------

def allowed_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """NIMBUS_OUTBOUND_ALLOW_CIDRS, read on each use so a changed setting applies at once."""
    configured = getattr(settings, "NIMBUS_OUTBOUND_ALLOW_CIDRS", []) or []
    if isinstance(configured, str):
        configured = configured.split(",")
    networks = []
    for cidr in configured:
        if not str(cidr).strip():
            continue
        try:
            networks.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError:
            # Ignored rather than fatal: a typo must not open more than the operator meant.
            log.warning("NIMBUS_OUTBOUND_ALLOW_CIDRS: %r is not a CIDR; ignored", cidr)
    return tuple(networks)


def _special(address: Address) -> bool:
    if address.version == 6 and address in NAT64:
        # The well-known NAT64 prefix lies inside ::/8 but is as public as the v4 address it carries.
        return _special(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if any(address in network for network in REFUSED_NETWORKS if network.version == address.version):
        return True
    if not address.is_global:
        return True
    return address.version == 6 and address.sixtofour is not None and _special(address.sixtofour)


def address_permitted(address: Address) -> bool:
    """Whether the portal may connect to this address: a public one, or one the operator allowed."""
    # ::ffff:a.b.c.d reaches a.b.c.d, so an allowed v4 range allows its mapped spelling too.
    mapped = address.ipv4_mapped if address.version == 6 else None
    allowed = allowed_networks()
    for candidate in (address, mapped):
        if candidate is not None and any(candidate in network for network in allowed
                                         if network.version == candidate.version):
            return True
    return not _special(address)


def _address(text: str) -> Address:
    return ipaddress.ip_address(text.split("%", 1)[0])  # a zone index (fe80::1%eth0) says nothing about the policy


def parse_destination(url: str, *, field: str = "callback_url") -> Destination:
    """The URL's parts, or DestinationRefused when it is not a plain http(s) URL."""
    url = url.strip()
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise DestinationRefused("The URL holds spaces or control characters.", field=field)
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname or ""
    except ValueError:
        raise DestinationRefused("The URL is not valid.", field=field) from None
    if parts.scheme not in ("http", "https"):
        raise DestinationRefused("The URL must be an http:// or https:// URL.", field=field)
    if not host:
        raise DestinationRefused("The URL has no host.", field=field)
    if parts.username is not None or parts.password is not None:
        raise DestinationRefused("The URL may not carry a user name or password.", field=field)
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise DestinationRefused("The URL's host name is not valid.", field=field) from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not target.isascii():
        raise DestinationRefused("The URL's path and query must be ASCII (percent-encode the rest).", field=field)
    return Destination(scheme=parts.scheme, host=host, port=port or (443 if parts.scheme == "https" else 80),
                       target=target)


def _numeric_addresses(destination: Destination) -> list[Address] | None:
    """The host's addresses when it is an address literal in any spelling getaddrinfo accepts
    (127.1, 2130706433, 0x7f.0.0.1, [::1]), read without asking DNS; None for a name."""
    try:
        infos = socket.getaddrinfo(destination.host, destination.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None
    return [_address(info[4][0]) for info in infos]


def check_destination(url: str, *, field: str = "callback_url") -> Destination:
    """Refuse now what can be refused without DNS: a URL that is not plain http(s), or one whose host
    is an address the policy refuses. A name is checked when a request is made (it may resolve
    differently by then), so this is an early answer for the user, not the guard itself."""
    destination = parse_destination(url, field=field)
    addresses = _numeric_addresses(destination)
    if addresses is not None and not all(address_permitted(a) for a in addresses):
        raise DestinationRefused("The URL points at an address the portal does not send requests to "
                                 "(loopback, private, link-local, metadata and other special ranges).",
                                 field=field)
    return destination


# ---- the request ---------------------------------------------------------------------------------------

def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the outbound request's deadline passed")
    return left


def _resolve(destination: Destination, deadline: float) -> list[Address] | None:
    """Every address the host resolves to (once), or None when the lookup fails or outlasts the
    deadline. getaddrinfo takes no timeout, so it runs on a thread of its own that is left behind."""
    numeric = _numeric_addresses(destination)
    if numeric is not None:
        return numeric
    answer: dict = {}
    done = threading.Event()

    def lookup():
        try:
            answer["infos"] = socket.getaddrinfo(destination.host, destination.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            answer["error"] = exc
        finally:
            done.set()

    threading.Thread(target=lookup, name="nimbus-outbound-dns", daemon=True).start()
    try:
        finished = done.wait(_remaining(deadline))
    except TimeoutError:
        finished = False
    if not finished or "infos" not in answer:
        log.info("outbound: %s did not resolve: %s", destination.host, answer.get("error", "timed out"))
        return None
    addresses: list[Address] = []
    for info in answer["infos"]:
        address = _address(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class _DeadlineReader(io.RawIOBase):
    """The socket as http.client reads it, each read bounded by what is left of the deadline (a
    socket timeout alone bounds each read, and an answer trickled byte by byte would outlast it)."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._sock.recv_into(buffer)


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, deadline: float, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp.close()
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline))


class _PinnedConnection(http.client.HTTPConnection):
    """Connects to an address checked beforehand, whatever the host name would resolve to now; the
    Host header still names the host."""

    def __init__(self, destination: Destination, address: Address, *, connect_timeout: float, deadline: float):
        super().__init__(destination.host, destination.port, timeout=connect_timeout)
        self.address, self.deadline = address, deadline
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self.address), self.port),
                                            timeout=min(self.timeout, _remaining(self.deadline)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedTLSConnection(_PinnedConnection):
    default_port = 443

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(_remaining(self.deadline))
        # SNI and the certificate check use the host the user named, not the address connected to.
        self.sock = _tls_context().wrap_socket(self.sock, server_hostname=self.host)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def request(method: str, url: str, *, body: bytes = b"", headers: dict[str, str] | None = None,
            connect_timeout: float = CONNECT_TIMEOUT, total_timeout: float = TOTAL_TIMEOUT,
            max_response_bytes: int = MAX_RESPONSE_BYTES) -> OutboundResult:
    """Make one request under the policy. Never raises for what the destination does; the socket
    level reason of a failure goes to the portal's log only."""
    deadline = time.monotonic() + total_timeout
    try:
        destination = check_destination(url)
    except DestinationRefused:
        return OutboundResult(Outcome.REFUSED)
    addresses = _resolve(destination, deadline)
    if addresses is None:
        return OutboundResult(Outcome.NO_ANSWER)
    # Every address, not only the one used: a name answering one public and one private address
    # must not reach the private one on a retry or a second resolver's answer.
    if not addresses or not all(address_permitted(a) for a in addresses):
        log.info("outbound: %s refused by policy (%s)", destination.host, ", ".join(map(str, addresses)))
        return OutboundResult(Outcome.REFUSED)
    connection_class = _PinnedTLSConnection if destination.scheme == "https" else _PinnedConnection
    sent_headers = {"User-Agent": USER_AGENT, "Connection": "close"}
    sent_headers.update({k: v for k, v in (headers or {}).items() if k.lower() not in ("host", "connection")})
    for address in addresses:
        connection = connection_class(destination, address, connect_timeout=connect_timeout, deadline=deadline)
        try:
            try:
                connection.connect()
            except (OSError, ssl.SSLError) as exc:
                log.info("outbound: connecting to %s (%s) failed: %s", destination.host, address, exc)
                continue
            return _exchange(connection, method, destination, body, sent_headers, deadline, max_response_bytes)
        finally:
            connection.close()
    return OutboundResult(Outcome.NO_ANSWER)


def _exchange(connection: _PinnedConnection, method: str, destination: Destination, body: bytes,
              headers: dict[str, str], deadline: float, max_response_bytes: int) -> OutboundResult:
    try:
        connection.sock.settimeout(_remaining(deadline))
        connection.request(method, destination.target, body=body, headers=headers)
        response = connection.getresponse()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        log.info("outbound: %s %s got no answer: %s", method, destination.host, exc)
        return OutboundResult(Outcome.NO_ANSWER)
    received = bytearray()
    truncated = False
    try:
        while len(received) <= max_response_bytes:
            chunk = response.read(min(16384, max_response_bytes + 1 - len(received)))
            if not chunk:
                break
            received += chunk
    except (OSError, http.client.HTTPException, ValueError):
        truncated = True  # the status is in; the rest of the answer is not waited for
    if len(received) > max_response_bytes:
        received, truncated = received[:max_response_bytes], True
    status = response.status
    if 200 <= status < 300:
        outcome = Outcome.DELIVERED
    elif 300 <= status < 400:
        outcome = Outcome.REDIRECTED
    else:
        outcome = Outcome.ANSWERED
    return OutboundResult(outcome, status=status, body=bytes(received), truncated=truncated)


def post(url: str, *, body: bytes, headers: dict[str, str] | None = None, **limits) -> OutboundResult:
    """POST ``body`` to ``url`` under the policy (``limits``: connect_timeout, total_timeout,
    max_response_bytes)."""
    return request("POST", url, body=body, headers=headers, **limits)
