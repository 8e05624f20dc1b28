"""/metrics names every tenant's functions: closed without DEBUG until NIMBUS_METRICS_TOKEN is set
(403, and a deploy check warning), and then only for ``Authorization: Bearer <token>``."""

import pytest
from django.core import checks

from observability import ingest

pytestmark = pytest.mark.django_db

TENANT_DATA = 'function="hello"'


@pytest.fixture
def exposed(function, record, minute):
    ingest.invocations_written([record(minute, 12, revision=None)])


def test_without_debug_and_without_a_token_metrics_are_closed(client, exposed, settings):
    settings.DEBUG, settings.NIMBUS_METRICS_TOKEN = False, ""
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer "}, {"HTTP_AUTHORIZATION": "Bearer anything"}):
        response = client.get("/metrics", **headers)
        assert response.status_code == 403
        assert response["Content-Type"] == "application/json"
        assert response.json()["code"] == "permission_denied"
        assert "NIMBUS_METRICS_TOKEN" in response.json()["detail"]
        assert TENANT_DATA not in response.content.decode()


def test_with_a_token_only_its_bearer_reads_metrics(client, exposed, settings):
    settings.DEBUG, settings.NIMBUS_METRICS_TOKEN = False, "a-long-scrape-token"
    for authorization in (None, "Bearer", "Bearer ", "Bearer a-long-scrape-toke", "Bearer a-long-scrape-token-and-more",
                          "Basic a-long-scrape-token", "a-long-scrape-token", "Bearer \x00", "Bearer é"):
        headers = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}
        response = client.get("/metrics", **headers)
        assert response.status_code == 401, authorization
        assert response.json()["code"] == "unauthenticated"
        assert response["WWW-Authenticate"] == 'Bearer realm="metrics"'
        assert TENANT_DATA not in response.content.decode()
    for authorization in ("Bearer a-long-scrape-token", "bearer a-long-scrape-token"):
        response = client.get("/metrics", HTTP_AUTHORIZATION=authorization)
        assert response.status_code == 200
        assert TENANT_DATA in response.content.decode()


def test_debug_keeps_metrics_open_for_development(client, exposed, settings):
    settings.DEBUG, settings.NIMBUS_METRICS_TOKEN = True, ""
    assert TENANT_DATA in client.get("/metrics").content.decode()
    settings.NIMBUS_METRICS_TOKEN = "a-long-scrape-token"  # a token set is required even with DEBUG
    assert client.get("/metrics").status_code == 401


def test_deploy_check_warns_without_a_token(settings):
    settings.DEBUG, settings.NIMBUS_METRICS_TOKEN = False, ""
    found = [m for m in checks.run_checks(include_deployment_checks=True) if m.id == "observability.W001"]
    assert len(found) == 1 and found[0].level == checks.WARNING
    assert not [m for m in checks.run_checks() if m.id == "observability.W001"]  # a deploy check only
    settings.NIMBUS_METRICS_TOKEN = "a-long-scrape-token"
    assert not [m for m in checks.run_checks(include_deployment_checks=True) if m.id == "observability.W001"]
    settings.DEBUG, settings.NIMBUS_METRICS_TOKEN = True, ""
    assert not [m for m in checks.run_checks(include_deployment_checks=True) if m.id == "observability.W001"]
