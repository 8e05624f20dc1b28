"""The IDE page and its one HTTP endpoint (uploads of files and zip archives); everything else the
editor does goes over the WebSocket (webide/consumers.py)."""

from __future__ import annotations

import io
import lzma
import zipfile
import zlib

from django.conf import settings
from django.http import JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST

from functions.selectors import function_for_user, function_permissions
from functions.services import function_files, function_source_replace, validate_path
from portal.errors import InvalidSource, NimbusError, ValidationFailed
from portal.text import shown, unstorable
from portal.views import nimbus_page

# Entries archivers add that are never part of a function.
JUNK_PARTS = {"__MACOSX", "__pycache__", ".DS_Store", ".git"}
S_IFMT, S_IFLNK = 0o170000, 0o120000
# What an archive whose headers lie raises while it is read: zipfile's own error (a CRC that does
# not match the claimed size), the decompressors' errors and a stream that ends early.
DAMAGED = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError)


@nimbus_page
def editor(request, tenant, function):
    function = function_for_user(request.user, tenant, function)
    perms = function_permissions(request.user, [function])[function.pk]
    config = {
        "tenant": function.tenant.slug,
        "function": function.name,
        "wsPath": f"/ws/ide/{function.tenant.slug}/{function.name}/",
        "uploadUrl": f"/ide/{function.tenant.slug}/{function.name}/upload/",
        "functionUrl": f"/t/{function.tenant.slug}/f/{function.name}/",
        # An invocation's trace: this prefix + its trace id + "/".
        "tracesUrl": reverse("trace_detail", args=[function.tenant.slug, "0"])[:-2],
        "canChange": "change" in perms,
        "canDeploy": "deploy" in perms,
    }
    return render(request, "webide/editor.html", {
        "function": function, "tenant": function.tenant, "ide_config": config, "can": {p: True for p in perms},
    })


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidSource(f"'{path}' is not UTF-8 text; a function's files must be text.", field="files") from None


def _check_size(path: str, size: int) -> None:
    limit = settings.NIMBUS_MAX_FILE_BYTES
    if size > limit:
        raise InvalidSource(f"'{path}' is {size:,} bytes; a file may be at most {limit:,} bytes.", field="files")


def files_from_zip(data: bytes, folder: str = "") -> dict[str, str]:
    """Text files of a zip archive, with paths checked like any other (no '..', no absolute paths, no
    links), sizes checked before anything is decompressed, and one common top folder removed."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    # ValueError: also a name flagged as UTF-8 that is not (a UnicodeDecodeError).
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        raise InvalidSource("The archive is not a valid zip file.", field="files") from None
    entries = []
    for info in archive.infolist():
        # zipfile cuts a name at its first NUL ("a\0b.py" becomes "a"); refuse it instead.
        reason = unstorable(info.orig_filename)
        if reason:
            raise InvalidSource(f"The archive entry '{shown(info.orig_filename)}' has {reason} in its name.",
                                field="files")
        if info.is_dir():
            continue
        parts = info.filename.split("/")
        if JUNK_PARTS.intersection(parts):
            continue
        if (info.external_attr >> 16) & S_IFMT == S_IFLNK:
            raise InvalidSource(f"'{info.filename}' is a symbolic link; archives may only hold files.", field="files")
        # validate_path refuses '..', absolute and backslash paths: the zip-slip guard.
        validate_path(info.filename)
        _check_size(info.filename, info.file_size)
        entries.append(info)
    if len(entries) > settings.NIMBUS_MAX_FILES:
        raise InvalidSource(f"The archive holds {len(entries)} files; a function has at most "
                            f"{settings.NIMBUS_MAX_FILES}.", field="files")
    if sum(info.file_size for info in entries) > settings.NIMBUS_MAX_SOURCE_BYTES:
        raise InvalidSource(f"The archive unpacks to more than {settings.NIMBUS_MAX_SOURCE_BYTES:,} bytes, the "
                            "most a function may hold.", field="files")
    tops = {info.filename.split("/", 1)[0] for info in entries}
    strip = len(tops) == 1 and all("/" in info.filename for info in entries)
    files = {}
    for info in entries:
        name = info.filename.split("/", 1)[1] if strip else info.filename
        if info.flag_bits & 0x1:
            raise InvalidSource(f"'{info.filename}' is encrypted; upload an archive without a password.",
                                field="files")
        try:
            with archive.open(info) as handle:
                # Read no more than the limit allows, whatever the header claimed.
                content = handle.read(settings.NIMBUS_MAX_FILE_BYTES + 1)
        except NotImplementedError:
            raise InvalidSource(f"'{info.filename}' is compressed with a method Nimbus cannot unpack; use deflate.",
                                field="files") from None
        except DAMAGED as exc:
            raise InvalidSource(f"'{info.filename}' is damaged in the archive ({exc}); the archive is not a valid "
                                "zip file.", field="files") from None
        _check_size(info.filename, len(content))
        path = validate_path(f"{folder}/{name}" if folder else name)
        files[path] = _decode(path, content)
    return files


@require_POST
@nimbus_page
def upload(request, tenant, function):
    """Add uploaded files (or a zip archive's files) to the draft in one save, or replace the draft
    with them (``replace=1``). Answers JSON: the new source version and the uploaded paths."""
    try:
        function = function_for_user(request.user, tenant, function, "change")
        try:
            base_version = int(request.POST.get("base_version", ""))
        except ValueError:
            raise ValidationFailed("base_version is required.", field="base_version") from None
        folder = request.POST.get("folder", "").strip().strip("/")
        if folder:
            folder = validate_path(folder)
        uploads = request.FILES.getlist("files")
        if not uploads:
            raise ValidationFailed("Choose a file or a zip archive to upload.", field="files")
        uploaded: dict[str, str] = {}
        limit = settings.NIMBUS_MAX_SOURCE_BYTES
        for item in uploads:
            if item.size > limit:
                raise InvalidSource(f"'{item.name}' is {item.size:,} bytes; an upload may be at most {limit:,} bytes.",
                                    field="files")
            data = item.read()
            if item.name.lower().endswith(".zip"):
                uploaded.update(files_from_zip(data, folder))
            else:
                path = validate_path(f"{folder}/{item.name}" if folder else item.name)
                _check_size(path, len(data))
                uploaded[path] = _decode(path, data)
        files = {} if request.POST.get("replace") == "1" else function_files(function)
        files.update(uploaded)
        version = function_source_replace(acting_user=request.user, function=function, files=files,
                                          base_version=base_version)
    except NimbusError as exc:
        if exc.http_status in (403, 404):
            raise
        return JsonResponse(exc.as_dict(), status=exc.http_status)
    return JsonResponse({"version": version, "paths": sorted(uploaded)})
