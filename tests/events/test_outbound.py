"""The guarded outbound client (functions/outbound.py) and the callbacks that go through it: the
portal never reaches its host, private networks or metadata services for a user unless
NIMBUS_OUTBOUND_ALLOW_CIDRS allows it, is bounded in time and size, follows no redirect, and tells
users delivered/failed with the HTTP status, never socket errors. Real sockets throughout."""

import datetime
import ipaddress
import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rest_framework.test import APIClient

from functions import outbound
from functions.models import Delivery
from functions.services_triggers import sequence_create
from tenancy.services import token_create
from tests.events.conftest import DOUBLE, ECHO, handler, wait_for

REFUSED = "failed: destination refused by policy"
NO_ANSWER = "failed: no answer"
SOCKET_WORDS = ("Connection refused", "Errno", "closed connection", "Remote end", "timed out", "urlopen")


# ---- listeners -----------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):  # noqa: N802 - http.server's naming
        listener = self.server.listener
        length = int(self.headers.get("Content-Length") or 0)
        listener.received.append((dict(self.headers), self.rfile.read(length)))
        try:
            getattr(self, "answer_" + listener.mode)(listener)
        except OSError:
            pass  # the client hung up, as it should on an endless answer

    def answer_ok(self, listener):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def answer_redirect(self, listener):
        self.send_response(302)
        self.send_header("Location", listener.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def answer_huge(self, listener):
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 30))
        self.end_headers()
        chunk = b"x" * 65536
        while not listener.stop.is_set():
            self.wfile.write(chunk)

    def answer_silent(self, listener):
        listener.stop.wait()

    def answer_trickle_headers(self, listener):
        # Each byte arrives well within any per-read timeout; only a deadline over the whole
        # exchange ends this.
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not listener.stop.wait(0.02):
            self.wfile.write(b"a")

    def answer_stall_body(self, listener):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nx")
        listener.stop.wait()

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class Listener:
    """An HTTP listener on one or more loopback addresses sharing a port; ``received`` is every
    request that reached it, ``mode`` how it answers."""

    def __init__(self, host: str = "127.0.0.1", mode: str = "ok", port: int = 0, tls: ssl.SSLContext | None = None):
        self.received: list[tuple[dict, bytes]] = []
        self.mode, self.location, self.stop = mode, "", threading.Event()
        self.servers: list[ThreadingHTTPServer] = []
        self.tls = tls
        self.port = self.add(host, port)

    def add(self, host: str, port: int | None = None) -> int:
        server_class = _Server6 if ":" in host else _Server
        server = server_class((host, self.port if port is None else port), _Handler)
        server.listener = self
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return server.server_address[1]

    def url(self, host: str = "127.0.0.1", path: str = "/done") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.stop.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def listen():
    """listen(host="127.0.0.1", mode="ok") → a running Listener; all closed after the test."""
    listeners = []

    def start(host="127.0.0.1", mode="ok", **options):
        listener = Listener(host, mode, **options)
        listeners.append(listener)
        return listener

    yield start
    for listener in listeners:
        listener.close()


@pytest.fixture
def allow_loopback(settings):
    settings.NIMBUS_OUTBOUND_ALLOW_CIDRS = ["127.0.0.1/32"]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


# ---- the policy, on the client itself ----------------------------------------------------------------------

def test_a_listener_on_loopback_is_not_reached_in_any_spelling(listen):
    listener = listen()
    if ipv6_loopback():
        listener.add("::1")  # the same port on the v6 loopback, so [::1] would reach it too
    port = listener.port
    spellings = [f"http://127.0.0.1:{port}/", f"http://localhost:{port}/", f"http://0.0.0.0:{port}/",
                 f"http://[::1]:{port}/", f"http://[::ffff:127.0.0.1]:{port}/", f"http://2130706433:{port}/",
                 f"http://127.1:{port}/", f"http://0x7f.0.0.1:{port}/", f"http://[::]:{port}/"]
    for url in spellings:
        result = outbound.post(url, body=b"{}")
        assert result.outcome is outbound.Outcome.REFUSED, url
        assert result.summary == REFUSED
    assert listener.received == []


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/meta-data/",
    "http://10.0.0.1/", "http://172.16.5.4/", "http://192.168.1.1/", "http://100.64.0.1/", "http://0.0.0.0/",
    "http://224.0.0.1/", "http://240.0.0.1/", "http://[fe80::1]/", "http://[fc00::1]/", "http://[ff02::1]/",
    "http://[64:ff9b::a00:1]/", "http://[2002:a00:1::1]/",
])
def test_special_addresses_are_refused_before_any_connection(url):
    with pytest.raises(outbound.DestinationRefused):
        outbound.check_destination(url)
    assert outbound.post(url, body=b"{}").summary == REFUSED


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://example.com/",
                                 "http://user:secret@example.com/", "http:///nohost", "http://[::1/",
                                 "http://example.com/a b", "http://example.com/\r\nX-Injected: 1",
                                 "http://example.com/caf\u00e9"])
def test_only_plain_http_urls(url):
    with pytest.raises(outbound.DestinationRefused):
        outbound.check_destination(url)
    assert outbound.post(url, body=b"{}").outcome is outbound.Outcome.REFUSED


def test_public_addresses_pass_the_policy():
    for address in ("93.184.215.14", "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808"):
        assert outbound.address_permitted(ipaddress.ip_address(address)), address


def test_the_allow_list_is_what_blocks_the_listener(listen, allow_loopback):
    listener = listen()
    result = outbound.post(listener.url(), body=b'{"n": 1}', headers={"Content-Type": "application/json"})
    assert (result.outcome, result.status, result.summary, result.body) == (
        outbound.Outcome.DELIVERED, 200, "delivered: 200", b"ok")
    (headers, body), = listener.received
    assert body == b'{"n": 1}' and headers["Host"] == f"127.0.0.1:{listener.port}"
    # /32 allows that address only: the rest of loopback stays refused.
    assert outbound.post(f"http://127.0.0.2:{listener.port}/", body=b"").outcome is outbound.Outcome.REFUSED


def test_a_name_is_resolved_once_and_the_checked_address_is_the_one_connected(listen, allow_loopback,
                                                                             monkeypatch):
    """DNS rebinding: a name that answers an allowed address to the check and another one later
    still reaches only the checked address."""
    checked = listen("127.0.0.1")
    rebound = listen("127.0.0.2", port=checked.port)
    real_getaddrinfo = socket.getaddrinfo
    lookups = []

    def rebinding(host, port, *args, **kwargs):
        flags = kwargs.get("flags", args[3] if len(args) > 3 else 0)
        if host != "rebind.nimbus.test" or flags & socket.AI_NUMERICHOST:
            return real_getaddrinfo(host, port, *args, **kwargs)
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    result = outbound.post(f"http://rebind.nimbus.test:{checked.port}/cb", body=b"{}")
    assert result.summary == "delivered: 200"
    assert lookups == ["rebind.nimbus.test"]
    assert checked.received[0][0]["Host"] == f"rebind.nimbus.test:{checked.port}"
    assert rebound.received == []


def test_a_name_with_any_refused_address_is_refused(listen, allow_loopback, monkeypatch):
    listener = listen()
    real_getaddrinfo = socket.getaddrinfo

    def mixed(host, port, *args, **kwargs):
        if host != "mixed.nimbus.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        if kwargs.get("flags", 0) & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "not numeric")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port)),
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("10.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", mixed)
    assert outbound.post(f"http://mixed.nimbus.test:{listener.port}/", body=b"").summary == REFUSED
    assert listener.received == []


def test_https_keeps_the_host_name_for_sni_and_the_certificate(listen, allow_loopback, monkeypatch):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secure.nimbus.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("secure.nimbus.test")]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    import tempfile

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile() as cert_file, tempfile.NamedTemporaryFile() as key_file:
        cert_file.write(certificate_pem)
        key_file.write(key_pem)
        cert_file.flush()
        key_file.flush()
        server_context.load_cert_chain(cert_file.name, key_file.name)
    names = []
    server_context.sni_callback = lambda sock, server_name, context: names.append(server_name)
    listener = listen(tls=server_context)
    monkeypatch.setattr(outbound, "_tls_context",
                        lambda: ssl.create_default_context(cadata=certificate_pem.decode()))
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        if host == "secure.nimbus.test" and not kwargs.get("flags", 0) & socket.AI_NUMERICHOST:
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    result = outbound.post(f"https://secure.nimbus.test:{listener.port}/cb", body=b"{}")
    assert result.summary == "delivered: 200"
    assert names == ["secure.nimbus.test"]
    assert listener.received[0][0]["Host"] == f"secure.nimbus.test:{listener.port}"


def test_a_redirect_is_not_followed(listen, allow_loopback):
    target = listen("127.0.0.2")  # refused by the policy (only 127.0.0.1/32 is allowed)
    first = listen("127.0.0.1", mode="redirect")
    for location in (target.url("127.0.0.2"), first.url()):  # refused target, and even an allowed one
        first.location = location
        result = outbound.post(first.url(), body=b"{}")
        assert (result.outcome, result.status) == (outbound.Outcome.REDIRECTED, 302)
        assert result.summary == "failed: redirect not followed (302)"
    assert len(first.received) == 2 and target.received == []


def test_an_oversize_answer_is_cut(listen, allow_loopback):
    listener = listen(mode="huge")
    result = outbound.post(listener.url(), body=b"{}", max_response_bytes=4096)
    assert result.summary == "delivered: 200"
    assert result.truncated and len(result.body) == 4096


@pytest.mark.parametrize("mode", ["silent", "trickle_headers"])
def test_a_destination_that_never_finishes_its_answer_gets_no_answer(listen, allow_loopback, mode):
    listener = listen(mode=mode)
    # connect_timeout above total_timeout: the one deadline, not a per-read timeout, ends the exchange.
    result = outbound.post(listener.url(), body=b"{}", connect_timeout=5.0, total_timeout=0.5)
    assert (result.outcome, result.summary) == (outbound.Outcome.NO_ANSWER, NO_ANSWER)
    assert len(listener.received) == 1


def test_a_stalled_body_after_the_status_is_cut_at_the_deadline(listen, allow_loopback):
    listener = listen(mode="stall_body")
    result = outbound.post(listener.url(), body=b"{}", total_timeout=0.5)
    assert result.summary == "delivered: 200" and result.truncated


def test_closed_ports_read_as_no_answer_without_socket_errors(allow_loopback):
    result = outbound.post(f"http://127.0.0.1:{closed_port()}/", body=b"{}")
    assert result.summary == NO_ANSWER
    assert outbound.post("http://does-not-exist.invalid/", body=b"{}", total_timeout=2.0).summary == NO_ANSWER


# ---- callbacks of async calls, through the gateway and the worker ---------------------------------------------

def api(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def invoke_token(tenant, members):
    return token_create(acting_user=members["developer"], tenant=tenant, name="ci", scopes=["invoke"])[1]


def call_async(gateway, callback, token=None, path="/fn/acme/echo/"):
    headers = {"Prefer": "respond-async", "Content-Type": "application/json", "X-Nimbus-Callback-Url": callback}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return gateway.post(path, b'{"x": 1}', headers=headers)


def callback_status(delivery_id) -> str:
    return wait_for(lambda: Delivery.objects.filter(pk=delivery_id).values_list("callback_status",
                                                                               flat=True).first(), timeout=30)


@pytest.mark.django_db(transaction=True)
def test_an_anonymous_caller_of_a_public_function_cannot_name_a_callback(engine, deploy, gateway, listen, tenant,
                                                                          members, outsider):
    deploy("echo", handler(ECHO))
    listener = listen()
    response = call_async(gateway, listener.url())
    assert response.status == 403, response
    problem = response.json()
    assert problem["code"] == "permission_denied" and problem["field"] == "callback_url"
    assert "X-Nimbus-Callback-Url" in problem["detail"] and "anonymous" in problem["detail"]
    # Neither a token without the invoke scope, another tenant's token, nor a made-up one will do.
    read_only = token_create(acting_user=members["developer"], tenant=tenant, name="ro", scopes=["read"])[1]
    from tenancy.models import Tenant

    foreign = token_create(acting_user=outsider, tenant=Tenant.objects.get(slug="globex"), name="g",
                           scopes=["invoke"])[1]
    for token, words in ((read_only, "invoke scope"), (foreign, "own tenant"), ("nimbus_fake_token", "anonymous")):
        refused = call_async(gateway, listener.url(), token=token)
        assert refused.status == 403 and words in refused.json()["detail"], refused
    assert not Delivery.objects.exists()
    # Without the header the anonymous async call is still fine.
    assert gateway.post("/fn/acme/echo/", b"{}", headers={"Prefer": "respond-async"}).status == 202
    assert listener.received == []


@pytest.mark.django_db(transaction=True)
def test_a_callers_callback_to_loopback_is_refused_at_once_or_at_delivery(engine, deploy, gateway, listen,
                                                                         start_worker, members, invoke_token):
    deploy("echo", handler(ECHO))
    listener = listen()
    # An address literal is refused before anything is stored.
    for url in (listener.url(), f"http://[::1]:{listener.port}/", "http://169.254.169.254/latest/meta-data/",
                "http://10.0.0.1/", "http://0.0.0.0/"):
        response = call_async(gateway, url, token=invoke_token)
        assert response.status == 400, (url, response)
        assert response.json()["code"] == "destination_refused" and response.json()["field"] == "callback_url"
    assert not Delivery.objects.exists()
    # A name is checked where it counts, when the callback is sent.
    accepted = call_async(gateway, listener.url("localhost"), token=invoke_token)
    assert accepted.status == 202, accepted
    start_worker()
    assert callback_status(accepted.json()["id"]) == REFUSED
    assert Delivery.objects.get(pk=accepted.json()["id"]).state == "succeeded"
    assert listener.received == []


@pytest.mark.django_db(transaction=True)
def test_with_loopback_allowed_the_callback_is_delivered(engine, deploy, gateway, listen, start_worker, members,
                                                        invoke_token, allow_loopback):
    deploy("echo", handler(ECHO))
    listener = listen()
    accepted = call_async(gateway, listener.url(), token=invoke_token)
    assert accepted.status == 202, accepted
    start_worker()
    delivery_id = accepted.json()["id"]
    assert callback_status(delivery_id) == "delivered: 200"
    (headers, payload), = listener.received
    assert json.loads(payload)["state"] == "succeeded" and headers["X-Nimbus-Delivery-Id"] == delivery_id
    listed = api(members["viewer"]).get("/api/v1/tenants/acme/functions/echo/deliveries/").json()["results"]
    assert [(d["id"], d["callback_status"]) for d in listed] == [(delivery_id, "delivered: 200")]


@pytest.mark.django_db(transaction=True)
def test_the_delivery_api_never_shows_socket_errors(engine, deploy, gateway, start_worker, members, invoke_token,
                                                    settings):
    deploy("echo", handler(ECHO))
    port = closed_port()
    refused = call_async(gateway, f"http://localhost:{port}/cb", token=invoke_token).json()["id"]
    start_worker()
    assert callback_status(refused) == REFUSED
    settings.NIMBUS_OUTBOUND_ALLOW_CIDRS = ["127.0.0.1/32"]
    unanswered = call_async(gateway, f"http://127.0.0.1:{port}/cb", token=invoke_token).json()["id"]
    assert callback_status(unanswered) == NO_ANSWER
    listed = api(members["viewer"]).get("/api/v1/tenants/acme/functions/echo/deliveries/").json()["results"]
    statuses = {d["id"]: d["callback_status"] for d in listed}
    assert statuses == {refused: REFUSED, unanswered: NO_ANSWER}
    assert not any(word in status for status in statuses.values() for word in SOCKET_WORDS)


@pytest.mark.django_db(transaction=True)
def test_a_functions_fixed_destination_serves_anonymous_callers(engine, deploy, gateway, listen, start_worker,
                                                               members, settings):
    deploy("echo", handler(ECHO))
    listener = listen()
    policy_url = "/api/v1/tenants/acme/functions/echo/retry-policy"
    developer = api(members["developer"])
    refused = developer.put(policy_url, {"callback_url": listener.url()}, format="json")
    assert refused.status_code == 400 and refused.json()["code"] == "destination_refused"
    assert api(members["viewer"]).put(policy_url, {"callback_url": "https://example.com/"},
                                      format="json").status_code == 403
    settings.NIMBUS_OUTBOUND_ALLOW_CIDRS = ["127.0.0.1/32"]
    saved = developer.put(policy_url, {"callback_url": listener.url()}, format="json")
    assert saved.status_code == 200 and saved.json()["callback_url"] == listener.url()
    accepted = gateway.post("/fn/acme/echo/", b"{}", headers={"Prefer": "respond-async"}).json()
    start_worker()
    assert callback_status(accepted["id"]) == "delivered: 200"
    assert Delivery.objects.get(pk=accepted["id"]).callback_url == listener.url()
    assert len(listener.received) == 1
    # Cleared, no callback follows.
    assert developer.put(policy_url, {"callback_url": ""}, format="json").json()["callback_url"] == ""


@pytest.mark.django_db(transaction=True)
def test_a_sequence_runs_callback_takes_the_guarded_path(engine, deploy, listen, start_worker, members, tenant,
                                                        settings):
    deploy("double", handler(DOUBLE))
    sequence_create(acting_user=members["developer"], tenant=tenant, name="flow", functions=["double"])
    listener = listen()
    client = api(members["developer"])
    start_url = "/api/v1/tenants/acme/sequences/flow/start"
    literal = client.post(start_url, {"input": {"n": 1}, "callback_url": listener.url()}, format="json")
    assert literal.status_code == 400 and literal.json()["code"] == "destination_refused"
    metadata = client.post(start_url, {"input": {"n": 1}, "callback_url": "http://169.254.169.254/"},
                           format="json")
    assert metadata.status_code == 400
    named = client.post(start_url, {"input": {"n": 1}, "callback_url": listener.url("localhost")}, format="json")
    assert named.status_code == 202, named.content
    start_worker()
    assert callback_status(named.json()["id"]) == REFUSED
    assert listener.received == []
    settings.NIMBUS_OUTBOUND_ALLOW_CIDRS = ["127.0.0.1/32"]
    allowed = client.post(start_url, {"input": {"n": 2}, "callback_url": listener.url()}, format="json")
    assert allowed.status_code == 202, allowed.content
    assert callback_status(allowed.json()["id"]) == "delivered: 200"
    (_, payload), = listener.received
    assert json.loads(json.loads(payload)["body"]) == {"n": 4}


@pytest.mark.django_db(transaction=True)
def test_a_viewers_invoke_token_names_a_callback_only_for_a_function_shared_to_run(engine, deploy, gateway, listen,
                                                                                  tenant, members, invoke_token):
    """A viewer's token may carry the invoke scope (for the functions shared with them to edit or
    deploy); on a public function it may not make the portal call out where the viewer says."""
    from functions.services import function_share

    function, _ = deploy("echo", handler(ECHO))
    callback = listen().url("localhost")
    viewer = token_create(acting_user=members["viewer"], tenant=tenant, name="v", scopes=["invoke"])[1]
    refused = call_async(gateway, callback, token=viewer)
    assert refused.status == 403, refused
    assert refused.json()["field"] == "callback_url" and "may run this function" in refused.json()["detail"]
    function_share(acting_user=members["admin"], function=function, username=members["viewer"].username,
                   level="view")
    assert call_async(gateway, callback, token=viewer).status == 403
    assert not Delivery.objects.exists()
    function_share(acting_user=members["admin"], function=function, username=members["viewer"].username,
                   level="edit")
    assert call_async(gateway, callback, token=viewer).status == 202
    assert call_async(gateway, callback, token=invoke_token).status == 202  # a developer's
