"""Kubernetes names for Nimbus objects, derived from tenant and function slugs.

Namespaces and labels follow DNS-1123; Knative Service names must be DNS-1035 labels (start with a
letter) short enough that ``<service>-NNNNN-code`` still fits in 63 characters.
"""

from __future__ import annotations

import hashlib
import re

MAX_LABEL = 63
# "<service>-00003-secrets" must fit in 63 characters: keep service names to 40, as the model does.
MAX_SERVICE = 40

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_TENANT = "nimbus.dev/tenant"
LABEL_FUNCTION = "nimbus.dev/function"
LABEL_FUNCTION_ID = "nimbus.dev/function-id"
LABEL_REVISION = "nimbus.dev/revision"
LABEL_ISOLATION = "nimbus.dev/isolation"
KNATIVE_SERVICE_LABEL = "serving.knative.dev/service"
KNATIVE_REVISION_LABEL = "serving.knative.dev/revision"
USER_CONTAINER = "user-container"


def dns_label(value: str, *, max_length: int = MAX_LABEL, letter_first: bool = True) -> str:
    """Squeeze ``value`` into a DNS label; a shortened name keeps a hash of the original so two
    long names that share a prefix stay distinct."""
    name = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if letter_first and not name[:1].isalpha():
        name = "x-" + name if name else "x"
    if len(name) > max_length:
        digest = hashlib.sha256(value.encode()).hexdigest()[:8]
        name = name[: max_length - 9].rstrip("-") + "-" + digest
    return name


def namespace(tenant: str, prefix: str) -> str:
    return dns_label(prefix + tenant, letter_first=False)


def service(function: str) -> str:
    return dns_label(function, max_length=MAX_SERVICE)


def revision(function: str, number: int) -> str:
    """Knative's own scheme (``hello-00003``): a chosen revision name must start with ``<service>-``."""
    return f"{service(function)}-{number:05d}"


def revision_number(function: str, revision_name: str | None) -> int | None:
    """The revision number in a Knative revision name of this function, or None."""
    if not revision_name:
        return None
    match = re.fullmatch(re.escape(service(function)) + r"-(\d+)", revision_name)
    return int(match.group(1)) if match else None


def code_config_map(function: str, number: int) -> str:
    # One ConfigMap per revision: older revisions keep serving their own code during a traffic split.
    return f"{revision(function, number)}-code"


def secret(function: str, number: int) -> str:
    return f"{revision(function, number)}-secrets"


def config_map_key(path: str) -> str:
    """A ConfigMap key for a source path (keys allow only ``[-._a-zA-Z0-9]``, so no "/")."""
    key = re.sub(r"[^-._a-zA-Z0-9]", "_", path.replace("/", "__"))
    return key if key not in {".", ".."} else key.replace(".", "_")
