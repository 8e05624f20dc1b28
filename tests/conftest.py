"""Shared fixtures: users, a tenant with a member of each role, another tenant, functions."""

import os

os.environ.setdefault("NIMBUS_TESTING", "1")

import pytest
from django.contrib.auth import get_user_model

from tenancy.models import Role

User = get_user_model()


def make_user(username: str, **extra):
    return User.objects.create_user(username=username, password="pw-" + username, email=f"{username}@example.com",
                                    **extra)


@pytest.fixture
def operator(db):
    return User.objects.create_superuser("operator", "operator@example.com", "pw-operator")


@pytest.fixture
def members(db, operator):
    """{"owner": user, "admin": user, "developer": user, "viewer": user} of tenant "acme"."""
    from tenancy.services import tenant_create, tenant_member_add

    users = {role: make_user(f"acme-{role}") for role in Role.values}
    tenant = tenant_create(acting_user=users["owner"], slug="acme", name="Acme")
    for role in ("admin", "developer", "viewer"):
        tenant_member_add(acting_user=users["owner"], tenant=tenant, username=users[role].username, role=role)
    return users


@pytest.fixture
def tenant(members):
    from tenancy.models import Tenant

    return Tenant.objects.get(slug="acme")


@pytest.fixture
def outsider(db):
    """The owner of another tenant, "globex", who must never reach acme's objects."""
    from tenancy.services import tenant_create

    user = make_user("globex-owner")
    tenant_create(acting_user=user, slug="globex", name="Globex")
    return user


@pytest.fixture
def function(tenant, members):
    from functions.services import function_create

    return function_create(acting_user=members["developer"], tenant=tenant, name="hello", starter="hello")


def pytest_unconfigure(config):
    """Remove the data folder tests/settings.py made for this run (databases, revisions, keys), so a
    run leaves nothing in /tmp; a folder given in NIMBUS_DATA_DIR is the caller's and stays."""
    import shutil

    if os.environ.get("NIMBUS_TEST_DATA_DIR_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["NIMBUS_DATA_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_leftover_local_engine():
    """A test that reached the real local engine through get_engine() leaves no instances behind."""
    yield
    import functions.engines as engines

    current = engines._engine
    if current is not None and type(current).__module__ == "functions.engines.local.engine":
        current.shutdown()
        engines.set_engine(None)


@pytest.fixture
def shared_tmp(settings):
    """A folder the sandboxes' uids can read (pytest's tmp_path lives under a private folder)."""
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="shared-", dir=settings.NIMBUS_DATA_DIR))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
