"""Validation of manifests as an API server (and Knative's webhook) would do it.

Custom kinds against the ``openAPIV3Schema`` of the shared Knative CRDs (structural-schema rules
turned into JSON Schema), the webhook-only rules from the CRDs' README, and core kinds with
``kubernetes-validate``. Shared by the manifest tests and the API stand-in (its 422 answers).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
# The shared CRDs sit beside the repository (CI's layout); NIMBUS_KNATIVE_CRDS points elsewhere.
CRD_DIR = Path(os.environ.get("NIMBUS_KNATIVE_CRDS") or REPO_ROOT.parent / "shared" / "knative-crds")
RESERVED_PORTS = {8012, 8022, 9090, 9091}
AUTOSCALING_PREFIX = "autoscaling.knative.dev/"
# Built-in kinds (checked with kubernetes-validate): kind → apiVersion.
BUILTIN_KINDS = {"Namespace": "v1", "ConfigMap": "v1", "Secret": "v1", "ResourceQuota": "v1", "LimitRange": "v1",
                 "Pod": "v1", "NetworkPolicy": "networking.k8s.io/v1"}


def crds_present() -> bool:
    return CRD_DIR.is_dir() and any(CRD_DIR.glob("*/*.yaml"))


@functools.cache
def crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) → {"plural", "scope", "schema"} for every served version of every shared CRD."""
    found = {}
    for path in sorted(CRD_DIR.glob("*/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                found[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = {
                    "plural": spec["names"]["plural"],
                    "scope": spec["scope"],
                    "schema": version["schema"]["openAPIV3Schema"],
                }
    return found


def to_json_schema(node: dict, *, root: bool = False) -> dict:
    """A structural schema as JSON Schema: unknown fields are errors (the server's strict field
    validation) unless preserved; int-or-string and nullable widen the type; embedded resources
    get their apiVersion/kind/metadata."""
    out = copy.copy(node)
    out.pop("description", None)
    for key in ("x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
                "x-kubernetes-validations", "format"):
        out.pop(key, None)
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("x-kubernetes-embedded-resource", False):
        props = dict(out.get("properties", {}))
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object", "x-kubernetes-preserve-unknown-fields": True})
        out["properties"] = props
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: to_json_schema(v) for k, v in out["properties"].items()}
        if root:
            out["properties"]["metadata"] = METADATA_SCHEMA
            # Every object carries these; the eventing CRDs' schemas do not list them (serving's do).
            out["properties"].setdefault("apiVersion", {"type": "string"})
            out["properties"].setdefault("kind", {"type": "string"})
        if not preserve and "additionalProperties" not in out:
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = to_json_schema(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [to_json_schema(s) if "type" in s or "properties" in s else s for s in out[key]]
    if "not" in out:
        out["not"] = to_json_schema(out["not"])
    return out


# What the server checks of any object's metadata before the CRD schema applies.
METADATA_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@functools.cache
def _validator(api_version: str, kind: str):
    schema = to_json_schema(crds()[(api_version, kind)]["schema"], root=True)
    return jsonschema.Draft7Validator(schema)


def _path(error) -> str:
    parts = []
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).lstrip(".") or "<root>"


def schema_errors(manifest: dict) -> list[tuple[str, str]]:
    """(field path, message) for each way ``manifest`` breaks its kind's schema."""
    key = (manifest.get("apiVersion"), manifest.get("kind"))
    if key in crds():
        errors = [(_path(e), e.message) for e in _validator(*key).iter_errors(manifest)]
        return errors + webhook_errors(manifest)
    if BUILTIN_KINDS.get(manifest.get("kind")) == manifest.get("apiVersion"):
        return core_errors(manifest)
    return [("kind", f"no schema for {key}")]


def core_errors(manifest: dict) -> list[tuple[str, str]]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [(".".join(map(str, exc.path)) or "<root>", exc.message)]
    return []


def webhook_errors(manifest: dict) -> list[tuple[str, str]]:
    """The rules Knative's admission webhook adds for serving objects (see the CRDs' README)."""
    if manifest.get("apiVersion") != "serving.knative.dev/v1" or manifest.get("kind") != "Service":
        return []
    errors = []
    name = manifest.get("metadata", {}).get("name", "")
    for key in manifest.get("metadata", {}).get("annotations", {}) or {}:
        if key.startswith(AUTOSCALING_PREFIX):
            errors.append((f"metadata.annotations.{key}",
                           "autoscaling annotations belong under spec.template.metadata.annotations"))
    template = manifest.get("spec", {}).get("template", {})
    revision_name = template.get("metadata", {}).get("name")
    if revision_name is not None and not revision_name.startswith(f"{name}-"):
        errors.append(("spec.template.metadata.name", f"revision name must start with {name}-"))
    for i, container in enumerate(template.get("spec", {}).get("containers", [])):
        if not container.get("image"):
            errors.append((f"spec.template.spec.containers[{i}].image", "image is required"))
        for j, port in enumerate(container.get("ports", [])):
            if port.get("containerPort") in RESERVED_PORTS:
                errors.append((f"spec.template.spec.containers[{i}].ports[{j}].containerPort",
                               f"port {port['containerPort']} is reserved"))
    traffic = manifest.get("spec", {}).get("traffic")
    if traffic:
        total = sum(t.get("percent", 0) for t in traffic)
        if total != 100:
            errors.append(("spec.traffic", f"traffic targets sum to {total}, want 100"))
        tags = [t["tag"] for t in traffic if t.get("tag")]
        if len(tags) != len(set(tags)):
            errors.append(("spec.traffic", "tags must be unique"))
    return errors
