"""Thin wrappers around the kubernetes client: every call with a timeout, API errors turned into
Nimbus errors in one place (404 → None / False / NotFound, 409 → Conflict, 422 → EngineError naming
the field), and retries with backoff for the calls that are safe to repeat.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from portal.errors import Conflict, EngineError, NotFound

log = logging.getLogger(__name__)

FIELD_MANAGER = "nimbus"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
RETRY_STATUSES = {429, 500, 502, 503, 504}
# A followed log that stays silent this long is closed; the reader reconnects if it still cares.
FOLLOW_IDLE_SECONDS = 3600

# Custom kinds the engine writes: (apiVersion, kind) → plural.
CUSTOM_PLURALS = {
    ("serving.knative.dev/v1", "Service"): "services",
    ("serving.knative.dev/v1", "Revision"): "revisions",
    ("serving.knative.dev/v1", "Route"): "routes",
    ("serving.knative.dev/v1", "Configuration"): "configurations",
    ("sources.knative.dev/v1", "PingSource"): "pingsources",
    ("eventing.knative.dev/v1", "Broker"): "brokers",
    ("eventing.knative.dev/v1", "Trigger"): "triggers",
    ("flows.knative.dev/v1", "Sequence"): "sequences",
}
# Built-in kinds the engine applies: kind → (API attribute, patch method, read method, namespaced).
BUILTIN_KINDS = {
    "Namespace": ("core", "patch_namespace", "read_namespace", False),
    "ConfigMap": ("core", "patch_namespaced_config_map", "read_namespaced_config_map", True),
    "Secret": ("core", "patch_namespaced_secret", "read_namespaced_secret", True),
    "ResourceQuota": ("core", "patch_namespaced_resource_quota", "read_namespaced_resource_quota", True),
    "LimitRange": ("core", "patch_namespaced_limit_range", "read_namespaced_limit_range", True),
    "NetworkPolicy": ("networking", "patch_namespaced_network_policy", "read_namespaced_network_policy", True),
}


def api_client_from_settings(values: Mapping) -> k8s.ApiClient:
    """A kubeconfig (with an optional context) when one is set, else the pod's service account."""
    configuration = k8s.Configuration()
    if values.get("KUBECONFIG"):
        k8s_config.load_kube_config(config_file=values["KUBECONFIG"], context=values.get("CONTEXT") or None,
                                    client_configuration=configuration, persist_config=False)
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException as exc:
            raise EngineError("The Knative engine needs NIMBUS_KUBECONFIG or to run inside a cluster "
                              f"({exc}).") from exc
    # Retries are ours (only for idempotent calls); urllib3's own would repeat a POST.
    configuration.retries = 0
    return k8s.ApiClient(configuration)


def _status_body(exc: ApiException) -> dict:
    try:
        return json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return {}


def describe_invalid(exc: ApiException, what: str) -> EngineError:
    """A 422 as a sentence naming the offending field(s), from the Status's causes."""
    body = _status_body(exc)
    causes = (body.get("details") or {}).get("causes") or []
    if causes:
        parts = [f"{c.get('field') or '?'}: {c.get('message') or c.get('reason') or 'invalid'}" for c in causes]
        first = causes[0].get("field")
        return EngineError(f"Kubernetes refused {what}: " + "; ".join(parts), field=first,
                           details={"causes": causes})
    return EngineError(f"Kubernetes refused {what}: {body.get('message') or exc.reason}")


class KubeClient:
    """The API calls the Knative engine makes, and nothing else."""

    def __init__(self, api_client: k8s.ApiClient, *, timeout: float = 10.0, retries: int = 3,
                 backoff: float = 0.25):
        self.api_client = api_client
        self.core = k8s.CoreV1Api(api_client)
        self.networking = k8s.NetworkingV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    @classmethod
    def from_settings(cls, values: Mapping) -> KubeClient:
        return cls(api_client_from_settings(values), timeout=float(values.get("REQUEST_TIMEOUT", 10)),
                   retries=int(values.get("RETRIES", 3)))

    # ---- the one place API failures are interpreted ------------------------------------------

    def call(self, fn: Callable, *args, what: str, idempotent: bool, **kwargs):
        kwargs.setdefault("_request_timeout", self.timeout)
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status in RETRY_STATUSES and idempotent and attempt < self.retries:
                    attempt = self._pause(attempt, what, exc.status)
                    continue
                raise self._translate(exc, what) from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if idempotent and attempt < self.retries:
                    attempt = self._pause(attempt, what, type(exc).__name__)
                    continue
                raise EngineError(f"The Kubernetes API did not answer {what} (timeout {self.timeout:g}s, "
                                  f"{attempt + 1} attempt(s)): {type(exc).__name__}") from exc

    def _pause(self, attempt: int, what: str, reason) -> int:
        delay = self.backoff * (2 ** attempt)
        log.info("retrying %s in %.2fs after %s", what, delay, reason)
        time.sleep(delay)
        return attempt + 1

    @staticmethod
    def _translate(exc: ApiException, what: str) -> Exception:
        message = _status_body(exc).get("message") or exc.reason or ""
        if exc.status == 404:
            return NotFound(f"Not found on the cluster: {what}.")
        if exc.status == 409:
            return Conflict(f"Kubernetes reported a conflict on {what}: {message}")
        if exc.status == 422:
            return describe_invalid(exc, what)
        if exc.status in (401, 403):
            return EngineError(f"Nimbus is not allowed {what} (HTTP {exc.status}): {message}. "
                               "Check the ClusterRole in deploy/kubernetes.")
        return EngineError(f"The Kubernetes API failed {what} (HTTP {exc.status}): {message}")

    # ---- writes ----------------------------------------------------------------------------------

    def apply(self, manifest: dict) -> dict:
        """Server-side apply with Nimbus's field manager (idempotent, so retried). Apply creates,
        so a 404 means the namespace is missing: an engine failure, not a missing user object."""
        try:
            return self._apply(manifest)
        except NotFound as exc:
            raise EngineError(f"{exc.message[:-1]} (is the tenant's namespace missing?).") from exc

    def _apply(self, manifest: dict) -> dict:
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        name = manifest["metadata"]["name"]
        namespace = manifest["metadata"].get("namespace")
        what = f"applying {kind} {namespace + '/' if namespace else ''}{name}"
        options = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": APPLY_CONTENT_TYPE}
        if (api_version, kind) in CUSTOM_PLURALS:
            group, version = api_version.split("/")
            result = self.call(self.custom.patch_namespaced_custom_object, group, version, namespace,
                               CUSTOM_PLURALS[(api_version, kind)], name, manifest, what=what, idempotent=True,
                               **options)
            # The generated client drops the body of a 201 (an apply that created the object).
            return result if result is not None else self.get_custom(api_version, kind, namespace, name)
        api, method, _read, namespaced = BUILTIN_KINDS[kind]
        args = (name, namespace, manifest) if namespaced else (name, manifest)
        result = self.call(getattr(getattr(self, api), method), *args, what=what, idempotent=True, **options)
        return self.api_client.sanitize_for_serialization(result)

    def replace_custom(self, api_version: str, kind: str, body: dict) -> dict:
        """PUT carrying the resourceVersion read earlier: a stale one raises Conflict (not retried)."""
        group, version = api_version.split("/")
        meta = body["metadata"]
        return self.call(self.custom.replace_namespaced_custom_object, group, version, meta["namespace"],
                         CUSTOM_PLURALS[(api_version, kind)], meta["name"], body,
                         what=f"updating {kind} {meta['namespace']}/{meta['name']}", idempotent=False,
                         field_manager=FIELD_MANAGER)

    def delete_custom(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """False when it was already gone."""
        group, version = api_version.split("/")
        try:
            self.call(self.custom.delete_namespaced_custom_object, group, version, namespace,
                      CUSTOM_PLURALS[(api_version, kind)], name, what=f"deleting {kind} {namespace}/{name}",
                      idempotent=True)
        except NotFound:
            return False
        return True

    def delete_labelled(self, namespace: str, label_selector: str) -> None:
        """Delete the ConfigMaps and Secrets carrying the labels (a vanished namespace is fine)."""
        for method, kind in ((self.core.delete_collection_namespaced_config_map, "ConfigMaps"),
                             (self.core.delete_collection_namespaced_secret, "Secrets")):
            try:
                self.call(method, namespace, label_selector=label_selector,
                          what=f"deleting {kind} {label_selector} in {namespace}", idempotent=True)
            except NotFound:
                pass

    # ---- reads -----------------------------------------------------------------------------------

    def get_custom(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        group, version = api_version.split("/")
        try:
            return self.call(self.custom.get_namespaced_custom_object, group, version, namespace,
                             CUSTOM_PLURALS[(api_version, kind)], name, what=f"reading {kind} {namespace}/{name}",
                             idempotent=True)
        except NotFound:
            return None

    def list_custom(self, api_version: str, kind: str, namespace: str, label_selector: str = "") -> list[dict]:
        group, version = api_version.split("/")
        try:
            result = self.call(self.custom.list_namespaced_custom_object, group, version, namespace,
                               CUSTOM_PLURALS[(api_version, kind)], label_selector=label_selector or None,
                               what=f"listing {kind} in {namespace}", idempotent=True)
        except NotFound:
            return []
        return result.get("items", [])

    def read_core(self, kind: str, namespace: str | None, name: str) -> dict | None:
        """A built-in object as plain data (tests and the cluster suite read back what was applied)."""
        api, _patch, method, namespaced = BUILTIN_KINDS[kind]
        args = (name, namespace) if namespaced else (name,)
        try:
            result = self.call(getattr(getattr(self, api), method), *args, what=f"reading {kind} {name}",
                               idempotent=True)
        except NotFound:
            return None
        return self.api_client.sanitize_for_serialization(result)

    def list_pods(self, namespace: str, label_selector: str) -> list[dict]:
        try:
            result = self.call(self.core.list_namespaced_pod, namespace, label_selector=label_selector,
                               what=f"listing pods {label_selector} in {namespace}", idempotent=True)
        except NotFound:
            return []
        return self.api_client.sanitize_for_serialization(result).get("items", [])

    def pod_log(self, namespace: str, pod: str, *, container: str, since_seconds: int | None = None,
                tail_lines: int | None = None) -> str:
        try:
            return self.call(self.core.read_namespaced_pod_log, pod, namespace, container=container,
                             timestamps=True, since_seconds=since_seconds, tail_lines=tail_lines,
                             what=f"reading the log of pod {namespace}/{pod}", idempotent=True)
        except NotFound:
            return ""

    def follow_pod_log(self, namespace: str, pod: str, *, container: str, since_seconds: int | None = None,
                       tail_lines: int | None = None) -> Iterator[str]:
        """Lines of a pod's log as they are written. A follow stays open while the pod lives, so
        connecting is bounded by the request timeout and silence by FOLLOW_IDLE_SECONDS."""
        response = self.call(self.core.read_namespaced_pod_log, pod, namespace, container=container,
                             timestamps=True, follow=True, since_seconds=since_seconds, tail_lines=tail_lines,
                             _preload_content=False, _request_timeout=(self.timeout, FOLLOW_IDLE_SECONDS),
                             what=f"following the log of pod {namespace}/{pod}", idempotent=True)
        try:
            for line in response:
                yield line.decode("utf-8", "replace").rstrip("\n")
        finally:
            # Closed, not just released: a stream left half-read must not go back to the pool.
            response.close()
            response.release_conn()

    def watch_custom(self, api_version: str, kind: str, namespace: str, name: str, *,
                     timeout_seconds: int) -> Iterator[tuple[str, dict]]:
        """(event type, object) for one object: its current state first, then each change, until
        the server closes the watch after ``timeout_seconds``."""
        group, version = api_version.split("/")
        response = self.call(
            self.custom.list_namespaced_custom_object, group, version, namespace, CUSTOM_PLURALS[(api_version, kind)],
            field_selector=f"metadata.name={name}", watch=True, timeout_seconds=timeout_seconds,
            _preload_content=False, _request_timeout=(self.timeout, timeout_seconds + self.timeout),
            what=f"watching {kind} {namespace}/{name}", idempotent=True)
        try:
            try:
                for line in response:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise EngineError(f"The watch on {kind} {namespace}/{name} failed: "
                                          f"{status.get('message') or status}")
                    yield event["type"], event["object"]
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise EngineError(f"The watch on {kind} {namespace}/{name} stalled: {type(exc).__name__}") from exc
        finally:
            # Closed, not just released: a stream left half-read must not go back to the pool.
            response.close()
            response.release_conn()
