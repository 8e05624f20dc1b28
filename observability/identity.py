"""How a function is named to the operators' tools: the Kubernetes namespace and Knative service
the Knative engine would give it, so one label set (and one dashboard) fits both engines."""

from django.conf import settings

from functions.engines.knative import names


def namespace_for(tenant_slug: str) -> str:
    return names.namespace(tenant_slug, settings.NIMBUS_KNATIVE["NAMESPACE_PREFIX"])


def service_for(function_name: str) -> str:
    return names.service(function_name)


def revision_for(function_name: str, number: int) -> str:
    """Knative's revision name (``hello-00003``), the ``revision`` label of the portal's series."""
    return names.revision(function_name, number)


def trace_service_for(tenant_slug: str, function_name: str) -> str:
    """The OpenTelemetry ``service.name`` of a function's traces (unique across tenants)."""
    return f"{service_for(function_name)}.{namespace_for(tenant_slug)}"
