"""KnativeEngine: the Engine protocol on a Kubernetes cluster with Knative Serving.

Deploy applies the revision's ConfigMap, Secret and Service while keeping the traffic that was
serving, watches the Service until the new revision is ready or failed, then routes the requested
traffic. Offline makes the Service cluster-local: its public route goes away, revisions and the
traffic split are kept, and instances scale to zero once no requests arrive (down to min-scale).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from django.conf import settings

from functions.engines.base import (
    DeployEvent,
    FunctionRef,
    FunctionStatus,
    InvokeResult,
    LogLine,
    ProgressCallback,
    RevisionSpec,
    RevisionStatus,
    TenantSpec,
    TrafficSpec,
)
from portal.errors import Conflict, EngineError

from functions.engines.local.records import RecordsWriter

from . import invoke, logsync, manifests, names
from .client import KubeClient

log = logging.getLogger(__name__)

SERVICE = (manifests.SERVING_API, "Service")
REVISION = (manifests.SERVING_API, "Revision")
UPDATE_ATTEMPTS = 4


def conditions(obj: dict) -> dict[str, dict]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}


def revision_progress(service: dict, revision_name: str) -> tuple[str, str]:
    """Where ``revision_name`` stands according to a Service's status:
    (pending | created | ready | failed, message). Status older than the spec says nothing."""
    status = service.get("status") or {}
    generation = (service.get("metadata") or {}).get("generation") or 0
    if (status.get("observedGeneration") or 0) < generation:
        return "pending", ""
    if status.get("latestReadyRevisionName") == revision_name:
        return "ready", ""
    conds = conditions(service)
    if status.get("latestCreatedRevisionName") == revision_name:
        for kind in ("ConfigurationsReady", "Ready"):
            cond = conds.get(kind)
            if cond and cond.get("status") == "False":
                return "failed", cond.get("message") or cond.get("reason") or f"{kind} is False"
        cond = conds.get("ConfigurationsReady") or {}
        return "created", cond.get("message") or ""
    return "pending", ""


_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)\s?(.*)$")


def parse_log_line(line: str, *, revision: int | None, instance: str) -> LogLine | None:
    """A line of ``kubectl logs --timestamps`` from the shim (one JSON object) or anything else."""
    match = _TIMESTAMP.match(line)
    if not match:
        return None
    stamp, fraction, zone, rest = match.groups()
    fraction = (fraction or ".0")[:7]
    time_ = datetime.fromisoformat(stamp + fraction + ("+00:00" if zone == "Z" else zone))
    level, message, invocation_id = "INFO", rest, None
    if rest.startswith("{"):
        try:
            record = json.loads(rest)
        except ValueError:
            record = None
        if isinstance(record, dict):
            level = str(record.get("level") or "INFO").upper()
            message = str(record.get("message", rest))
            invocation_id = record.get("invocation_id")
    return LogLine(time=time_, message=message, level=level, revision=revision, invocation_id=invocation_id,
                   instance=instance)


class KnativeEngine:
    name = "knative"
    runs_cron = True  # cron triggers are PingSources: the cluster fires them, not the portal's worker

    def __init__(self, *, client: KubeClient | None = None, values: dict | None = None):
        self.values = dict(values if values is not None else settings.NIMBUS_KNATIVE)
        self.config = manifests.KnativeConfig.from_settings(self.values)
        self._client = client
        self.deploy_timeout = float(self.values.get("DEPLOY_TIMEOUT", 300))
        self.wait_ready = bool(self.values.get("WAIT_READY", True))
        # Calls from the portal (gateway, delivery queue): see invoke.py.
        self.routes = invoke.KnativeRouteTable()
        self.timeout_margin = float(self.values.get("INVOKE_TIMEOUT_MARGIN", invoke.DEFAULT_TIMEOUT_MARGIN))
        self.max_body_bytes = int(self.values.get("MAX_BODY_BYTES") or settings.NIMBUS_MAX_BODY_BYTES)
        self.service_client = invoke.ServiceClient()
        self._records: RecordsWriter | None = None
        self._records_lock = threading.Lock()
        # Function log lines stay in the pods until the delivery worker pulls them in (logsync.py).
        self.log_pull_seconds = float(self.values.get("LOG_PULL_SECONDS", 5) or 0)
        self.log_sync = logsync.LogSync(self)

    @property
    def records(self) -> RecordsWriter:
        """The invocation records writer, made on the first call through the portal."""
        if self._records is None:
            with self._records_lock:
                if self._records is None:
                    self._records = RecordsWriter(settings.NIMBUS_LOCAL.get("RETENTION"))
        return self._records

    def shutdown(self) -> None:
        """Close the connections to the Services and write the pending invocation records."""
        self.service_client.close()
        if self._records is not None:
            self._records.stop()

    # ---- calls through the portal ------------------------------------------------------------------

    async def invoke(self, *, tenant: str, name: str, tag: str = "", method: str = "POST", path: str = "/",
                     headers: list[tuple[str, str]] | None = None, body: bytes = b"", trigger: str = "async",
                     invocation_id=None) -> InvokeResult:
        return await invoke.invoke(self, tenant=tenant, name=name, tag=tag, method=method, path=path,
                                   headers=headers, body=body, trigger=trigger, invocation_id=invocation_id)

    async def respond(self, scope, send, route, target, tag, sub_path, headers, body) -> None:
        """The gateway's call of an authorised /fn/ request (functions/engines/local/gateway.py)."""
        await invoke.respond(self, scope, send, route, target, tag, sub_path, headers, body)

    @property
    def client(self) -> KubeClient:
        # Built on first use, so choosing the engine never needs a reachable cluster.
        if self._client is None:
            self._client = KubeClient.from_settings(self.values)
        return self._client

    def namespace(self, tenant: str) -> str:
        return names.namespace(tenant, self.config.namespace_prefix)

    # ---- tenants and deploys ---------------------------------------------------------------------

    def ensure_tenant(self, tenant: TenantSpec) -> None:
        for manifest in manifests.tenant_manifests(tenant, self.config):
            self.client.apply(manifest)

    def deploy(self, spec: RevisionSpec, *, traffic: list[TrafficSpec], progress: ProgressCallback) -> None:
        namespace = self.namespace(spec.function.tenant)
        service_name = names.service(spec.function.name)
        revision_name = names.revision(spec.function.name, spec.number)
        current = self.client.get_custom(*SERVICE, namespace, service_name)
        offline = bool(current) and manifests.OFFLINE_ANNOTATION in (current["metadata"].get("annotations") or {})
        # Until the new revision is ready the Service keeps routing what it routed before.
        serving = (current or {}).get("spec", {}).get("traffic") if current else None
        objects = manifests.revision_manifests(spec, self.config, traffic=serving, offline=offline)
        *supporting, service = objects
        for manifest in supporting:
            self.client.apply(manifest)
        progress(DeployEvent("manifests", "ok", "Applied " + ", ".join(
            f"{m['kind']} {m['metadata']['name']}" for m in supporting) + f" in namespace {namespace}."))
        self.client.apply(service)
        progress(DeployEvent("instance", "running", f"Service {service_name} applied; Knative is creating "
                                                    f"revision {revision_name}."))
        if self.wait_ready:
            self._await_revision(namespace, service_name, revision_name, progress)
        else:
            progress(DeployEvent("health", "ok", f"Not waiting for {revision_name} to be ready (WAIT_READY off)."))
        targets = manifests.traffic_targets(spec.function.name, traffic)
        self.client.apply(manifests.service(spec, self.config, traffic=targets, offline=offline))
        progress(DeployEvent("traffic", "ok", "Traffic: " + ", ".join(
            f"{t['revisionName']} {t['percent']}%" + (f" (tag {t['tag']})" if t.get("tag") else "")
            for t in targets) + "."))
        # The database shows the new traffic a moment after this returns: look again often until then.
        self.routes.invalidate(eager_seconds=10)

    def _await_revision(self, namespace: str, service_name: str, revision_name: str,
                        progress: ProgressCallback) -> None:
        deadline = time.monotonic() + self.deploy_timeout
        announced, last_message = False, ""
        while (remaining := deadline - time.monotonic()) > 0:
            for event_type, obj in self.client.watch_custom(*SERVICE, namespace, service_name,
                                                       timeout_seconds=max(1, math.ceil(remaining))):
                if event_type == "DELETED":
                    raise EngineError(f"Service {namespace}/{service_name} was deleted during the deploy.")
                state, message = revision_progress(obj, revision_name)
                last_message = message or last_message
                if state in ("created", "ready") and not announced:
                    announced = True
                    progress(DeployEvent("instance", "ok", f"Revision {revision_name} created."))
                if state == "ready":
                    progress(DeployEvent("health", "ok", f"Revision {revision_name} is ready."))
                    return
                if state == "failed":
                    text = f"Revision {revision_name} failed: {message}"
                    progress(DeployEvent("health", "failed", text))
                    raise EngineError(text)
                if time.monotonic() >= deadline:
                    break
            else:
                # The server ended the watch early (a restart, a proxy's idle cut): reconnect, gently.
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        text = f"Revision {revision_name} was not ready within {self.deploy_timeout:g}s" + (
            f": {last_message}" if last_message else ".")
        progress(DeployEvent("health", "failed", text))
        raise EngineError(text)

    # ---- traffic, offline, delete ------------------------------------------------------------

    def _update_service(self, function: FunctionRef, change) -> dict:
        """Read, change, write back with the resourceVersion read; a concurrent writer (409) means
        read again and redo the change."""
        namespace, name = self.namespace(function.tenant), names.service(function.name)
        for attempt in range(UPDATE_ATTEMPTS):
            current = self.client.get_custom(*SERVICE, namespace, name)
            if current is None:
                raise EngineError(f"Function {function.tenant}/{function.name} has no Knative Service yet; "
                                  "deploy it first.")
            change(current)
            try:
                return self.client.replace_custom(*SERVICE, current)
            except Conflict:
                if attempt == UPDATE_ATTEMPTS - 1:
                    raise
                log.info("Service %s/%s changed underneath; retrying", namespace, name)
        raise AssertionError("unreachable")

    def set_traffic(self, function: FunctionRef, traffic: list[TrafficSpec]) -> None:
        targets = manifests.traffic_targets(function.name, traffic)

        def change(service: dict) -> None:
            service["spec"]["traffic"] = targets

        self._update_service(function, change)
        self.routes.invalidate()

    def set_offline(self, function: FunctionRef, offline: bool) -> None:
        def change(service: dict) -> None:
            meta = service["metadata"]
            labels, annotations = meta.setdefault("labels", {}), meta.setdefault("annotations", {})
            if offline:
                labels[manifests.VISIBILITY_LABEL] = "cluster-local"
                annotations[manifests.OFFLINE_ANNOTATION] = "true"
            else:
                labels.pop(manifests.VISIBILITY_LABEL, None)
                annotations.pop(manifests.OFFLINE_ANNOTATION, None)

        self._update_service(function, change)
        self.routes.invalidate()

    def delete(self, function: FunctionRef) -> None:
        namespace = self.namespace(function.tenant)
        self.client.delete_custom(*SERVICE, namespace, names.service(function.name))
        self.client.delete_labelled(namespace, f"{names.LABEL_MANAGED_BY}=nimbus,"
                                               f"{names.LABEL_FUNCTION_ID}={function.function_id}")
        self.routes.invalidate()

    # ---- status and logs ---------------------------------------------------------------------

    def status(self, function: FunctionRef) -> FunctionStatus:
        namespace, name = self.namespace(function.tenant), names.service(function.name)
        service = self.client.get_custom(*SERVICE, namespace, name)
        if service is None:
            return FunctionStatus(ready=False, message="Not deployed on the cluster.")
        status = service.get("status") or {}
        ready_cond = conditions(service).get("Ready") or {}
        ready = ready_cond.get("status") == "True"
        offline = manifests.OFFLINE_ANNOTATION in (service["metadata"].get("annotations") or {})

        revisions_ready = {
            r["metadata"]["name"]: conditions(r).get("Ready", {}).get("status") == "True"
            for r in self.client.list_custom(*REVISION, namespace, f"{names.KNATIVE_SERVICE_LABEL}={name}")}
        instances: dict[str, int] = {}
        for pod in self.client.list_pods(namespace, f"{names.KNATIVE_SERVICE_LABEL}={name}"):
            pod_ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                            for c in (pod.get("status") or {}).get("conditions") or [])
            if pod_ready and not pod["metadata"].get("deletionTimestamp"):
                revision = pod["metadata"].get("labels", {}).get(names.KNATIVE_REVISION_LABEL, "")
                instances[revision] = instances.get(revision, 0) + 1

        # Status traffic is what is routed; until Knative has seen the latest spec, the spec is
        # the better answer (it is what will be routed).
        current = (status.get("observedGeneration") or 0) >= (service["metadata"].get("generation") or 0)
        routed = (status.get("traffic") if current else None) or service.get("spec", {}).get("traffic") or []
        rows, seen = [], set()
        for target in routed:
            revision_name = target.get("revisionName")
            number = names.revision_number(function.name, revision_name)
            if number is None:
                continue
            seen.add(revision_name)
            rows.append(RevisionStatus(revision=number, ready=revisions_ready.get(revision_name, False),
                                       percent=int(target.get("percent") or 0), tag=target.get("tag") or "",
                                       instances=instances.get(revision_name, 0), url=target.get("url")))
        for revision_name, count in sorted(instances.items()):
            number = names.revision_number(function.name, revision_name)
            if revision_name not in seen and number is not None:
                rows.append(RevisionStatus(revision=number, ready=revisions_ready.get(revision_name, False),
                                           instances=count))
        return FunctionStatus(
            ready=ready,
            # Before Knative reports a URL, the one its domain template (config-domain) will give.
            url=status.get("url") or (f"http://{name}.{namespace}.{self.values['DOMAIN']}"
                                      if self.values.get("DOMAIN") else None),
            latest_ready_revision=names.revision_number(function.name, status.get("latestReadyRevisionName")),
            revisions=rows,
            offline=offline,
            message="" if ready else (ready_cond.get("message") or ready_cond.get("reason")
                                      or "Knative has not reported the Service ready yet."),
        )

    def logs(self, function: FunctionRef, *, revision: int | None = None, since: datetime | None = None,
             follow: bool = False, limit: int = 500) -> Iterator[LogLine]:
        """Lines of the function's instances (``user-container``), oldest first. Following streams
        the newest instance, since one stream per instance would hold a connection each."""
        namespace, name = self.namespace(function.tenant), names.service(function.name)
        selector = f"{names.KNATIVE_SERVICE_LABEL}={name}"
        if revision is not None:
            selector += f",{names.KNATIVE_REVISION_LABEL}={names.revision(function.name, revision)}"
        pods = sorted(self.client.list_pods(namespace, selector),
                      key=lambda p: p["metadata"].get("creationTimestamp") or "")
        since_seconds = None
        if since is not None:
            if since.tzinfo is None:
                since = since.replace(tzinfo=UTC)
            since_seconds = max(1, int((datetime.now(UTC) - since).total_seconds()))

        def pod_revision(pod: dict) -> int | None:
            return names.revision_number(function.name,
                                         pod["metadata"].get("labels", {}).get(names.KNATIVE_REVISION_LABEL))

        if follow:
            if not pods:
                return
            pod = pods[-1]
            for raw in self.client.follow_pod_log(namespace, pod["metadata"]["name"], container=names.USER_CONTAINER,
                                                  since_seconds=since_seconds, tail_lines=limit):
                line = parse_log_line(raw, revision=pod_revision(pod), instance=pod["metadata"]["name"])
                if line is not None:
                    yield line
            return
        lines: list[LogLine] = []
        for pod in pods:
            text = self.client.pod_log(namespace, pod["metadata"]["name"], container=names.USER_CONTAINER,
                                       since_seconds=since_seconds, tail_lines=limit)
            for raw in text.splitlines():
                line = parse_log_line(raw, revision=pod_revision(pod), instance=pod["metadata"]["name"])
                if line is not None:
                    lines.append(line)
        lines.sort(key=lambda line: line.time)
        yield from lines[-limit:]

    def pull_logs(self) -> int:
        """One pass bringing new log lines of recently invoked functions from their pods into the
        portal's log store; returns how many lines were stored. Blocking (HTTP and database)."""
        return self.log_sync.pull()

    # ---- triggers (issue 6) ----------------------------------------------------------------------------

    def sync_triggers(self, function: FunctionRef, triggers: list[dict], *, policy=None) -> None:
        """Make the function's PingSources and Eventing Triggers match its enabled triggers: apply
        the wanted ones (and the tenant's Broker), delete the ones no longer wanted."""
        namespace = self.namespace(function.tenant)
        delivery_policy = manifests.DeliveryPolicy(
            max_attempts=getattr(policy, "max_attempts", 3), backoff_seconds=getattr(policy, "backoff_seconds", 1.0))
        template = self.values.get("DEAD_LETTER_SINK") or ""
        dead_letter = template.format(tenant=function.tenant, function=function.name) if template else None
        wanted = manifests.trigger_manifests(function, triggers, self.config, policy=delivery_policy,
                                             dead_letter_uri=dead_letter)
        for manifest in wanted:
            self.client.apply(manifest)
        keep = {(m["kind"], m["metadata"]["name"]) for m in wanted}
        selector = f"{names.LABEL_MANAGED_BY}=nimbus,{names.LABEL_FUNCTION_ID}={function.function_id}"
        for api_version, kind in ((manifests.SOURCES_API, "PingSource"), (manifests.EVENTING_API, "Trigger")):
            for existing in self.client.list_custom(api_version, kind, namespace, selector):
                name = existing["metadata"]["name"]
                if (kind, name) not in keep:
                    self.client.delete_custom(api_version, kind, namespace, name)

    def sync_sequence(self, tenant: str, name: str, functions: list[str] | None, *, policy=None) -> None:
        """Apply the flows Sequence for a Nimbus sequence, or delete it when ``functions`` is None."""
        if functions is None:
            self.client.delete_custom(manifests.FLOWS_API, "Sequence", self.namespace(tenant), names.dns_label(name))
            return
        delivery_policy = manifests.DeliveryPolicy(
            max_attempts=getattr(policy, "max_attempts", 3), backoff_seconds=getattr(policy, "backoff_seconds", 1.0))
        self.client.apply(manifests.sequence(tenant, name, functions, self.config, policy=delivery_policy))
