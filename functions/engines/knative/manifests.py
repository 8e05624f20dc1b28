"""Pure builders from the engine's plain-data specs to Kubernetes manifests (dicts). No I/O.

A tenant is a Namespace with a ResourceQuota and a LimitRange; a function is a Knative Service
whose template is the revision being deployed; each revision's code is its own ConfigMap and its
secrets its own Secret, so older revisions in a traffic split keep what they were built with.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from functions.engines import envpolicy
from functions.engines.base import RevisionSpec, TenantSpec, TrafficSpec
from portal.errors import EngineError, InvalidSource

from . import names

SERVING_GROUP = "serving.knative.dev"
SERVING_VERSION = "v1"
SERVING_API = f"{SERVING_GROUP}/{SERVING_VERSION}"

# A ConfigMap is capped at 1 MiB as a whole object; leave room for its metadata.
MAX_CODE_BYTES = 1_000_000
CODE_VOLUME = "code"
CONTAINER_PORT = 8080
HEALTH_PATH = "/_nimbus/health"
VISIBILITY_LABEL = "networking.knative.dev/visibility"
OFFLINE_ANNOTATION = "nimbus.dev/offline"
EGRESS_LABEL = "nimbus.dev/egress"
# Names Knative or the shim set themselves; a function's own variable may not shadow them.
RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}


@dataclass(frozen=True)
class KnativeConfig:
    """The settings the builders depend on (settings.NIMBUS_KNATIVE), passed in to keep them pure."""

    namespace_prefix: str = "nimbus-"
    runtime_images: Mapping[str, str] = field(default_factory=dict)
    sandbox_runtime_class: str = "gvisor"
    dedicated_node_label: str = "nimbus.dev/tenant"
    code_dir: str = "/var/nimbus/code"
    scale_to_zero_retention: str = "0s"
    max_code_bytes: int = MAX_CODE_BYTES

    @classmethod
    def from_settings(cls, values: Mapping) -> KnativeConfig:
        return cls(
            namespace_prefix=values.get("NAMESPACE_PREFIX", cls.namespace_prefix),
            runtime_images=dict(values.get("RUNTIME_IMAGES", {})),
            sandbox_runtime_class=values.get("SANDBOX_RUNTIME_CLASS", cls.sandbox_runtime_class),
            dedicated_node_label=values.get("DEDICATED_NODE_LABEL", cls.dedicated_node_label),
            code_dir=values.get("CODE_DIR", cls.code_dir),
            scale_to_zero_retention=values.get("SCALE_TO_ZERO_RETENTION", cls.scale_to_zero_retention),
            max_code_bytes=int(values.get("MAX_CODE_BYTES", cls.max_code_bytes)),
        )


# ---- tenants --------------------------------------------------------------------------------

def tenant_labels(tenant: TenantSpec) -> dict[str, str]:
    return {names.LABEL_MANAGED_BY: "nimbus", names.LABEL_TENANT: tenant.slug}


def tenant_namespace(tenant: TenantSpec, config: KnativeConfig) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": names.namespace(tenant.slug, config.namespace_prefix),
            "labels": {**tenant_labels(tenant), names.LABEL_ISOLATION: tenant.isolation},
        },
    }


def tenant_resource_quota(tenant: TenantSpec, config: KnativeConfig) -> dict:
    quota = tenant.quota
    hard: dict[str, str] = {}
    if "max_functions" in quota:
        hard[f"count/services.{SERVING_GROUP}"] = str(quota["max_functions"])
        if "max_instances_per_function" in quota:
            hard["pods"] = str(quota["max_functions"] * quota["max_instances_per_function"])
    if "max_total_memory_mb" in quota:
        # Both, so a pod without limits cannot slip past the memory budget.
        hard["requests.memory"] = f"{quota['max_total_memory_mb']}Mi"
        hard["limits.memory"] = f"{quota['max_total_memory_mb']}Mi"
    if "max_gpus" in quota:
        hard["requests.nvidia.com/gpu"] = str(quota["max_gpus"])
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {
            "name": "nimbus-quota",
            "namespace": names.namespace(tenant.slug, config.namespace_prefix),
            "labels": tenant_labels(tenant),
        },
        "spec": {"hard": hard},
    }


def tenant_limit_range(tenant: TenantSpec, config: KnativeConfig) -> dict:
    """Per-container ceiling from the quota, and defaults for containers Nimbus does not size
    itself (Knative's queue-proxy), which the memory quota would otherwise refuse."""
    max_memory = tenant.quota.get("max_memory_mb_per_function")
    limit: dict = {"type": "Container", "default": {"memory": "128Mi"},
                   "defaultRequest": {"memory": "64Mi", "cpu": "25m"}}
    if max_memory:
        limit["max"] = {"memory": f"{max_memory}Mi"}
        limit["default"] = {"memory": f"{min(128, max_memory)}Mi"}
        limit["defaultRequest"] = {"memory": f"{min(64, max_memory)}Mi", "cpu": "25m"}
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": {
            "name": "nimbus-limits",
            "namespace": names.namespace(tenant.slug, config.namespace_prefix),
            "labels": tenant_labels(tenant),
        },
        "spec": {"limits": [limit]},
    }


def tenant_network_policy(tenant: TenantSpec, config: KnativeConfig) -> dict:
    """No outbound connections from instances of functions that do not allow egress (the local
    engine's no-network sandbox); their pods carry ``nimbus.dev/egress: denied``."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": "nimbus-deny-egress",
            "namespace": names.namespace(tenant.slug, config.namespace_prefix),
            "labels": tenant_labels(tenant),
        },
        "spec": {"podSelector": {"matchLabels": {EGRESS_LABEL: "denied"}}, "policyTypes": ["Egress"],
                 "egress": []},
    }


def tenant_manifests(tenant: TenantSpec, config: KnativeConfig) -> list[dict]:
    """In apply order: the namespace first."""
    return [tenant_namespace(tenant, config), tenant_resource_quota(tenant, config),
            tenant_limit_range(tenant, config), tenant_network_policy(tenant, config)]


def isolation_pod_fields(tenant: TenantSpec | None, config: KnativeConfig) -> dict:
    """Pod-spec fields that place a tenant's instances: a sandboxing RuntimeClass, or its own nodes."""
    if tenant is None or tenant.isolation == "shared":
        return {}
    if tenant.isolation == "sandboxed":
        return {"runtimeClassName": config.sandbox_runtime_class}
    if tenant.isolation == "dedicated":
        label = config.dedicated_node_label
        return {
            "nodeSelector": {label: tenant.slug},
            "tolerations": [{"key": label, "operator": "Equal", "value": tenant.slug, "effect": "NoSchedule"}],
        }
    raise EngineError(f"Unknown isolation mode {tenant.isolation!r}.")


# ---- revisions ------------------------------------------------------------------------------

def function_labels(spec_function) -> dict[str, str]:
    return {
        names.LABEL_MANAGED_BY: "nimbus",
        names.LABEL_TENANT: spec_function.tenant,
        names.LABEL_FUNCTION: names.service(spec_function.name),
        names.LABEL_FUNCTION_ID: str(spec_function.function_id),
    }


def revision_labels(spec: RevisionSpec) -> dict[str, str]:
    return {**function_labels(spec.function), names.LABEL_REVISION: str(spec.number)}


def _namespace_of(spec: RevisionSpec, config: KnativeConfig) -> str:
    return names.namespace(spec.function.tenant, config.namespace_prefix)


def code_items(files: Mapping[str, str]) -> list[dict]:
    """ConfigMap keys for each source path (unique even when two paths squash to one key),
    with the path the volume gives the file back under."""
    items, used = [], set()
    for path in sorted(files):
        key = base = names.config_map_key(path)
        n = 2
        while key in used:
            key, n = f"{base}.{n}", n + 1
        used.add(key)
        items.append({"key": key, "path": path})
    return items


def code_config_map(spec: RevisionSpec, config: KnativeConfig) -> dict:
    items = code_items(spec.files)
    data = {item["key"]: spec.files[item["path"]] for item in items}
    size = sum(len(k.encode()) + len(v.encode()) for k, v in data.items())
    if size > config.max_code_bytes:
        raise InvalidSource(
            f"The source is {size:,} bytes; on Knative a function's code travels in a ConfigMap, which holds at "
            f"most {config.max_code_bytes:,} bytes. Make the source smaller (built images for larger sources "
            "are not supported yet).", field="files")
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": names.code_config_map(spec.function.name, spec.number),
            "namespace": _namespace_of(spec, config),
            "labels": revision_labels(spec),
            "annotations": {"nimbus.dev/content-hash": spec.content_hash},
        },
        # A revision's code never changes, so the kubelet need not watch it.
        "immutable": True,
        "data": data,
    }


def secret(spec: RevisionSpec, config: KnativeConfig) -> dict | None:
    """The revision's secrets, or None when it has none."""
    if not spec.secrets:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": names.secret(spec.function.name, spec.number),
            "namespace": _namespace_of(spec, config),
            "labels": revision_labels(spec),
        },
        "type": "Opaque",
        "immutable": True,
        "data": {name: base64.b64encode(value.encode()).decode() for name, value in sorted(spec.secrets.items())},
    }


def container_env(spec: RevisionSpec, config: KnativeConfig) -> list[dict]:
    platform = {
        "NIMBUS_CODE_DIR": config.code_dir,
        "NIMBUS_HANDLER": spec.handler,
        "NIMBUS_TENANT": spec.function.tenant,
        "NIMBUS_FUNCTION": spec.function.name,
        "NIMBUS_REVISION": str(spec.number),
        "NIMBUS_TIMEOUT_SECONDS": str(spec.timeout_seconds),
        "NIMBUS_DEBUG": "1" if spec.debug else "0",
        "NIMBUS_MEMORY_MB": str(spec.memory_mb),
    }
    env = [{"name": name, "value": value} for name, value in platform.items()]
    # The services refuse these names already; dropping them here too keeps rows written before
    # the policy, or around the services, out of the container.
    own_env, _ = envpolicy.allowed(spec.env)
    own_secrets, _ = envpolicy.allowed(spec.secrets)

    def allowed(name: str) -> bool:
        return name not in RESERVED_ENV and name not in platform

    env += [{"name": name, "value": value} for name, value in sorted(own_env.items())
            if allowed(name) and name not in spec.secrets]
    secret_name = names.secret(spec.function.name, spec.number)
    env += [{"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": name}}}
            for name in sorted(own_secrets) if allowed(name)]
    return env


def container_resources(spec: RevisionSpec) -> dict:
    cpu, memory = f"{spec.cpu_millicores}m", f"{spec.memory_mb}Mi"
    limits = {"cpu": cpu, "memory": memory}
    if spec.gpus:
        limits["nvidia.com/gpu"] = str(spec.gpus)
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def autoscaling_annotations(spec: RevisionSpec, config: KnativeConfig) -> dict[str, str]:
    # The soft target cannot exceed the hard limit; with no limit Knative's default (100) applies.
    target = spec.concurrency if spec.concurrency > 0 else 100
    return {
        "autoscaling.knative.dev/min-scale": str(spec.min_instances),
        "autoscaling.knative.dev/max-scale": str(spec.max_instances),
        "autoscaling.knative.dev/target": str(target),
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period": config.scale_to_zero_retention,
    }


def runtime_image(runtime: str, config: KnativeConfig) -> str:
    try:
        return config.runtime_images[runtime]
    except KeyError:
        raise EngineError(f"No runtime image is configured for {runtime!r} (settings NIMBUS_KNATIVE"
                          "['RUNTIME_IMAGES']).") from None


def traffic_targets(function: str, traffic: Iterable[TrafficSpec]) -> list[dict]:
    targets = []
    for target in traffic:
        entry = {"revisionName": names.revision(function, target.revision), "latestRevision": False,
                 "percent": target.percent}
        if target.tag:
            entry["tag"] = target.tag
        targets.append(entry)
    return targets


def service(spec: RevisionSpec, config: KnativeConfig, *, traffic: list[dict] | None,
            offline: bool = False) -> dict:
    """The Knative Service whose template is ``spec``.

    ``traffic`` is ``spec.traffic`` as built by :func:`traffic_targets` (or read back from the
    cluster); None leaves it to Knative (all traffic to the latest ready revision).
    ``offline`` makes the Service cluster-local: its public route goes away.
    """
    labels = function_labels(spec.function)
    annotations = {}
    if offline:
        labels[VISIBILITY_LABEL] = "cluster-local"
        annotations[OFFLINE_ANNOTATION] = "true"
    container = {
        "name": names.USER_CONTAINER,
        "image": runtime_image(spec.runtime, config),
        "ports": [{"name": "http1", "containerPort": CONTAINER_PORT}],
        "env": container_env(spec, config),
        "resources": container_resources(spec),
        "volumeMounts": [{"name": CODE_VOLUME, "mountPath": config.code_dir, "readOnly": True}],
        "readinessProbe": {"httpGet": {"path": HEALTH_PATH}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec = {
        "containerConcurrency": spec.concurrency,
        "timeoutSeconds": spec.timeout_seconds,
        "enableServiceLinks": False,
        **isolation_pod_fields(spec.tenant, config),
        "containers": [container],
        "volumes": [{
            "name": CODE_VOLUME,
            "configMap": {"name": names.code_config_map(spec.function.name, spec.number),
                          "items": code_items(spec.files)},
        }],
    }
    manifest = {
        "apiVersion": SERVING_API,
        "kind": "Service",
        "metadata": {
            "name": names.service(spec.function.name),
            "namespace": _namespace_of(spec, config),
            "labels": labels,
        },
        "spec": {
            "template": {
                "metadata": {
                    "name": names.revision(spec.function.name, spec.number),
                    "labels": {**revision_labels(spec), EGRESS_LABEL: "allowed" if spec.allow_egress else "denied"},
                    "annotations": {**autoscaling_annotations(spec, config),
                                    "nimbus.dev/content-hash": spec.content_hash},
                },
                "spec": pod_spec,
            },
        },
    }
    if annotations:
        manifest["metadata"]["annotations"] = annotations
    if traffic is not None:
        manifest["spec"]["traffic"] = traffic
    return manifest


def revision_manifests(spec: RevisionSpec, config: KnativeConfig, *, traffic: list[dict] | None,
                       offline: bool = False) -> list[dict]:
    """Everything one revision needs, in apply order (the Service last: it mounts the others)."""
    manifests = [code_config_map(spec, config)]
    if (secret_manifest := secret(spec, config)) is not None:
        manifests.append(secret_manifest)
    manifests.append(service(spec, config, traffic=traffic, offline=offline))
    return manifests


# ---- eventing: cron and event triggers, the tenant's broker, sequences (issue 6) ---------------------------

SOURCES_API = "sources.knative.dev/v1"
EVENTING_API = "eventing.knative.dev/v1"
FLOWS_API = "flows.knative.dev/v1"
CHANNEL_API = "messaging.knative.dev/v1"
BROKER_NAME = "default"
LABEL_TRIGGER = "nimbus.dev/trigger"
LABEL_SEQUENCE = "nimbus.dev/sequence"


@dataclass(frozen=True)
class DeliveryPolicy:
    """The retry policy as Eventing's ``delivery`` understands it (functions.triggers.queue.Policy)."""

    max_attempts: int = 3
    backoff_seconds: float = 1.0


def iso_duration(seconds: float) -> str:
    """ISO 8601 duration (``PT1S``, ``PT0.25S``) as Eventing's backoffDelay wants it."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"PT{text or '0'}S"


def delivery(policy: DeliveryPolicy, dead_letter_uri: str | None = None) -> dict:
    """Eventing counts retries after the first attempt; Nimbus counts attempts."""
    spec = {"retry": max(policy.max_attempts - 1, 0), "backoffPolicy": "exponential",
            "backoffDelay": iso_duration(policy.backoff_seconds)}
    if dead_letter_uri:
        spec["deadLetterSink"] = {"uri": dead_letter_uri}
    return spec


def _service_ref(function_name: str) -> dict:
    return {"apiVersion": SERVING_API, "kind": "Service", "name": names.service(function_name)}


def trigger_object_name(function_name: str, trigger_name: str) -> str:
    return names.dns_label(f"{names.service(function_name)}-{trigger_name}")


def _trigger_labels(function, trigger_name: str) -> dict[str, str]:
    return {**function_labels(function), LABEL_TRIGGER: names.dns_label(trigger_name)}


def tenant_broker(tenant: str, config: KnativeConfig) -> dict:
    """The tenant's Broker: event triggers subscribe to it; the portal's ingress publishes into it."""
    return {
        "apiVersion": EVENTING_API, "kind": "Broker",
        "metadata": {"name": BROKER_NAME, "namespace": names.namespace(tenant, config.namespace_prefix),
                     "labels": {names.LABEL_MANAGED_BY: "nimbus", names.LABEL_TENANT: tenant}},
        "spec": {},
    }


def ping_source(function, trigger: Mapping, config: KnativeConfig) -> dict:
    """A cron trigger: a PingSource sinking a CloudEvent to the function's Service on schedule."""
    return {
        "apiVersion": SOURCES_API, "kind": "PingSource",
        "metadata": {"name": trigger_object_name(function.name, trigger["name"]),
                     "namespace": names.namespace(function.tenant, config.namespace_prefix),
                     "labels": _trigger_labels(function, trigger["name"])},
        "spec": {
            "schedule": trigger["schedule"],
            "timezone": trigger.get("time_zone") or "UTC",
            "contentType": "application/json",
            "data": '{"trigger": "%s", "schedule": "%s"}' % (trigger["name"], trigger["schedule"]),
            "sink": {"ref": _service_ref(function.name)},
        },
    }


def event_trigger(function, trigger: Mapping, config: KnativeConfig, *, policy: DeliveryPolicy,
                  dead_letter_uri: str | None = None) -> dict:
    """An event trigger: an Eventing Trigger on the tenant's Broker. Exact filters only use the
    classic ``filter.attributes``; prefix matches need the ``filters`` dialects (all must match)."""
    filters = list(trigger.get("filters") or [])
    exact = {f["attribute"]: f["value"] for f in filters if f.get("match", "exact") == "exact"}
    prefix = {f["attribute"]: f["value"] for f in filters if f.get("match") == "prefix"}
    spec: dict = {"broker": BROKER_NAME, "subscriber": {"ref": _service_ref(function.name)},
                  "delivery": delivery(policy, dead_letter_uri)}
    if prefix:
        spec["filters"] = ([{"exact": exact}] if exact else []) + [{"prefix": prefix}]
    elif exact:
        spec["filter"] = {"attributes": exact}
    return {
        "apiVersion": EVENTING_API, "kind": "Trigger",
        "metadata": {"name": trigger_object_name(function.name, trigger["name"]),
                     "namespace": names.namespace(function.tenant, config.namespace_prefix),
                     "labels": _trigger_labels(function, trigger["name"])},
        "spec": spec,
    }


def trigger_manifests(function, triggers: Iterable[Mapping], config: KnativeConfig, *, policy: DeliveryPolicy,
                      dead_letter_uri: str | None = None) -> list[dict]:
    """The Eventing objects for a function's enabled triggers (HTTP triggers need none), the
    tenant's Broker first when any event trigger needs it."""
    built = []
    for trigger in triggers:
        if trigger["kind"] == "cron":
            built.append(ping_source(function, trigger, config))
        elif trigger["kind"] == "event":
            built.append(event_trigger(function, trigger, config, policy=policy, dead_letter_uri=dead_letter_uri))
    if any(m["kind"] == "Trigger" for m in built):
        built.insert(0, tenant_broker(function.tenant, config))
    return built


def sequence(tenant: str, name: str, functions: list[str], config: KnativeConfig, *,
             policy: DeliveryPolicy) -> dict:
    """A sequence: a flows Sequence whose steps are the functions' Services, over in-memory channels."""
    return {
        "apiVersion": FLOWS_API, "kind": "Sequence",
        "metadata": {"name": names.dns_label(name), "namespace": names.namespace(tenant, config.namespace_prefix),
                     "labels": {names.LABEL_MANAGED_BY: "nimbus", names.LABEL_TENANT: tenant,
                                LABEL_SEQUENCE: names.dns_label(name)}},
        "spec": {
            "channelTemplate": {"apiVersion": CHANNEL_API, "kind": "InMemoryChannel"},
            "steps": [{"ref": _service_ref(function), "delivery": delivery(policy)} for function in functions],
        },
    }
