"""Schemathesis over the whole API, in process: every operation of the published OpenAPI schema is
called with generated input (valid and invalid) by a tenant owner whose API token has every scope,
against real objects (the tenant, function, trigger, sequence… named in the paths exist), and
every answer must be documented: no 5xx, a status code the schema lists, a body of the schema's
shape and content type, and invalid input refused with a 4xx.

Each example runs in a savepoint rolled back afterwards, so every call starts from the same world;
the world itself is rolled back at the end of the module. Generation is derandomized: the same
examples every run."""

import os
import uuid
from collections import Counter
from types import SimpleNamespace

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, transaction
from django.utils import timezone
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from functions.engines import set_engine
from tests.conftest import make_user
from tests.doubles import RecordingEngine

pytestmark = pytest.mark.slow

# Enough examples per operation to try each parameter and body field both ways, few enough that
# the module runs in a few minutes on two cores.
EXAMPLES_PER_OPERATION = 70

INVOCATION_ID = uuid.UUID("00000000-0000-4000-8000-00000000000a")
DELIVERY_ID = uuid.UUID("00000000-0000-4000-8000-00000000000d")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

# Every path parameter names a real object of the world below.
PATH_PARAMETERS = {
    "tenant_slug": "acme",
    "function_name": "hello",
    "path": "handler.py",
    "number": 1,
    "name": "GREETING",
    "username": "acme-viewer",
    "prefix": "f022f022",
    "invocation_id": str(INVOCATION_ID),
    "delivery_id": str(DELIVERY_ID),
    "trigger_name": "nightly",
    "sequence_name": "pipeline",
    "trace_id": TRACE_ID,
}

# The owner's token, with every scope; its prefix is a path parameter above.
TOKEN = "nmb_f022f022_fuzz-every-scope-0123456789abcdefghijklmnopqrstuv"

app = get_wsgi_application()
schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", app)
# Given to schemathesis (not set on the generated case afterwards), so that it knows these values
# are valid and does not count them when it sends deliberately invalid input.
schema.config.update(parameters=PATH_PARAMETERS, headers={"Authorization": f"Bearer {TOKEN}"})

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
calls: Counter = Counter()
statuses: Counter = Counter()


@pytest.fixture(scope="module")
def fuzz_world(django_db_setup, django_db_blocker, request):
    """The tenant acme with one of everything an operation acts on, built once for the module."""
    from functions.models import Delivery, Invocation, InvocationLog
    from functions.services import (
        function_create,
        function_deploy,
        function_env_set,
        function_secret_set,
        function_share,
        run_deploy,
    )
    from functions.services_triggers import sequence_create, trigger_create
    from observability.models import Span
    from tenancy.models import ApiToken
    from tenancy.services import hash_token, tenant_create, tenant_member_add, token_create

    set_engine(RecordingEngine())
    # As Django's test client does: the requests share the test's connection and its transaction.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        with django_db_blocker.unblock(), transaction.atomic():
            owner = make_user("acme-owner")
            tenant = tenant_create(acting_user=owner, slug="acme", name="Acme")
            for role in ("admin", "developer", "viewer"):
                user = make_user(f"acme-{role}")
                tenant_member_add(acting_user=owner, tenant=tenant, username=user.username, role=role)
            make_user("friend")
            function = function_create(acting_user=owner, tenant=tenant, name="hello")
            function_create(acting_user=owner, tenant=tenant, name="world")
            run_deploy(function_deploy(acting_user=owner, function=function, message="first").pk)
            function.refresh_from_db()
            function_env_set(acting_user=owner, function=function, name="GREETING", value="hi")
            function_secret_set(acting_user=owner, function=function, name="API_KEY", value="s3cr3t")
            function_share(acting_user=owner, function=function, username="friend", level="view")
            function_share(acting_user=owner, function=function, username="acme-viewer", level="edit")
            trigger_create(acting_user=owner, function=function, name="nightly", kind="cron", schedule="0 3 * * *")
            sequence_create(acting_user=owner, tenant=tenant, name="pipeline", functions=["hello", "world"])
            token, _ = token_create(acting_user=owner, tenant=tenant, name="fuzz", scopes=list(ApiToken.Scope.values))
            ApiToken.objects.filter(pk=token.pk).update(prefix=PATH_PARAMETERS["prefix"], token_hash=hash_token(TOKEN))
            now = timezone.now()
            invocation = Invocation.objects.create(id=INVOCATION_ID, function=function,
                                                   revision=function.revisions.get(number=1), started_at=now,
                                                   status="success", http_status=200, trace_id=TRACE_ID)
            InvocationLog.objects.create(invocation=invocation, time=now, message="hello from the handler")
            Span.objects.create(tenant=tenant, function=function, invocation_id=INVOCATION_ID, trace_id=TRACE_ID,
                                span_id="00f067aa0ba902b7", name="handler", kind="handler", start=now, duration_ms=3)
            Delivery.objects.create(id=DELIVERY_ID, function=function, source=Delivery.Source.ASYNC,
                                    state=Delivery.State.DEAD, attempts=3, finished_at=now, last_error="boom")
            yield SimpleNamespace(tenant=tenant, function=function)
            transaction.set_rollback(True)
    finally:  # even when building the world failed: the rest of the run needs them back
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
        set_engine(None)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and calls:
        reporter.write_line(f"schemathesis: {len(calls)} operations, {sum(calls.values())} calls")
        if os.environ.get("NIMBUS_FUZZ_STATUSES"):  # what each operation answered, to see what the fuzzing reaches
            for (label, code), count in sorted(statuses.items()):
                reporter.write_line(f"  {label}  {code}  x{count}")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_keeps_its_contract(case, fuzz_world, db):
    with transaction.atomic():
        response = case.call_and_validate(checks=CHECKS)
        transaction.set_rollback(True)
    calls[case.operation.label] += 1
    statuses[(case.operation.label, response.status_code)] += 1


def test_the_calls_reached_real_code():
    """Every operation answered something else than 401 and 404 at least once: the token and the
    objects of the world work, so the examples above tested the operations, not only the refusals."""
    operations = {result.ok().label for result in schema.get_all_operations()}
    if set(calls) != operations:
        pytest.skip("meaningful after every operation of the module ran")
    only_refused = sorted(label for label in operations
                          if all(code in (401, 404) for (seen, code) in statuses if seen == label))
    assert only_refused == []
