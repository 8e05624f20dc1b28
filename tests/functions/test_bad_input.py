"""Bad input is a 4xx in the project's JSON error shape, never a 500 and never silently changed:
text PostgreSQL cannot store (NUL, lone surrogates), archives that lie, JSON nested too deep.
SQLite stores a NUL where PostgreSQL refuses it, so these matter most on PostgreSQL; each test
fails on both without its fix (a 500, or a draft that took the bad text)."""

import io
import json
import struct
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.test import APIClient

from functions.models import Function, SourceFile
from functions.services import function_file_save, function_source_replace
from portal.errors import InvalidSource
from tenancy.services import token_create

pytestmark = pytest.mark.django_db

UPLOAD = "/ide/acme/hello/upload/"
API_FILES = "/api/v1/tenants/acme/functions/hello/files/"


def files_of():
    return dict(SourceFile.objects.filter(function__name="hello").values_list("path", "content"))


def version_of(function):
    return Function.objects.get(pk=function.pk).source_version


def upload(user, name, data):
    client = Client()
    client.force_login(user)
    return client.post(UPLOAD, {"base_version": 1, "files": SimpleUploadedFile(name, data)})


def assert_refusal(response, status, code, *words):
    """The project's error shape: {"code", "detail", "field"?, "errors"?}, naming the problem."""
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- file content the database cannot store ------------------------------------------------------

@pytest.mark.parametrize("content, words", [
    ("def handle(e, c):\n    return 'a\x00b'\n", ["'handler.py'", "NUL", "line 2"]),
    ("x = '\ud800'\n", ["'handler.py'", "surrogate", "U+D800"]),
])
def test_the_services_refuse_file_text_the_database_cannot_store(function, members, content, words):
    with pytest.raises(InvalidSource) as refused:
        function_file_save(acting_user=members["developer"], function=function, path="handler.py",
                           content=content, base_version=1)
    for word in words:
        assert word in refused.value.message
    assert refused.value.field == "files"
    with pytest.raises(InvalidSource):
        function_source_replace(acting_user=members["developer"], function=function,
                                files={"handler.py": content}, base_version=1)
    assert version_of(function) == 1 and "\x00" not in files_of()["handler.py"]


def test_an_uploaded_text_file_with_a_nul_is_a_400(function, members):
    response = upload(members["developer"], "data.py", b"x = 1\n\x00\n")
    body = assert_refusal(response, 400, "invalid_source", "'data.py'", "NUL", "line 2")
    assert body["field"] == "files"
    assert version_of(function) == 1 and "data.py" not in files_of()


# ---- zip archives -----------------------------------------------------------------------------------

def zip_with(entries: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_a_zip_whose_size_header_lies_is_a_400(function, members):
    data = bytearray(zip_with({"handler.py": "def handle(e, c):\n    return 'zip'\n" * 20}))
    # The uncompressed size, in the central directory and the local header, claims 5 bytes.
    struct.pack_into("<I", data, data.find(b"PK\x01\x02") + 24, 5)
    struct.pack_into("<I", data, data.find(b"PK\x03\x04") + 22, 5)
    response = upload(members["developer"], "liar.zip", bytes(data))
    assert_refusal(response, 400, "invalid_source", "'handler.py'", "damaged")
    assert version_of(function) == 1


@pytest.mark.parametrize("header, offsets, value, words", [
    # Flag bit 0 ("encrypted") at offset 8 of the central and 6 of the local header.
    ("<H", (8, 6), 0x1, ["encrypted"]),
    # Compression method 99 (AES, which zipfile cannot unpack) at offsets 10 and 8.
    ("<H", (10, 8), 99, ["compressed with a method"]),
])
def test_a_zip_entry_zipfile_cannot_read_is_a_400(function, members, header, offsets, value, words):
    data = bytearray(zip_with({"handler.py": "x = 1\n"}))
    struct.pack_into(header, data, data.find(b"PK\x01\x02") + offsets[0], value)
    struct.pack_into(header, data, data.find(b"PK\x03\x04") + offsets[1], value)
    response = upload(members["developer"], "odd.zip", bytes(data))
    assert_refusal(response, 400, "invalid_source", "'handler.py'", *words)
    assert version_of(function) == 1


def test_a_nul_in_a_zip_entry_name_is_refused_not_cut(function, members):
    # zipfile cuts a name at its first NUL ("a\x00b.py" would be saved as "a"); the upload says so.
    data = zip_with({"aQb.py": "x = 1\n", "ok.py": "y = 1\n"}).replace(b"aQb.py", b"a\x00b.py")
    response = upload(members["developer"], "names.zip", data)
    body = assert_refusal(response, 400, "invalid_source", "NUL", "a\\0b.py")
    assert body["field"] == "files"
    assert version_of(function) == 1 and "a" not in files_of()


def test_a_zip_entry_name_that_is_not_utf8_is_a_400(function, members):
    data = bytearray(zip_with({"aQb.py": "x = 1\n"}).replace(b"aQb.py", b"a\xffb.py"))
    central = data.find(b"PK\x01\x02")
    flags = struct.unpack_from("<H", data, central + 8)[0]
    struct.pack_into("<H", data, central + 8, flags | 0x800)  # "the names are UTF-8"
    response = upload(members["developer"], "names.zip", bytes(data))
    assert_refusal(response, 400, "invalid_source", "not a valid zip file")
    assert version_of(function) == 1


# ---- JSON nested too deep ----------------------------------------------------------------------------

def test_api_json_nested_1000_deep_is_a_400(function, members):
    client = APIClient()
    client.force_login(members["developer"])
    body = '{"base_version": 1, "files": ' + nested(1000) + "}"
    response = client.put(API_FILES, data=body, content_type="application/json")
    assert_refusal(response, 400, "parse_error", "nested too deeply")
    assert version_of(function) == 1


@pytest.mark.parametrize("content_type", ["application/cloudevents+json", "application/cloudevents-batch+json"])
def test_events_ingress_json_nested_1000_deep_is_a_400(tenant, members, content_type):
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="events", scopes=["publish"])
    response = Client().post("/events/acme/", data=nested(1000), content_type=content_type,
                             HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert_refusal(response, 400, "invalid", "nested too deeply")


def test_events_ingress_binary_mode_json_data_nested_1000_deep_is_a_400(tenant, members):
    _, plaintext = token_create(acting_user=members["developer"], tenant=tenant, name="events", scopes=["publish"])
    headers = {"HTTP_CE_SPECVERSION": "1.0", "HTTP_CE_ID": "1", "HTTP_CE_SOURCE": "s", "HTTP_CE_TYPE": "t"}
    response = Client().post("/events/acme/", data=nested(1000), content_type="application/json",
                             HTTP_AUTHORIZATION=f"Bearer {plaintext}", **headers)
    assert_refusal(response, 400, "invalid", "nested too deeply")


def test_api_files_with_nul_or_lone_surrogates_stay_400(function, members):
    """Already refused by DRF's CharField; kept here so the whole family of edges is in one place."""
    client = APIClient()
    client.force_login(members["developer"])
    for content in ("a\x00b", "a\ud800b"):
        response = client.put(API_FILES + "handler.py", data=json.dumps({"content": content, "base_version": 1}),
                              content_type="application/json")
        assert_refusal(response, 400, "invalid")
    assert version_of(function) == 1


def test_sequence_pages_take_json_nested_1000_deep(tenant, members):
    """The Run form's input is a form error; a run's output nested that deep is shown as it came."""
    from functions.models import Delivery
    from functions.services_triggers import sequence_create, sequence_start
    from functions.triggers import queue

    for name in ("double", "increment"):
        function_create_for(members, tenant, name)
    sequence = sequence_create(acting_user=members["developer"], tenant=tenant, name="math",
                               functions=["double", "increment"])
    client = Client()
    client.force_login(members["developer"])
    page = client.post("/t/acme/sequences/math/", {"input": nested(1000)})
    assert page.status_code == 200 and "This JSON is nested too deeply." in page.content.decode()
    assert not Delivery.objects.exists()
    run = sequence_start(acting_user=members["developer"], sequence=sequence, body=b"{}")
    Delivery.objects.filter(pk=run.pk).update(state="succeeded", attempts=1, result_status=200)
    last = queue.enqueue(function=sequence.steps.get(position=1).function, source="sequence", sequence=sequence,
                         step=1, run_id=run.run_id)
    Delivery.objects.filter(pk=last.pk).update(state="succeeded", attempts=1, result_status=200,
                                               result_body=nested(1000).encode())
    page = client.get("/t/acme/sequences/math/")
    assert page.status_code == 200
    assert "<summary>Output</summary>" in page.content.decode() and "[[[[" in page.content.decode()


def function_create_for(members, tenant, name):
    from functions.services import function_create

    return function_create(acting_user=members["developer"], tenant=tenant, name=name, starter="hello")


# ---- addresses ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, address, field", [
    ("get", "/api/v1/tenants/acme/functions/hello/files/a%00b", "path"),
    ("delete", "/api/v1/tenants/acme/functions/hello/env/A%00B/", "path"),
    ("get", "/api/v1/tenants/acme/functions/?ordering=%00", "ordering"),
    ("get", "/t/acme/f/hello/?a%00=1", "a\\0"),
])
def test_a_nul_in_a_portal_address_is_a_400(function, members, method, address, field):
    client = APIClient()
    client.force_login(members["developer"])
    response = getattr(client, method)(address)
    body = assert_refusal(response, 400, "invalid", "NUL")
    assert body["field"] == field


@pytest.mark.parametrize("path, words", [("lib\n/a.py", ["letters, digits"]), ("a\x00b.py", ["'a\\0b.py'", "NUL"])])
def test_validate_path_refuses_a_newline_inside_and_names_a_nul(path, words):
    from functions.services import validate_path

    with pytest.raises(InvalidSource) as refused:
        validate_path(path)
    for word in words:
        assert word in refused.value.message


def test_a_bearer_token_with_a_nul_is_refused_not_a_500(client, function):
    response = client.get("/api/v1/tenants/", HTTP_AUTHORIZATION="Bearer nmb_ab\x00cd_secret")
    assert response.status_code in (401, 403), response.content
