"""A Kubernetes API server stand-in for the Knative engine's tests: real HTTP on a real socket.

It keeps objects in memory and implements just what the engine uses: core objects and namespaced
custom objects (GET, list with label/field selectors, watch as chunked JSON lines, POST, PUT with
resourceVersion checks, PATCH server-side apply, DELETE one or a collection), 422 with causes for
objects that break their schema (the validator in schemas.py), 404 for objects in a missing
namespace, pod logs, bearer-token auth. Tests steer it: ``set_status`` plays Knative's
controllers, ``controller`` reacts to writes, ``on_request`` slips in a concurrent writer, ``stall``
makes it hang, ``fail_next`` injects errors.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

from . import schemas

TOKEN = "stand-in-token"
CLUSTER_SCOPED = {("api/v1", "namespaces")}
KINDS = {
    ("api/v1", "namespaces"): "Namespace",
    ("api/v1", "configmaps"): "ConfigMap",
    ("api/v1", "secrets"): "Secret",
    ("api/v1", "resourcequotas"): "ResourceQuota",
    ("api/v1", "limitranges"): "LimitRange",
    ("api/v1", "pods"): "Pod",
    ("apis/networking.k8s.io/v1", "networkpolicies"): "NetworkPolicy",
}
_PATH = re.compile(
    r"^/(?P<prefix>api/v1|apis/[^/]+/[^/]+)"
    r"(?:/namespaces/(?P<ns>[^/]+))?"
    r"(?:/(?P<plural>[a-z]+))?"
    r"(?:/(?P<name>[^/]+))?"
    r"(?:/(?P<sub>log))?$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.body = status_body(code, reason, message, details)
        self.code = code


def _matches(obj: dict, label_selector: str, field_selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (label_selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    for term in filter(None, (field_selector or "").split(",")):
        key, _, value = term.partition("=")
        if key == "metadata.name" and obj["metadata"]["name"] != value:
            return False
        if key == "metadata.namespace" and obj["metadata"].get("namespace") != value:
            return False
    return True


class KubeStandIn:
    """Start with ``start()``; ``kubeconfig(path)`` writes a kubeconfig pointing at it."""

    def __init__(self):
        self.lock = threading.Condition()
        self.objects: dict[tuple, dict] = {}  # (prefix, plural, namespace, name) → object
        self.events: list[tuple[int, tuple, str, dict]] = []  # (rv, key, type, object)
        self.resource_version = 100
        self.requests: list[tuple[str, str, str, dict]] = []  # (method, path, content type, query)
        self.pod_logs: dict[tuple[str, str], str] = {}
        self.stall = threading.Event()
        self.fail_next: list[int] = []
        self.watch_limit: float | None = None  # end every watch after this many seconds, as proxies do
        self.controller = None  # callable(stand_in, key, object) after each write
        self.on_request = None  # callable(method, path) before a request is served
        self.closed = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="kube-stand-in", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> KubeStandIn:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.closed.set()
        self.stall.clear()
        with self.lock:
            self.lock.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "nimbus", "user": {"token": TOKEN}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "nimbus"}}],
        }))
        return path

    # ---- what tests use to read and steer ---------------------------------------------------

    def get(self, prefix: str, plural: str, namespace: str | None, name: str) -> dict | None:
        with self.lock:
            obj = self.objects.get((prefix, plural, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def service(self, namespace: str, name: str) -> dict | None:
        return self.get("apis/serving.knative.dev/v1", "services", namespace, name)

    def put(self, prefix: str, plural: str, obj: dict) -> dict:
        """Store an object as a controller would (no validation): pods, revisions."""
        key = (prefix, plural, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        with self.lock:
            existing = self.objects.get(key)
            return self._store(key, obj, "MODIFIED" if existing else "ADDED")

    def add_pod(self, namespace: str, name: str, labels: dict, *, ready: bool = True, log: str = "") -> None:
        self.put("api/v1", "pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "creationTimestamp": _now()},
            "spec": {"containers": [{"name": "user-container", "image": "x"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        })
        self.pod_logs[(namespace, name)] = log

    def set_status(self, namespace: str, name: str, status: dict, *, prefix="apis/serving.knative.dev/v1",
                   plural="services") -> dict:
        """Play Knative's controller: replace the object's status (observedGeneration defaults to
        the current generation) and tell the watchers."""
        key = (prefix, plural, namespace, name)
        with self.lock:
            obj = copy.deepcopy(self.objects[key])
            obj["status"] = {"observedGeneration": obj["metadata"].get("generation", 1), **status}
            return self._store(key, obj, "MODIFIED")

    # ---- storage ------------------------------------------------------------------------------

    def _store(self, key: tuple, obj: dict, event: str) -> dict:
        self.resource_version += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        if event == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.events.append((self.resource_version, key, event, copy.deepcopy(obj)))
        self.lock.notify_all()
        return copy.deepcopy(obj)

    def _write(self, key: tuple, body: dict, *, mode: str) -> tuple[int, dict]:
        prefix, plural, namespace, name = key
        kind = KINDS.get((prefix, plural)) or body.get("kind")
        if namespace and (prefix, plural) not in CLUSTER_SCOPED and \
                ("api/v1", "namespaces", None, namespace) not in self.objects:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        meta = body.setdefault("metadata", {})
        if meta.get("name") not in (None, name):
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        meta["name"] = name
        if namespace:
            meta["namespace"] = namespace
        errors = schemas.schema_errors({k: v for k, v in body.items() if k != "status"}) if kind != "Pod" else []
        if errors:
            group = prefix.split("/")[1] if prefix.startswith("apis/") else ""
            raise ApiError(422, "Invalid", f'{kind}{"." + group if group else ""} "{name}" is invalid: '
                           + "; ".join(f"{f}: {m}" for f, m in errors),
                           {"name": name, "kind": plural, "causes": [
                               {"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in errors]})
        existing = self.objects.get(key)
        if mode == "create" and existing:
            raise ApiError(409, "AlreadyExists", f'{plural} "{name}" already exists')
        if mode == "replace":
            if existing is None:
                raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
            if meta.get("resourceVersion") != existing["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": the object '
                               "has been modified; please apply your changes to the latest version and try again")
        if existing and existing.get("immutable"):
            for field in ("data", "binaryData"):
                if body.get(field) != existing.get(field):
                    raise ApiError(422, "Invalid", f'{kind} "{name}" is invalid: {field}: Forbidden: field is '
                                   "immutable when `immutable` is set",
                                   {"causes": [{"reason": "FieldValueForbidden", "field": field,
                                                "message": "field is immutable when `immutable` is set"}]})
        obj = copy.deepcopy(body)
        if existing:
            # The status subresource is the controllers'; writes to the main resource keep it.
            if "status" in existing:
                obj["status"] = existing["status"]
            else:
                obj.pop("status", None)
            for field in ("uid", "creationTimestamp", "generation"):
                if field in existing["metadata"]:
                    obj["metadata"][field] = existing["metadata"][field]
            if obj.get("spec") != existing.get("spec"):
                obj["metadata"]["generation"] = existing["metadata"].get("generation", 1) + 1
        else:
            obj.pop("status", None)
            obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        stored = self._store(key, obj, "MODIFIED" if existing else "ADDED")
        return (200 if existing else 201), stored

    # ---- HTTP -----------------------------------------------------------------------------------

    def _handler_class(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet test output
                pass

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_PATCH(self):
                self._handle("PATCH")

            def do_DELETE(self):
                self._handle("DELETE")

            def _send_json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if not raw:
                    return {}
                # An apply-patch+yaml body may be any YAML; the kubernetes client sends JSON (which is
                # YAML), and parsing strictly as JSON catches it sending anything else.
                return json.loads(raw)

            def _handle(self, method: str) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                content_type = self.headers.get("Content-Type") or ""
                with stand_in.lock:
                    stand_in.requests.append((method, url.path, content_type, query))
                body = self._body() if method in ("POST", "PUT", "PATCH") else {}
                if stand_in.on_request is not None:
                    stand_in.on_request(method, url.path)
                if stand_in.stall.is_set():
                    # Hang like an overloaded API server: answer only when released (or closed).
                    while stand_in.stall.is_set() and not stand_in.closed.is_set():
                        time.sleep(0.05)
                    self.close_connection = True
                    return
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send_json(401, status_body(401, "Unauthorized", "Unauthorized"))
                    return
                with stand_in.lock:
                    injected = stand_in.fail_next.pop(0) if stand_in.fail_next else None
                if injected:
                    self._send_json(injected, status_body(injected, "InternalError", f"injected {injected}"))
                    return
                match = _PATH.match(url.path)
                try:
                    if not match:
                        raise ApiError(404, "NotFound", f"no route for {url.path}")
                    self._route(method, match, query, body, content_type)
                except ApiError as exc:
                    self._send_json(exc.code, exc.body)

            def _route(self, method, match, query, body, content_type):
                prefix, ns, plural, name, sub = match.group("prefix", "ns", "plural", "name", "sub")
                if prefix == "api/v1" and ns and not plural:  # /api/v1/namespaces/<name>
                    plural, name, ns = "namespaces", ns, None
                if prefix == "api/v1" and not ns and not plural and name is None:
                    raise ApiError(404, "NotFound", "not found")
                if plural is None:
                    raise ApiError(404, "NotFound", "not found")
                key = (prefix, plural, ns, name)
                if sub == "log":
                    return self._log(ns, name, query)
                if name is None:
                    if method == "GET" and query.get("watch") in ("true", "1"):
                        return self._watch(prefix, plural, ns, query)
                    if method == "GET":
                        with stand_in.lock:
                            items = [copy.deepcopy(o) for (p, pl, n, _), o in sorted(stand_in.objects.items(),
                                                                                      key=lambda kv: kv[0][3])
                                     if p == prefix and pl == plural and n == ns
                                     and _matches(o, query.get("labelSelector"), query.get("fieldSelector"))]
                            rv = str(stand_in.resource_version)
                        return self._send_json(200, {"kind": "List", "apiVersion": "v1",
                                                     "metadata": {"resourceVersion": rv}, "items": items})
                    if method == "POST":
                        obj_name = body.get("metadata", {}).get("name", "")
                        with stand_in.lock:
                            code, stored = stand_in._write((prefix, plural, ns, obj_name), body, mode="create")
                        self._after_write((prefix, plural, ns, obj_name), stored)
                        return self._send_json(code, stored)
                    if method == "DELETE":
                        with stand_in.lock:
                            doomed = [k for k, o in stand_in.objects.items()
                                      if k[:3] == (prefix, plural, ns) and _matches(o, query.get("labelSelector"), "")]
                            for k in doomed:
                                stand_in._store(k, stand_in.objects[k], "DELETED")
                        return self._send_json(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                    raise ApiError(405, "MethodNotAllowed", method)
                if method == "GET":
                    obj = stand_in.get(prefix, plural, ns, name)
                    if obj is None:
                        raise ApiError(404, "NotFound", f'{plural} "{name}" not found', {"name": name, "kind": plural})
                    return self._send_json(200, obj)
                if method == "PUT":
                    with stand_in.lock:
                        code, stored = stand_in._write(key, body, mode="replace")
                    self._after_write(key, stored)
                    return self._send_json(code, stored)
                if method == "PATCH":
                    if not content_type.startswith("application/apply-patch"):
                        raise ApiError(415, "UnsupportedMediaType", f"only server-side apply here, not {content_type}")
                    if not query.get("fieldManager"):
                        raise ApiError(400, "BadRequest", "fieldManager is required for apply patch")
                    with stand_in.lock:
                        code, stored = stand_in._write(key, body, mode="apply")
                    self._after_write(key, stored)
                    return self._send_json(code, stored)
                if method == "DELETE":
                    with stand_in.lock:
                        obj = stand_in.objects.get(key)
                        if obj is None:
                            raise ApiError(404, "NotFound", f'{plural} "{name}" not found',
                                           {"name": name, "kind": plural})
                        stand_in._store(key, obj, "DELETED")
                        if key[:2] == ("api/v1", "namespaces"):
                            for k in [k for k in stand_in.objects if k[2] == name]:
                                stand_in._store(k, stand_in.objects[k], "DELETED")
                    return self._send_json(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                raise ApiError(405, "MethodNotAllowed", method)

            def _after_write(self, key, stored):
                if stand_in.controller is not None:
                    threading.Thread(target=stand_in.controller, args=(stand_in, key, stored), daemon=True).start()

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _start_stream(self, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

            def _watch(self, prefix, plural, ns, query):
                lasts = int(query.get("timeoutSeconds") or 30)
                if stand_in.watch_limit is not None:
                    lasts = min(lasts, stand_in.watch_limit)
                deadline = time.monotonic() + lasts
                labels, fields = query.get("labelSelector"), query.get("fieldSelector")
                self._start_stream("application/json")
                with stand_in.lock:
                    since = query.get("resourceVersion")
                    if since in (None, "", "0"):
                        pending = [("ADDED", copy.deepcopy(o)) for k, o in stand_in.objects.items()
                                   if k[:3] == (prefix, plural, ns) and _matches(o, labels, fields)]
                        since = stand_in.resource_version
                    else:
                        pending = []
                    since = int(since)
                try:
                    while True:
                        for kind, obj in pending:
                            self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                        with stand_in.lock:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0 or stand_in.closed.is_set():
                                break
                            if stand_in.resource_version <= since:
                                stand_in.lock.wait(min(remaining, 0.5))
                            pending = [(kind, obj) for rv, k, kind, obj in stand_in.events
                                       if rv > since and k[:3] == (prefix, plural, ns) and _matches(obj, labels, fields)]
                            since = stand_in.resource_version
                    self._chunk(b"")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def _log(self, ns, name, query):
                if (ns, name) not in stand_in.pod_logs:
                    raise ApiError(404, "NotFound", f'pods "{name}" not found')
                if query.get("container") not in (None, "user-container"):
                    raise ApiError(400, "BadRequest", f"container {query.get('container')} is not valid")
                lines = stand_in.pod_logs[(ns, name)].splitlines()
                if query.get("tailLines"):
                    lines = lines[-int(query["tailLines"]):]
                text = "".join(line + "\n" for line in lines).encode()
                if query.get("follow") == "true":
                    self._start_stream("text/plain")
                    for line in text.splitlines(keepends=True):
                        self._chunk(line)
                    self._chunk(b"")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

        return Handler


def main() -> None:
    """Run the stand-in on its own (``python -m tests.engines.knative.apiserver --kubeconfig PATH``),
    e.g. to point the k8s suite or a development portal at it."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--kubeconfig", type=Path, required=True, help="where to write the kubeconfig")
    args = parser.parse_args()
    stand_in = KubeStandIn()
    stand_in.kubeconfig(args.kubeconfig)
    print(f"Kubernetes API stand-in at {stand_in.url}; kubeconfig {args.kubeconfig}", flush=True)
    try:
        stand_in.server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
