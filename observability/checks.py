"""System checks of the observability settings (``manage.py check --deploy``)."""

from django.conf import settings
from django.core.checks import Tags, Warning, register


@register(Tags.security, deploy=True)
def metrics_token_check(app_configs, **kwargs):
    """/metrics lists every tenant's functions: without DEBUG it stays closed until a token is set."""
    if settings.DEBUG or getattr(settings, "NIMBUS_METRICS_TOKEN", ""):
        return []
    return [Warning(
        "NIMBUS_METRICS_TOKEN is not set, so /metrics answers 403 to everyone (Prometheus included).",
        hint="Set NIMBUS_METRICS_TOKEN to a long random value and give Prometheus the same value as its "
             "bearer token (deploy/observability/README.md).",
        id="observability.W001")]
