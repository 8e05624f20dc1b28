"""Fixtures for the REST API tests: API clients per user or token, a recording engine double, and a
"world" in tenant acme with a deployed function and one of everything the endpoints act on."""

from types import SimpleNamespace

import pytest
from django.db import transaction
from django.utils import timezone
from rest_framework.test import APIClient

from functions.engines import set_engine
from functions.models import Invocation, InvocationLog
from tenancy.models import Role
from tests.conftest import make_user
from tests.doubles import RecordingEngine

SECRET_VALUE = "s3cr3t-Value-7f2c9a"


@pytest.fixture
def engine():
    recording = RecordingEngine()
    set_engine(recording)
    yield recording
    set_engine(None)


@pytest.fixture
def client_for(db):
    """client_for(user) → an APIClient logged in with a session (CSRF as a browser would need it is
    covered separately); client_for(None) → anonymous; client_for(token=plaintext) → Bearer token."""

    def build(user=None, *, token=None):
        client = APIClient()
        if token is not None:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        elif user is not None:
            client.force_login(user)
        return client

    return build


@pytest.fixture
def make_token(db):
    from tenancy.services import token_create

    def build(user, tenant, scopes, name="test"):
        return token_create(acting_user=user, tenant=tenant, name=name, scopes=list(scopes))[1]

    return build


@pytest.fixture
def deployed(function, members, engine, django_capture_on_commit_callbacks):
    """The "hello" function with revision 1 deployed, ready and taking all traffic."""
    from functions.services import function_deploy

    with django_capture_on_commit_callbacks(execute=True):
        function_deploy(acting_user=members["developer"], function=function, message="first")
    function.refresh_from_db()
    return function


@pytest.fixture
def world(deployed, tenant, members, outsider, make_token):
    """Everything the permission matrix acts on, in tenant acme."""
    from functions.services import function_env_set, function_file_save, function_secret_set, function_share

    owner = members["owner"]
    version = function_file_save(acting_user=owner, function=deployed, path="extra.py", content="X = 1\n",
                                 base_version=deployed.source_version)
    function_env_set(acting_user=owner, function=deployed, name="GREETING", value="hi")
    function_secret_set(acting_user=owner, function=deployed, name="API_KEY", value=SECRET_VALUE)
    friend = make_user("friend")
    function_share(acting_user=owner, function=deployed, username="friend", level="view")
    make_user("spare")
    owner_token = make_token(owner, tenant, ["read"], name="owner-ci")
    return SimpleNamespace(
        tenant=tenant, function=deployed, members=members, outsider=outsider, friend=friend,
        version=version, owner_token_prefix=owner_token.split("_")[1],
    )


@pytest.fixture(scope="module")
def shared_world(django_db_setup, django_db_blocker):
    """The same world as ``world``, built once per test module inside a transaction rolled back at
    the end. Each test runs in a savepoint within it (pytest-django's usual per-test rollback), so
    every test still starts from exactly this state; for the many read-mostly matrix tests."""
    from functions.services import (
        function_create,
        function_deploy,
        function_env_set,
        function_file_save,
        function_secret_set,
        function_share,
        run_deploy,
    )
    from tenancy.services import tenant_create, tenant_member_add, token_create

    engine = RecordingEngine()
    set_engine(engine)
    with django_db_blocker.unblock(), transaction.atomic():
        members = {role: make_user(f"acme-{role}") for role in Role.values}
        tenant = tenant_create(acting_user=members["owner"], slug="acme", name="Acme")
        for role in ("admin", "developer", "viewer"):
            tenant_member_add(acting_user=members["owner"], tenant=tenant, username=members[role].username,
                              role=role)
        outsider = make_user("globex-owner")
        tenant_create(acting_user=outsider, slug="globex", name="Globex")
        function = function_create(acting_user=members["developer"], tenant=tenant, name="hello")
        revision = function_deploy(acting_user=members["developer"], function=function, message="first")
        # The engine's part runs on commit, which this transaction never reaches: run it here.
        run_deploy(revision.pk)
        function.refresh_from_db()
        version = function_file_save(acting_user=members["owner"], function=function, path="extra.py",
                                     content="X = 1\n", base_version=function.source_version)
        function_env_set(acting_user=members["owner"], function=function, name="GREETING", value="hi")
        function_secret_set(acting_user=members["owner"], function=function, name="API_KEY", value=SECRET_VALUE)
        friend = make_user("friend")
        function_share(acting_user=members["owner"], function=function, username="friend", level="view")
        make_user("spare")
        _, owner_token = token_create(acting_user=members["owner"], tenant=tenant, name="owner-ci", scopes=["read"])
        # Invocation records are the engine's to write; here they are test data.
        invocation = Invocation.objects.create(function=function, revision=function.revisions.get(number=1),
                                               started_at=timezone.now(), status="success", http_status=200)
        InvocationLog.objects.create(invocation=invocation, time=timezone.now(), message="hello from the handler")
        yield SimpleNamespace(tenant=tenant, function=function, members=members, outsider=outsider, friend=friend,
                              version=version, owner_token_prefix=owner_token.split("_")[1],
                              invocation_id=invocation.pk)
        transaction.set_rollback(True)
    set_engine(None)
