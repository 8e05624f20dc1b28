"""Spans come from functions (their names, attributes, ids, times) and are stored in batches that
hold many tenants' invocations: what the database cannot store is cleaned (NUL, lone surrogates,
NaN in JSON, ids that are not hex), and a span the database still refuses costs only itself."""

import json
import math
from datetime import UTC, datetime

import pytest

from functions.models import Function
from functions.services import function_create
from observability import ingest
from observability.models import MinuteRollup, Span
from tenancy.models import Tenant

pytestmark = pytest.mark.django_db(transaction=True)

USER_SPANS = [
    {"name": "lookup\x00users", "span_id": "0123456789abcdef", "start": datetime.now(UTC).isoformat(),
     "duration_ms": 2.5, "attributes": {"table\x00": "users\ud800", "\udfffkey": 1, "ratio": float("nan"),
                                        "big": 10 ** 30, "nested": {"a": ["\x00"]}, "none": None}},
    {"name": "\ud83d broken emoji", "span_id": "not\x00hex-at-all", "parent_id": "\x00" * 16,
     "start": "yesterday", "duration_ms": "abc", "error": "failed\x00here", "attributes": "not a dict"},
    {"name": "fine", "duration_ms": float("inf"),
     "start": datetime.now(UTC).replace(tzinfo=None).isoformat() + "+23:59"},
    "not a span",
]


@pytest.fixture
def other_function(outsider):
    return function_create(acting_user=outsider, tenant=Tenant.objects.get(slug="globex"), name="other",
                           starter="hello")


def batch(function, other_function, record, minute, bad_spans):
    rows, traces = [], {}
    for index in range(6):
        row = record(minute, 10 + index, function=function if index % 2 else other_function, instance="i-1")
        rows.append(row)
        spans = bad_spans if index == 3 else [{"name": f"step {index}", "duration_ms": 1}]
        traces[str(row.id)] = {"gateway_span": "", "spans_json": json.dumps(spans)}
    return rows, traces


def test_unclean_spans_are_stored_cleaned_with_the_rest_of_the_batch(function, other_function, record, minute):
    rows, traces = batch(function, other_function, record, minute, USER_SPANS)
    ingest.invocations_written(rows, traces)
    # Every invocation's trace is there: gateway, handler and its user spans.
    for row in rows:
        kinds = sorted(Span.objects.filter(invocation_id=row.id).values_list("kind", flat=True))
        assert kinds.count("gateway") == 1 and kinds.count("handler") == 1, (row.id, kinds)
    noisy = rows[3]
    users = {s.name: s for s in Span.objects.filter(invocation_id=noisy.id, kind="user")}
    assert set(users) == {"lookup\ufffdusers", "\ufffd broken emoji", "fine"}
    first = users["lookup\ufffdusers"]
    assert first.span_id == "0123456789abcdef"
    assert first.attributes["table\ufffd"] == "users\ufffd" and first.attributes["\ufffdkey"] == 1
    assert first.attributes["ratio"] == "nan" and first.attributes["big"] == str(10 ** 30)
    assert first.attributes["none"] is None and "\x00" not in first.attributes["nested"]
    second = users["\ufffd broken emoji"]
    assert len(second.span_id) == 16 and set(second.span_id) <= set("0123456789abcdef")
    handler = Span.objects.get(invocation_id=noisy.id, kind="handler")
    assert second.parent_id == handler.span_id and second.duration_ms == 0 and second.attributes == {}
    assert second.error == "failed\ufffdhere"
    assert users["fine"].duration_ms == 0 and not math.isinf(users["fine"].duration_ms)
    # And the counts of the batch.
    assert sum(MinuteRollup.objects.values_list("invocations", flat=True)) == 6


def test_a_span_the_database_refuses_costs_only_itself(function, other_function, record, minute, monkeypatch):
    rows, traces = batch(function, other_function, record, minute, [{"name": "mine"}])
    refused_row = rows[3]
    spans_for = ingest.spans_for

    def with_a_refused_span(row, *args, **kwargs):
        spans = spans_for(row, *args, **kwargs)
        if row.id == refused_row.id:
            # A span whose function is gone (deleted between the batch's look-up and its write).
            gone = Function.objects.order_by("-pk").values_list("pk", flat=True).first() + 1000
            spans.append(Span(tenant_id=row.function.tenant_id, function_id=gone, invocation_id=row.id,
                              trace_id=row.trace_id, span_id="fedcba9876543210", name="orphan", kind="user",
                              start=row.started_at))
        return spans

    monkeypatch.setattr(ingest, "spans_for", with_a_refused_span)
    ingest.invocations_written(rows, traces)
    assert not Span.objects.filter(name="orphan").exists()
    for row in rows:  # everyone else's spans, the refused span's own invocation included
        assert Span.objects.filter(invocation_id=row.id, kind="handler").exists(), row.id
    assert Span.objects.filter(invocation_id=refused_row.id, name="mine").exists()
    assert sum(MinuteRollup.objects.values_list("invocations", flat=True)) == 6


def test_spans_that_cannot_be_read_cost_only_their_invocation(function, other_function, record, minute,
                                                              monkeypatch):
    rows, traces = batch(function, other_function, record, minute, [{"name": "mine"}])
    spans_for = ingest.spans_for

    def breaks_once(row, *args, **kwargs):
        if row.id == rows[2].id:
            raise ValueError("unreadable")
        return spans_for(row, *args, **kwargs)

    monkeypatch.setattr(ingest, "spans_for", breaks_once)
    ingest.invocations_written(rows, traces)
    assert not Span.objects.filter(invocation_id=rows[2].id).exists()
    assert all(Span.objects.filter(invocation_id=row.id).exists() for row in rows if row is not rows[2])
    assert sum(MinuteRollup.objects.values_list("invocations", flat=True)) == 6
