"""The IDE page and its upload endpoint (files and zip archives)."""

import io
import json
import stat
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from functions.models import Function, SourceFile

UPLOAD = "/ide/acme/hello/upload/"


def client_for(user):
    client = Client()
    client.force_login(user)
    return client


def zip_of(entries: dict, *, symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def files_of():
    return dict(SourceFile.objects.filter(function__name="hello").values_list("path", "content"))


# ---- the page -----------------------------------------------------------------------------------

def test_editor_page_serves_monaco_from_our_static_files(function, members):
    response = client_for(members["developer"]).get("/ide/acme/hello/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-vs="/static/vendor/monaco/vs"' in html
    assert '/static/vendor/monaco/vs/loader.js' in html
    assert "cdn" not in html.lower()
    config = json.loads(html.split('id="ide-config" type="application/json">', 1)[1].split("</script>", 1)[0])
    assert config["wsPath"] == "/ws/ide/acme/hello/"
    assert (config["canChange"], config["canDeploy"]) == (True, True)


def test_editor_page_for_a_viewer_is_read_only(function, members):
    response = client_for(members["viewer"]).get("/ide/acme/hello/")
    assert response.status_code == 200
    assert response.context["ide_config"]["canChange"] is False
    assert response.context["ide_config"]["canDeploy"] is False


@pytest.mark.parametrize("who, status", [("anonymous", 302), ("outsider", 404)])
def test_editor_page_refusals(function, outsider, who, status):
    client = Client() if who == "anonymous" else client_for(outsider)
    response = client.get("/ide/acme/hello/")
    assert response.status_code == status
    if who == "anonymous":
        assert response["Location"].startswith("/login/")


# ---- uploads ------------------------------------------------------------------------------------

def test_upload_a_single_file_into_a_folder(function, members):
    response = client_for(members["developer"]).post(UPLOAD, {
        "base_version": 1, "folder": "lib", "files": SimpleUploadedFile("util.py", b"X = 1\n")})
    assert response.status_code == 200, response.content
    assert response.json() == {"version": 2, "paths": ["lib/util.py"]}
    files = files_of()
    assert files["lib/util.py"] == "X = 1\n"
    assert "handler.py" in files


def test_upload_a_zip_strips_its_top_folder_and_can_replace_the_draft(function, members):
    archive = zip_of({"project/handler.py": "def handle(e, c):\n    return 'zip'\n",
                      "project/requirements.txt": "", "__MACOSX/project/._handler.py": "junk"})
    response = client_for(members["developer"]).post(UPLOAD, {
        "base_version": 1, "replace": "1", "files": SimpleUploadedFile("project.zip", archive)})
    assert response.status_code == 200, response.content
    assert files_of() == {"handler.py": "def handle(e, c):\n    return 'zip'\n", "requirements.txt": ""}
    assert Function.objects.get(pk=function.pk).source_version == 2


@pytest.mark.parametrize("entries, symlink, message", [
    ({"../../etc/cron.d/evil": "x"}, None, "'..'"),
    ({"/abs/path.py": "x"}, None, "relative path"),
    ({"ok.py": "x"}, "link.py", "symbolic link"),
    ({"data.bin": b"\xff\xfe\x00binary"}, None, "UTF-8"),
])
def test_upload_refuses_unsafe_archives(function, members, entries, symlink, message):
    archive = zip_of(entries, symlink=symlink)
    response = client_for(members["developer"]).post(UPLOAD, {
        "base_version": 1, "files": SimpleUploadedFile("bad.zip", archive)})
    assert response.status_code == 400
    assert message in response.json()["detail"]
    assert Function.objects.get(pk=function.pk).source_version == 1


def test_upload_size_limits_have_clear_messages(function, members, settings):
    settings.NIMBUS_MAX_FILE_BYTES = 100
    client = client_for(members["developer"])
    big = client.post(UPLOAD, {"base_version": 1, "files": SimpleUploadedFile("big.py", b"#" * 101)})
    assert big.status_code == 400
    assert "at most 100 bytes" in big.json()["detail"]
    bomb = client.post(UPLOAD, {"base_version": 1, "files": SimpleUploadedFile("bomb.zip", zip_of({"a.py": "0" * 5000}))})
    assert bomb.status_code == 400
    assert "'a.py' is 5,000 bytes" in bomb.json()["detail"]
    not_zip = client.post(UPLOAD, {"base_version": 1, "files": SimpleUploadedFile("x.zip", b"not a zip")})
    assert not_zip.json()["detail"] == "The archive is not a valid zip file."


def test_upload_on_a_stale_version_is_a_conflict(function, members):
    client = client_for(members["developer"])
    client.post(UPLOAD, {"base_version": 1, "files": SimpleUploadedFile("a.py", b"")})
    response = client.post(UPLOAD, {"base_version": 1, "files": SimpleUploadedFile("b.py", b"")})
    assert response.status_code == 409
    assert response.json()["current_version"] == 2


@pytest.mark.parametrize("who, status", [("viewer", 403), ("outsider", 404)])
def test_upload_refusals(function, members, outsider, who, status):
    user = outsider if who == "outsider" else members[who]
    response = client_for(user).post(UPLOAD, {"base_version": 1, "files": SimpleUploadedFile("a.py", b"")})
    assert response.status_code == status
    assert "a.py" not in files_of()
