"""One body limit (NIMBUS_MAX_BODY_BYTES) everywhere: Django's own limit derives from it, so the
largest legal draft saves through the API however its JSON is escaped; a body just over it answers
413 in the API's error shape naming the limit in the API, pages, the event ingress and the gateway
(both engines), and a body under it passes through each."""

import json

import pytest
from django.conf import settings
from django.test import Client
from rest_framework.test import APIClient

from functions.engines.knative.engine import KnativeEngine
from tests.engines.local.conftest import (  # noqa: F401 - fixtures reused as they are
    _stop_engines,
    deploy,
    gateway,
    make_engine,
    needs_bwrap,
)

FILES = "/api/v1/tenants/acme/functions/hello/files/"
MiB = 1024 * 1024


def too_large(limit: int) -> dict:
    return {"code": "too_large", "detail": f"The body exceeds {limit:,} bytes.", "limit": limit}


def csv_rows(size: int) -> str:
    """Text of ``size`` bytes whose JSON string is half as long again (quotes and newlines escape)."""
    row = '"a","b","c"\n'
    return (row * (size // len(row) + 1))[:size]


@pytest.fixture
def developer_api(members):
    client = APIClient()
    client.force_login(members["developer"])
    return client


@pytest.fixture
def publish_token(members, tenant):
    from tenancy.services import token_create

    return token_create(acting_user=members["developer"], tenant=tenant, name="events", scopes=["publish"])[1]


def post_event(body: bytes, token: str):
    return Client().post("/events/acme/", data=body, content_type="application/cloudevents+json",
                         HTTP_AUTHORIZATION=f"Bearer {token}")


def structured_event(size: int) -> bytes:
    """A structured CloudEvent whose JSON is exactly ``size`` bytes."""
    envelope = {"specversion": "1.0", "type": "com.example.big", "source": "/test", "id": "big-1", "data": ""}
    overhead = len(json.dumps(envelope).encode())
    envelope["data"] = "x" * (size - overhead)
    body = json.dumps(envelope).encode()
    assert len(body) == size
    return body


# ---- the settings agree -------------------------------------------------------------------------------------

def test_djangos_limit_is_the_portals_and_holds_the_largest_draft():
    assert settings.NIMBUS_MAX_BODY_BYTES == 6 * MiB
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE == settings.NIMBUS_MAX_BODY_BYTES
    assert 2 * settings.NIMBUS_MAX_SOURCE_BYTES <= settings.NIMBUS_MAX_BODY_BYTES
    # Both engines take the same number, unless given their own.
    assert KnativeEngine(values=dict(settings.NIMBUS_KNATIVE)).max_body_bytes == settings.NIMBUS_MAX_BODY_BYTES
    assert "MAX_BODY_BYTES" not in settings.NIMBUS_LOCAL


# ---- the API ------------------------------------------------------------------------------------------------

def test_a_draft_of_1_9_mb_saves_through_put_files(developer_api, function):
    files = {"handler.py": "def handle(event, context):\n    return 'ok'\n"}
    files.update({f"data/part-{n}.csv": csv_rows(475_000) for n in range(4)})
    body = json.dumps({"files": files, "base_version": function.source_version})
    assert sum(len(content.encode()) for content in files.values()) > 1_900_000
    assert len(body) > 2.5 * MiB  # over Django's default limit, which answered an HTML 400 here
    response = developer_api.generic("PUT", FILES, body, content_type="application/json")
    assert response.status_code == 200, response.content[:500]
    sizes = {f["path"]: f["size"] for f in response.json()["files"]}
    assert sizes["data/part-3.csv"] == 475_000


def test_the_largest_file_saves_through_put_files_path(developer_api, function):
    content = csv_rows(settings.NIMBUS_MAX_FILE_BYTES)
    response = developer_api.put(FILES + "data/big.csv", {"content": content, "base_version": function.source_version},
                                 format="json")
    assert response.status_code == 200, response.content[:500]


def test_api_body_just_over_the_limit_is_413_naming_it(developer_api, function):
    limit = settings.NIMBUS_MAX_BODY_BYTES
    over = json.dumps({"content": "", "base_version": 1, "pad": "x" * limit})
    response = developer_api.generic("PUT", FILES + "handler.py", over, content_type="application/json")
    assert response.status_code == 413
    assert response["Content-Type"] == "application/json"
    assert response.json() == too_large(limit)


def test_api_body_at_the_limit_reaches_the_service(developer_api, function):
    limit = settings.NIMBUS_MAX_BODY_BYTES
    files = {"handler.py": "x" * (limit - 100)}
    body = json.dumps({"files": files, "base_version": function.source_version})
    body = body.replace('"handler.py"', '"handler.py"' + " " * (limit - len(body)), 1)
    assert len(body) == limit
    response = developer_api.generic("PUT", FILES, body, content_type="application/json")
    # Past the body limit: the draft's own limit speaks.
    assert response.status_code == 400 and response.json()["code"] == "invalid_source"


def test_djangos_own_refusal_becomes_the_same_413(developer_api, function, settings):
    # Should Django's limit ever be the smaller (configured apart), its refusal still answers in kind.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = developer_api.generic("PUT", FILES + "handler.py",
                                     json.dumps({"content": "x" * 2000, "base_version": 1}),
                                     content_type="application/json")
    assert response.status_code == 413
    assert response.json() == too_large(settings.NIMBUS_MAX_BODY_BYTES)


def test_a_page_form_over_the_limit_is_413_not_an_html_400(members, tenant):
    browser = Client()
    browser.force_login(members["developer"])
    response = browser.post("/t/acme/tokens/", {"name": "x" * (settings.NIMBUS_MAX_BODY_BYTES + 1)})
    assert response.status_code == 413
    assert response.json() == too_large(settings.NIMBUS_MAX_BODY_BYTES)


# ---- the event ingress ----------------------------------------------------------------------------------------

def test_ingress_body_just_over_the_limit_is_413_naming_it(db, publish_token):
    limit = settings.NIMBUS_MAX_BODY_BYTES
    response = post_event(structured_event(limit + 1), publish_token)
    assert response.status_code == 413
    assert response.json() == too_large(limit)


def test_ingress_body_at_the_limit_is_accepted(db, publish_token):
    response = post_event(structured_event(settings.NIMBUS_MAX_BODY_BYTES), publish_token)
    assert response.status_code == 202, response.content[:300]
    assert response.json()["accepted"] == 1


# ---- one setting moves every limit ------------------------------------------------------------------------------

@needs_bwrap
@pytest.mark.django_db(transaction=True)
def test_one_setting_moves_the_api_ingress_and_gateway(settings, make_engine, deploy, gateway, members, tenant):
    from tenancy.services import token_create

    limit = settings.NIMBUS_MAX_BODY_BYTES = 200_000
    make_engine()  # no limit of its own: the portal's
    deploy("echo", {"handler.py": "def handle(event, context):\n    return event.body\n"})
    _, publish = token_create(acting_user=members["developer"], tenant=tenant, name="events", scopes=["publish"])

    over = gateway.post("/fn/acme/echo/", b"x" * (limit + 1))
    assert over.status == 413 and over.json() == too_large(limit)
    under = gateway.post("/fn/acme/echo/", b"y" * limit)
    assert under.status == 200 and under.body == b"y" * limit

    assert post_event(structured_event(limit + 1), publish).json() == too_large(limit)
    assert post_event(structured_event(limit), publish).status_code == 202

    api = APIClient()
    api.force_login(members["developer"])
    assert api.post("/api/v1/tenants/acme/functions/", {"name": "big", "description": "x" * limit},
                    format="json").json() == too_large(limit)
    assert KnativeEngine(values=dict(settings.NIMBUS_KNATIVE)).max_body_bytes == limit
