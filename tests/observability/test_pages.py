"""The Monitor tab, logs search, trace page, tenant overview and /metrics as users see them:
who may see what (another tenant's is 404), the CSP of the Monitor page, filters and pagination."""

import uuid
from datetime import timedelta

import pytest
from django.test import override_settings

from functions.models import Invocation, InvocationLog
from observability import ingest

pytestmark = pytest.mark.django_db


def login(client, user):
    client.force_login(user)
    return client


def test_monitor_tab_for_each_role_and_404_for_others(client, members, outsider, function, record, minute):
    ingest.invocations_written([record(minute, 12), record(minute, 900, status="error")])
    InvocationLog.objects.create(invocation=Invocation.objects.filter(function=function).first(), time=minute,
                                 level="INFO", message="a line worth seeing")
    for role in ("owner", "viewer"):
        response = login(client, members[role]).get(f"/t/acme/f/{function.name}/monitor/?range=15m")
        assert response.status_code == 200
        body = response.content.decode()
        assert 'data-metric="invocations">2<' in body and 'data-metric="errors">1<' in body
        assert "vendor/chartjs/chart.umd" in body and 'id="metric-series"' in body
        assert "/t/acme/traces/" in body  # recent invocations and traces link to their traces
        assert 'data-span-kind="gateway"' in body  # the latest trace's waterfall
        assert response["Content-Security-Policy"] == "frame-src 'none'; child-src 'none'"
        assert "<iframe" not in body
        assert "a line worth seeing" in body
    assert login(client, outsider).get(f"/t/acme/f/{function.name}/monitor/").status_code == 404
    client.logout()
    assert client.get(f"/t/acme/f/{function.name}/monitor/").status_code == 302


@override_settings(GRAFANA_URL="https://grafana.example.com", JAEGER_URL="http://127.0.0.1:16686",
                   KIBANA_URL="https://kibana.example.com", KIBANA_DATA_VIEW_ID="nimbus-logs")
def test_monitor_embeds_configured_panels_and_frames_only_them(client, members, function):
    response = login(client, members["viewer"]).get(f"/t/acme/f/{function.name}/monitor/?range=6h")
    csp = response["Content-Security-Policy"]
    assert csp == ("frame-src http://127.0.0.1:16686 https://grafana.example.com https://kibana.example.com; "
                   "child-src http://127.0.0.1:16686 https://grafana.example.com https://kibana.example.com")
    body = response.content.decode()
    assert body.count("<iframe") == 4  # two Grafana panels, Jaeger, Kibana
    assert "https://grafana.example.com/d-solo/nimbus-function/nimbus-function?orgId=1&amp;panelId=1" in body
    assert "from=now-6h" in body
    assert "uiEmbed=v0" in body and "app/discover#/?embed=true" in body


def test_tenant_overview(client, members, outsider, function, record, minute):
    ingest.invocations_written([record(minute, 12), record(minute, 15)])
    response = login(client, members["viewer"]).get("/t/acme/monitor/?range=24h")
    assert response.status_code == 200
    assert 'data-metric="invocations">2<' in response.content.decode()
    assert f'href="/t/acme/f/{function.name}/monitor/?range=24h"' in response.content.decode()
    assert login(client, outsider).get("/t/acme/monitor/").status_code == 404


def test_trace_page_waterfall(client, members, outsider, function, record, minute):
    row = record(minute, 50, cold_start=True, init_ms=20, queue_ms=25, instance="inst-1")
    ingest.invocations_written([row], {str(row.id): {"gateway_span": "aaaaaaaaaaaaaaaa",
                                                     "handler_span": "bbbbbbbbbbbbbbbb", "total_ms": 80}})
    response = login(client, members["viewer"]).get(f"/t/acme/traces/{row.trace_id}/")
    assert response.status_code == 200
    body = response.content.decode()
    assert [kind for kind in ("gateway", "queue", "cold_start", "handler") if f'data-span-kind="{kind}"' in body] == \
        ["gateway", "queue", "cold_start", "handler"]
    assert body.index('data-span-kind="queue"') < body.index('data-span-kind="cold_start"') < \
        body.index('data-span-kind="handler"')
    assert f"?invocation={row.id}" in body
    assert login(client, outsider).get(f"/t/acme/traces/{row.trace_id}/").status_code == 404
    assert login(client, outsider).get(f"/t/globex/traces/{row.trace_id}/").status_code == 404
    assert login(client, members["viewer"]).get(f"/t/acme/traces/{uuid.uuid4().hex}/").status_code == 404


def test_log_search_filters_and_pages(client, members, outsider, function, record, minute):
    first = record(minute - timedelta(minutes=10), 5)
    second = record(minute, 5)
    lines = [InvocationLog(invocation=first, time=first.started_at, level="INFO", message="hello world"),
             InvocationLog(invocation=first, time=first.started_at, level="ERROR", message="boom"),
             InvocationLog(invocation=second, time=second.started_at, level="WARNING", message="careful world")]
    lines += [InvocationLog(invocation=second, time=second.started_at + timedelta(milliseconds=i), level="INFO",
                            message=f"line {i}") for i in range(120)]
    InvocationLog.objects.bulk_create(lines)
    c = login(client, members["viewer"])
    url = f"/t/acme/f/{function.name}/logs/"

    def messages(query):
        response = c.get(url + query)
        assert response.status_code == 200
        return [line.message for line in response.context["page"].object_list]

    assert messages("?q=world") == ["careful world", "hello world"]
    assert messages("?level=WARNING") == ["careful world", "boom"]
    assert messages(f"?invocation={first.id}") == ["boom", "hello world"]  # newest first, then by id
    since = (minute - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
    assert "boom" not in messages(f"?since={since}")
    assert len(messages("")) == 100 and len(messages("?page=2")) == 23
    assert messages("?revision=7") == []
    assert c.get(url + "?invocation=not-a-uuid").status_code == 200  # ignored, not a 500
    assert login(client, outsider).get(url).status_code == 404


@pytest.mark.parametrize("query", ["?since=2026-01-01T00:00:00%2B23:10", "?until=2026-01-01T00:00:00-20:00",
                                   "?since=0001-01-01T00:00:00%2B05:00"])
def test_log_search_page_takes_any_iso_offset_without_a_500(query, client, members, function, record, minute):
    """PostgreSQL holds offsets up to ±15:59 only: the page compares in UTC, and a moment with no UTC
    equivalent is a form error, not a server error."""
    record(minute, 1)
    response = login(client, members["viewer"]).get(f"/t/acme/f/{function.name}/logs/" + query)
    assert response.status_code == 200


def test_metrics_endpoint_and_token(client, function, record, minute, settings):
    ingest.invocations_written([record(minute, 12, revision=None)])
    settings.DEBUG = True  # a development install: open without a token (tests/observability/test_metrics_access.py)
    body = client.get("/metrics").content.decode()
    assert 'nimbus_function_invocations_total{' in body
    assert 'tenant="acme"' in body and 'function="hello"' in body and 'namespace="nimbus-acme"' in body
    settings.DEBUG = False
    settings.NIMBUS_METRICS_TOKEN = "s3cret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200


def test_monitor_queries_do_not_grow_with_invocations(client, members, function, record, minute):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    c = login(client, members["viewer"])
    ingest.invocations_written([record(minute, 5)])
    with CaptureQueriesContext(connection) as few:
        assert c.get(f"/t/acme/f/{function.name}/monitor/?range=24h").status_code == 200
    ingest.invocations_written([record(minute - timedelta(minutes=i), 5 + i) for i in range(40)])
    with CaptureQueriesContext(connection) as many:
        assert c.get(f"/t/acme/f/{function.name}/monitor/?range=24h").status_code == 200
    assert len(many.captured_queries) == len(few.captured_queries)
    assert not any("functions_invocation" in q["sql"] and "COUNT" in q["sql"].upper()
                   for q in many.captured_queries)  # charts come from rollups, not a scan of the records
