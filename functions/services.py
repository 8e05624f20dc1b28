"""Every write to functions: create, configure, save source, deploy, traffic, rollback, sharing,
environment and secrets. Engine calls run after the transaction commits."""

from __future__ import annotations

import ast
import hashlib
import logging
import re
import threading

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection, connections, transaction
from django.db.models import F, Max, Sum
from django.utils import timezone
from guardian.shortcuts import assign_perm, remove_perm

from functions import crypto
from functions.engines import envpolicy, get_engine
from functions.engines.base import DeployEvent, FunctionRef, RevisionSpec, TenantSpec, TrafficSpec
from functions.events import publish_function_event
from functions.models import EnvVar, Function, Revision, Runtime, Secret, SourceFile, TrafficTarget
from functions.selectors import function_by_id_for_user, user_can_function
from functions.starters import starter_files
from portal.errors import (
    Conflict,
    InvalidSource,
    NimbusError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    StaleVersion,
    ValidationFailed,
)
from portal.text import shown, unstorable
from tenancy.models import Tenant
from tenancy.permissions import FUNCTION_PERMS, SHARE_LEVELS
from tenancy.revocation import access_changed
from tenancy.selectors import user_can_tenant
from tenancy.services import audit_record, full_clean_or_raise, require_tenant_locked, role_group, tenant_locked

log = logging.getLogger(__name__)
User = get_user_model()

CONFIG_FIELDS = ("runtime", "handler", "description", "memory_mb", "cpu_millicores", "gpus", "timeout_seconds",
                 "concurrency", "min_instances", "max_instances", "invoke_auth", "allow_egress", "debug")
# Fields that only shape what the next deploy runs; the others (description) apply at once.
PATH_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
DEFAULT_HANDLER = {Runtime.PYTHON: "handler.handle", Runtime.NODE: "handler.handle"}
HANDLER_FILE_SUFFIX = {Runtime.PYTHON: ".py", Runtime.NODE: ".js"}


# ---- validation -----------------------------------------------------------------------------

def validate_path(path: str) -> str:
    """A safe relative path inside the function's folder, normalised; InvalidSource otherwise."""
    if not isinstance(path, str) or not path.strip():
        raise InvalidSource("A file needs a name.", field="path")
    reason = unstorable(path)
    if reason:
        raise InvalidSource(f"'{shown(path)}' holds {reason}; names use letters, digits, '.', '_' and '-'.",
                            field="path")
    if "\\" in path or path.startswith("/"):
        raise InvalidSource(f"'{path}': use a relative path with forward slashes.", field="path")
    parts = path.strip().split("/")
    if len(path) > 255 or len(parts) > 8:
        raise InvalidSource(f"'{path[:80]}': paths are limited to 255 characters and 8 folders.", field="path")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidSource(f"'{path}': empty, '.' and '..' path segments are not allowed.", field="path")
        # fullmatch: with match, "$" also accepts a trailing newline ("a.py\n/b.py" would pass).
        if not PATH_SEGMENT.fullmatch(part):
            raise InvalidSource(
                f"'{path}': names use letters, digits, '.', '_' and '-' and do not start with '.' or '-'.",
                field="path")
    return "/".join(parts)


def validate_files(files: dict[str, str]) -> dict[str, str]:
    if not isinstance(files, dict):
        raise InvalidSource("Files must be a mapping of path to text.", field="files")
    if len(files) > settings.NIMBUS_MAX_FILES:
        raise InvalidSource(f"A function has at most {settings.NIMBUS_MAX_FILES} files.", field="files")
    clean: dict[str, str] = {}
    total = 0
    for path, content in files.items():
        path = validate_path(path)
        if not isinstance(content, str):
            raise InvalidSource(f"'{path}': file content must be text.", field="files")
        reason = unstorable(content)
        if reason:
            raise InvalidSource(f"'{path}' holds {reason}; a function's files must be plain text.", field="files")
        size = len(content.encode())
        if size > settings.NIMBUS_MAX_FILE_BYTES:
            raise InvalidSource(
                f"'{path}' is {size:,} bytes; a file may be at most {settings.NIMBUS_MAX_FILE_BYTES:,} bytes.",
                field="files")
        total += size
        clean[path] = content
    if total > settings.NIMBUS_MAX_SOURCE_BYTES:
        raise InvalidSource(
            f"The source is {total:,} bytes; a function may hold at most {settings.NIMBUS_MAX_SOURCE_BYTES:,} bytes.",
            field="files")
    # A file and a folder cannot share a name.
    for path in clean:
        prefix = path + "/"
        if any(other.startswith(prefix) for other in clean):
            raise InvalidSource(f"'{path}' is both a file and a folder.", field="files")
    return clean


def check_source(runtime: str, handler: str, files: dict[str, str]) -> None:
    """Refuse a deploy that cannot start: missing handler module, Python syntax errors (with line)."""
    module, _, func = handler.rpartition(".")
    if not module or not func:
        raise InvalidSource(f"Handler '{handler}' must look like 'module.function'.", field="handler")
    suffix = HANDLER_FILE_SUFFIX[runtime]
    handler_file = module.replace(".", "/") + suffix if runtime == Runtime.PYTHON else module + suffix
    if handler_file not in files:
        raise InvalidSource(f"The handler file '{handler_file}' is missing.", field="handler")
    markers = syntax_errors(runtime, files)
    if markers:
        first = markers[0]
        error = InvalidSource(f"{first['path']}, line {first['line']}: {first['message']}", field="files")
        error.details["markers"] = markers
        raise error


def syntax_errors(runtime: str, files: dict[str, str]) -> list[dict]:
    """Every Python syntax error in the draft, as markers for the editor."""
    if runtime != Runtime.PYTHON:
        return []
    markers = []
    for path, content in files.items():
        if path.endswith(".py"):
            try:
                ast.parse(content, filename=path)
            except SyntaxError as exc:
                markers.append({"path": path, "line": exc.lineno or 1, "column": exc.offset or 1,
                                "end_line": getattr(exc, "end_lineno", None) or exc.lineno or 1,
                                "end_column": getattr(exc, "end_offset", None) or (exc.offset or 1) + 1,
                                "message": exc.msg})
    return markers


def _check_quota(tenant: Tenant, function: Function, *, creating: bool = False) -> None:
    """Refuse (QuotaExceeded) a function whose settings, with the tenant's other functions, go past
    the tenant's quota. Only under ``tenant_locked(tenant)``, whose fresh quota it reads, and before
    the write it guards: otherwise two requests pass on the same usage and overshoot together."""
    require_tenant_locked(tenant)
    quota = tenant.quota
    if creating and Function.objects.filter(tenant=tenant).count() >= quota.max_functions:
        raise QuotaExceeded(f"Tenant {tenant.slug} has reached its limit of {quota.max_functions} functions.")
    if function.memory_mb > quota.max_memory_mb_per_function:
        raise QuotaExceeded(f"Memory {function.memory_mb} MB exceeds the tenant's limit of "
                            f"{quota.max_memory_mb_per_function} MB per function.", field="memory_mb")
    if function.max_instances > quota.max_instances_per_function:
        raise QuotaExceeded(f"Max instances {function.max_instances} exceeds the tenant's limit of "
                            f"{quota.max_instances_per_function}.", field="max_instances")
    others = Function.objects.filter(tenant=tenant).exclude(pk=function.pk).exclude(state=Function.State.OFFLINE)
    totals = others.aggregate(memory=Sum(F("memory_mb") * F("max_instances")), gpus=Sum(F("gpus") * F("max_instances")))
    memory = (totals["memory"] or 0) + function.memory_mb * function.max_instances
    if memory > quota.max_total_memory_mb:
        raise QuotaExceeded(
            f"This would reserve {memory:,} MB in the tenant (memory × max instances over its functions); "
            f"the quota is {quota.max_total_memory_mb:,} MB.", field="memory_mb")
    gpus = (totals["gpus"] or 0) + function.gpus * function.max_instances
    if function.gpus and gpus > quota.max_gpus:
        raise QuotaExceeded(f"This would use {gpus} GPUs in the tenant; the quota is {quota.max_gpus}.", field="gpus")


def _require(user, function: Function, action: str) -> None:
    if not user_can_function(user, function, action):
        raise PermissionDenied(f"You may not {action} this function.")


def _require_active(tenant: Tenant) -> None:
    if not tenant.is_active:
        raise PermissionDenied(f"Tenant {tenant.slug} is suspended.")


def _bump_version(function: Function, base_version: int) -> int:
    """Move the draft from ``base_version`` to the next version, or refuse a stale save."""
    updated = Function.objects.filter(pk=function.pk, source_version=base_version).update(
        source_version=F("source_version") + 1, updated_at=timezone.now())
    if not updated:
        current = Function.objects.filter(pk=function.pk).values_list("source_version", flat=True).first()
        raise StaleVersion(
            f"Someone saved this function since you loaded it (you had version {base_version}, "
            f"it is now {current}). Reload or merge their changes before saving.",
            details={"current_version": current, "base_version": base_version})
    function.source_version = base_version + 1
    return function.source_version


# ---- functions ------------------------------------------------------------------------------

def function_create(*, acting_user, tenant: Tenant, name: str, runtime: str = Runtime.PYTHON,
                    starter: str | None = "hello", files: dict[str, str] | None = None, **config) -> Function:
    """Create a function from a starter (or the given files), with role permissions for the tenant."""
    if not user_can_tenant(acting_user, tenant, "create_function"):
        raise PermissionDenied("You may not create functions in this tenant.")
    _require_active(tenant)
    unknown = set(config) - set(CONFIG_FIELDS)
    if unknown:
        raise ValidationFailed(f"Unknown setting(s): {', '.join(sorted(unknown))}.")
    config.setdefault("handler", DEFAULT_HANDLER.get(runtime, "handler.handle"))
    function = Function(tenant=tenant, name=name, runtime=runtime, created_by=acting_user, **config)
    full_clean_or_raise(function, exclude=["tenant", "created_by"])
    starter_used = (starter or "hello") if files is None else None
    if files is None:
        try:
            files = starter_files(runtime, starter or "hello")
        except KeyError:
            raise ValidationFailed(f"There is no '{starter}' starter for {runtime}.", field="starter") from None
    files = validate_files(files)
    with tenant_locked(tenant) as locked:
        _require_active(locked)
        _check_quota(locked, function, creating=True)
        try:
            with transaction.atomic():
                function.save()
        except IntegrityError:
            raise Conflict(f"A function named '{name}' already exists in {tenant.slug}.", field="name") from None
        SourceFile.objects.bulk_create([SourceFile(function=function, path=p, content=c) for p, c in files.items()])
        for role, perms in FUNCTION_PERMS.items():
            group = role_group(tenant, role)
            for perm in perms:
                assign_perm(f"functions.{perm}", group, function)
        audit_record(actor=acting_user, action="function.create", tenant=tenant, target=function,
                     details={"runtime": runtime, "starter": starter_used})
        # Re-read through the selector: nobody creates what they could not see.
        function = function_by_id_for_user(acting_user, function.pk)
    return function


def function_update(*, acting_user, function: Function, **config) -> Function:
    """Change settings. Those that shape instances take effect at the next deploy."""
    _require(acting_user, function, "change")
    unknown = set(config) - set(CONFIG_FIELDS)
    if unknown:
        raise ValidationFailed(f"Unknown setting(s): {', '.join(sorted(unknown))}.")
    with tenant_locked(function.tenant_id) as tenant:
        # The row as it is now, not as the caller loaded it: the quota is checked on what will be
        # saved, and only the fields changed here are written (a concurrent save keeps its own).
        current = Function.objects.select_for_update(of=("self",)).filter(pk=function.pk).first()
        if current is None:
            raise NotFound("Function not found.")
        current.tenant = tenant
        if "runtime" in config and config["runtime"] != current.runtime and current.revisions.exists():
            raise ValidationFailed("The runtime cannot change once a function has been deployed; "
                                   "create a new function.", field="runtime")
        changes = {}
        for field, value in config.items():
            old = getattr(current, field)
            if old != value:
                changes[field] = [old, value]
                setattr(current, field, value)
        full_clean_or_raise(current)
        if changes:
            _check_quota(tenant, current)
            current.save(update_fields=[*changes, "updated_at"])
            audit_record(actor=acting_user, action="function.update", tenant=tenant, target=current,
                         details=changes)
    for field in (*CONFIG_FIELDS, "updated_at"):
        setattr(function, field, getattr(current, field))
    return function


def function_delete(*, acting_user, function: Function) -> None:
    _require(acting_user, function, "delete")
    ref = function_ref(function)
    with transaction.atomic():
        audit_record(actor=acting_user, action="function.delete", tenant=function.tenant, target=function)
        function.delete()
        transaction.on_commit(lambda: _engine_call("delete", ref))


def _engine_call(method: str, *args) -> None:
    try:
        getattr(get_engine(), method)(*args)
    except Exception:  # noqa: BLE001 - the database is the record; the engine is reconciled on next deploy
        log.exception("engine %s failed for %s", method, args[0] if args else "")


# ---- source ---------------------------------------------------------------------------------

def function_files(function: Function) -> dict[str, str]:
    return dict(SourceFile.objects.filter(function=function).values_list("path", "content"))


def function_file_save(*, acting_user, function: Function, path: str, content: str, base_version: int) -> int:
    """Write one file of the draft (creating it if new). Returns the new source version."""
    _require(acting_user, function, "change")
    path = validate_path(path)
    with transaction.atomic():
        files = function_files(function)
        files[path] = content
        validate_files(files)
        version = _bump_version(function, base_version)
        SourceFile.objects.update_or_create(function=function, path=path, defaults={"content": content})
        audit_record(actor=acting_user, action="source.save", tenant=function.tenant, target=function,
                     details={"path": path, "version": version, "bytes": len(content.encode())})
    _announce_save(function, acting_user, version, [path])
    return version


def function_file_delete(*, acting_user, function: Function, path: str, base_version: int) -> int:
    _require(acting_user, function, "change")
    path = validate_path(path)
    with transaction.atomic():
        deleted, _ = SourceFile.objects.filter(function=function, path=path).delete()
        if not deleted:
            raise NotFound(f"There is no file '{path}'.")
        version = _bump_version(function, base_version)
        audit_record(actor=acting_user, action="source.delete_file", tenant=function.tenant, target=function,
                     details={"path": path, "version": version})
    _announce_save(function, acting_user, version, [path])
    return version


def function_file_rename(*, acting_user, function: Function, path: str, new_path: str, base_version: int) -> int:
    _require(acting_user, function, "change")
    path, new_path = validate_path(path), validate_path(new_path)
    with transaction.atomic():
        files = function_files(function)
        if path not in files:
            raise NotFound(f"There is no file '{path}'.")
        if new_path in files:
            raise Conflict(f"'{new_path}' already exists.", field="new_path")
        files[new_path] = files.pop(path)
        validate_files(files)
        version = _bump_version(function, base_version)
        SourceFile.objects.filter(function=function, path=path).update(path=new_path)
        audit_record(actor=acting_user, action="source.rename_file", tenant=function.tenant, target=function,
                     details={"from": path, "to": new_path, "version": version})
    _announce_save(function, acting_user, version, [path, new_path])
    return version


def function_source_replace(*, acting_user, function: Function, files: dict[str, str], base_version: int) -> int:
    """Replace the whole draft (upload of an archive, API PUT)."""
    _require(acting_user, function, "change")
    files = validate_files(files)
    with transaction.atomic():
        version = _bump_version(function, base_version)
        SourceFile.objects.filter(function=function).delete()
        SourceFile.objects.bulk_create([SourceFile(function=function, path=p, content=c) for p, c in files.items()])
        audit_record(actor=acting_user, action="source.replace", tenant=function.tenant, target=function,
                     details={"files": sorted(files), "version": version})
    _announce_save(function, acting_user, version, sorted(files))
    return version


def _announce_save(function: Function, user, version: int, paths: list[str]) -> None:
    event = {"kind": "source.saved", "version": version, "paths": paths, "by": user.get_username()}
    transaction.on_commit(lambda: publish_function_event(function.pk, event))


# ---- environment and secrets ----------------------------------------------------------------

def _validate_env_name(name: str) -> None:
    # fullmatch: with match, "$" also accepts a trailing newline ("PATH\n" would pass both checks).
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name or ""):
        raise ValidationFailed(f"'{name}' is not a valid variable name.", field="name")
    reason = envpolicy.refusal(name)
    if reason:
        raise ValidationFailed(reason, field="name")


def function_env_set(*, acting_user, function: Function, name: str, value: str) -> EnvVar:
    _require(acting_user, function, "change")
    _validate_env_name(name)
    if Secret.objects.filter(function=function, name=name).exists():
        raise Conflict(f"'{name}' is already a secret of this function.", field="name")
    if len(value) > 32768:
        raise ValidationFailed("A variable's value is limited to 32 KiB.", field="value")
    with transaction.atomic():
        env, created = EnvVar.objects.update_or_create(function=function, name=name, defaults={"value": value})
        audit_record(actor=acting_user, action="env.set", tenant=function.tenant, target=function,
                     details={"name": name, "created": created})
    return env


def function_env_delete(*, acting_user, function: Function, name: str) -> None:
    _require(acting_user, function, "change")
    with transaction.atomic():
        deleted, _ = EnvVar.objects.filter(function=function, name=name).delete()
        if not deleted:
            raise NotFound(f"There is no variable '{name}'.")
        audit_record(actor=acting_user, action="env.delete", tenant=function.tenant, target=function,
                     details={"name": name})


def function_secret_set(*, acting_user, function: Function, name: str, value: str) -> Secret:
    """Store a secret encrypted; the audit trail names it but never holds its value."""
    _require(acting_user, function, "change")
    _validate_env_name(name)
    if EnvVar.objects.filter(function=function, name=name).exists():
        raise Conflict(f"'{name}' is already a plain variable of this function.", field="name")
    if not value or len(value) > 32768:
        raise ValidationFailed("A secret's value must be 1 byte to 32 KiB.", field="value")
    with transaction.atomic():
        secret, created = Secret.objects.update_or_create(
            function=function, name=name, defaults={"ciphertext": crypto.encrypt(value)})
        audit_record(actor=acting_user, action="secret.set", tenant=function.tenant, target=function,
                     details={"name": name, "created": created})
    return secret


def function_secret_delete(*, acting_user, function: Function, name: str) -> None:
    _require(acting_user, function, "change")
    with transaction.atomic():
        deleted, _ = Secret.objects.filter(function=function, name=name).delete()
        if not deleted:
            raise NotFound(f"There is no secret '{name}'.")
        audit_record(actor=acting_user, action="secret.delete", tenant=function.tenant, target=function,
                     details={"name": name})


# ---- sharing --------------------------------------------------------------------------------

def function_share(*, acting_user, function: Function, username: str, level: str) -> None:
    """Grant one user ``view``, ``edit`` or ``deploy`` access to this function alone."""
    _require(acting_user, function, "share")
    if level not in SHARE_LEVELS:
        raise ValidationFailed(f"Choose an access level among {', '.join(SHARE_LEVELS)}.", field="level")
    user = User.objects.filter(username=username, is_active=True).first()
    if user is None:
        raise ValidationFailed(f"There is no user named '{username}'.", field="username")
    with transaction.atomic():
        for perm in set().union(*SHARE_LEVELS.values()):
            remove_perm(f"functions.{perm}", user, function)
        for perm in SHARE_LEVELS[level]:
            assign_perm(f"functions.{perm}", user, function)
        audit_record(actor=acting_user, action="function.share", tenant=function.tenant, target=function,
                     details={"user": username, "level": level})
        # A new level may run the function or no longer: cached gateway decisions go (tenancy/revocation.py).
        access_changed(reason=f"your access to {function} changed", tenant_id=function.tenant_id)


def function_unshare(*, acting_user, function: Function, username: str) -> None:
    _require(acting_user, function, "share")
    user = User.objects.filter(username=username).first()
    if user is None:
        raise NotFound(f"There is no user named '{username}'.")
    with transaction.atomic():
        for perm in set().union(*SHARE_LEVELS.values()):
            remove_perm(f"functions.{perm}", user, function)
        audit_record(actor=acting_user, action="function.unshare", tenant=function.tenant, target=function,
                     details={"user": username})
        access_changed(reason=f"{function} is no longer shared with you", tenant_id=function.tenant_id,
                       user_ids=[user.pk], close_sockets=True)


# ---- deploy, traffic, rollback --------------------------------------------------------------

def function_ref(function: Function) -> FunctionRef:
    return FunctionRef(tenant=function.tenant.slug, name=function.name, function_id=function.pk,
                       tenant_id=function.tenant_id)


def content_hash(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + files[path].encode() + b"\0")
    return digest.hexdigest()


def _config_snapshot(function: Function) -> dict:
    config = {field: getattr(function, field) for field in CONFIG_FIELDS if field != "description"}
    config["env"] = dict(EnvVar.objects.filter(function=function).values_list("name", "value"))
    # Ciphertexts, so a rollback restores the secrets its revision ran with; decrypted only for the engine.
    config["secrets"] = dict(Secret.objects.filter(function=function).values_list("name", "ciphertext"))
    return config


def revision_spec(revision: Revision) -> RevisionSpec:
    function = revision.function
    tenant = function.tenant
    config = revision.config
    quota = tenant.quota
    return RevisionSpec(
        function=function_ref(function),
        number=revision.number,
        revision_id=revision.pk,
        content_hash=revision.content_hash,
        runtime=config["runtime"],
        handler=config["handler"],
        files=dict(revision.files),
        memory_mb=config["memory_mb"],
        cpu_millicores=config["cpu_millicores"],
        gpus=config["gpus"],
        timeout_seconds=config["timeout_seconds"],
        concurrency=config["concurrency"],
        min_instances=config["min_instances"],
        max_instances=config["max_instances"],
        env=dict(config.get("env", {})),
        secrets={name: crypto.decrypt(ct) for name, ct in config.get("secrets", {}).items()},
        allow_egress=config.get("allow_egress", False),
        debug=config.get("debug", False),
        tenant=tenant_spec(tenant, quota),
    )


def tenant_spec(tenant: Tenant, quota=None) -> TenantSpec:
    quota = quota or tenant.quota
    limits = {f.name: getattr(quota, f.name) for f in quota._meta.fields if f.name not in ("id", "tenant")}
    return TenantSpec(slug=tenant.slug, isolation=tenant.isolation, quota=limits)


def traffic_specs(function: Function) -> list[TrafficSpec]:
    return [TrafficSpec(revision=t.revision.number, percent=t.percent, tag=t.tag)
            for t in TrafficTarget.objects.filter(function=function).select_related("revision").only(
                "percent", "tag", "revision__number")]


def function_deploy(*, acting_user, function: Function, message: str = "", promote: bool = True,
                    inline: bool | None = None) -> Revision:
    """Freeze the draft into a new immutable revision and roll it out after commit.

    With ``promote`` the revision takes all traffic once ready; otherwise it is deployed beside
    the current traffic (give it a tag or a share with ``function_traffic_set``). ``inline`` runs
    the engine's part in this thread after commit (default: settings.NIMBUS_DEPLOY_INLINE).
    """
    _require(acting_user, function, "deploy")
    _require_active(function.tenant)
    # The tenant first, then the function: every service takes the two locks in that order.
    with tenant_locked(function.tenant_id) as tenant:
        function = Function.objects.select_for_update(of=("self",)).get(pk=function.pk)
        function.tenant = tenant
        files = function_files(function)
        validate_files(files)
        check_source(function.runtime, function.handler, files)
        _check_quota(tenant, function)
        number = (Revision.objects.filter(function=function).aggregate(n=Max("number"))["n"] or 0) + 1
        revision = Revision.objects.create(
            function=function, number=number, content_hash=content_hash(files), files=files,
            config=_config_snapshot(function), author=acting_user, message=message[:200])
        audit_record(actor=acting_user, action="function.deploy", tenant=function.tenant, target=function,
                     details={"revision": number, "hash": revision.content_hash[:12], "promote": promote})
        transaction.on_commit(lambda: _start_deploy(revision.pk, promote, inline))
    return revision


def _start_deploy(revision_id: int, promote: bool, inline: bool | None = None) -> None:
    if settings.NIMBUS_DEPLOY_INLINE if inline is None else inline:
        run_deploy(revision_id, promote=promote)
        return
    thread = threading.Thread(target=_deploy_thread, args=(revision_id, promote), name=f"deploy-{revision_id}",
                              daemon=True)
    thread.start()


def _deploy_thread(revision_id: int, promote: bool) -> None:
    try:
        run_deploy(revision_id, promote=promote)
    finally:
        connections.close_all()  # the thread ends: its connections go back to the pool


def run_deploy(revision_id: int, *, promote: bool = True) -> Revision:
    """The engine's part of a deploy: prepare, start, health-check, then route traffic.

    Runs outside any request (a thread, a worker, or inline). Progress goes to the function's
    channel group; the revision row records the outcome. A failure leaves the old traffic serving.
    """
    revision = Revision.objects.select_related("function__tenant__quota").get(pk=revision_id)
    function = revision.function

    def progress(event: DeployEvent) -> None:
        publish_function_event(function.pk, {
            "kind": "deploy.progress", "revision": revision.number, "step": event.step,
            "status": event.status, "message": event.message, "output": event.output[-20000:],
        })

    Revision.objects.filter(pk=revision.pk).update(status=Revision.Status.DEPLOYING)
    progress(DeployEvent("frozen", "ok", f"Revision {revision.number} frozen ({revision.content_hash[:12]})."))
    if promote:
        traffic = [TrafficSpec(revision=revision.number, percent=100)]
        traffic += [TrafficSpec(revision=t.revision, percent=0, tag=t.tag)
                    for t in traffic_specs(function) if t.tag and t.revision != revision.number]
    else:
        traffic = traffic_specs(function)
    if not connection.in_atomic_block:
        # The engine's part can take minutes (an image build, a rollout): hold none of the pool's
        # connections meanwhile. The next query takes one again.
        connection.close()
    try:
        engine = get_engine()
        engine.ensure_tenant(tenant_spec(function.tenant))
        engine.deploy(revision_spec(revision), traffic=traffic, progress=progress)
    except Exception as exc:  # noqa: BLE001 - any failure is recorded on the revision and shown to the user
        text = exc.message if isinstance(exc, NimbusError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, NimbusError):
            log.exception("deploy of %s failed", revision)
        Revision.objects.filter(pk=revision.pk).update(status=Revision.Status.FAILED, status_message=text)
        progress(DeployEvent("done", "failed", text))
        revision.refresh_from_db()
        return revision
    with transaction.atomic():
        Revision.objects.filter(pk=revision.pk).update(
            status=Revision.Status.READY, status_message="", deployed_at=timezone.now())
        if promote:
            _write_traffic(function, traffic)
        # Decided by the row, not by the state loaded before the deploy: a function taken offline
        # meanwhile stays offline (coming back online goes through the quota check).
        Function.objects.filter(pk=function.pk).exclude(state=Function.State.OFFLINE).update(
            state=Function.State.DEPLOYED)
    progress(DeployEvent("done", "ok", f"Revision {revision.number} is ready."))
    revision.refresh_from_db()
    return revision


def _write_traffic(function: Function, traffic: list[TrafficSpec]) -> None:
    revisions = {r.number: r for r in Revision.objects.filter(
        function=function, number__in=[t.revision for t in traffic]).only("id", "number")}
    TrafficTarget.objects.filter(function=function).delete()
    TrafficTarget.objects.bulk_create([
        TrafficTarget(function=function, revision=revisions[t.revision], percent=t.percent, tag=t.tag)
        for t in traffic])


def validate_traffic(function: Function, targets: list[dict]) -> list[TrafficSpec]:
    if not targets:
        raise ValidationFailed("Route traffic to at least one revision.", field="traffic")
    specs, seen, tags = [], set(), set()
    for target in targets:
        try:
            number, percent = int(target["revision"]), int(target.get("percent", 0))
        except (KeyError, TypeError, ValueError):
            raise ValidationFailed("Each traffic entry needs a revision number and a percent.", field="traffic") from None
        tag = (target.get("tag") or "").strip()
        if number in seen:
            raise ValidationFailed(f"Revision {number} appears twice.", field="traffic")
        if not 0 <= percent <= 100:
            raise ValidationFailed("Percentages are between 0 and 100.", field="traffic")
        if tag:
            if not re.match(r"^[a-z]([a-z0-9-]{0,18}[a-z0-9])?$", tag):
                raise ValidationFailed(f"Tag '{tag}': use 1-20 lowercase letters, digits or hyphens.", field="traffic")
            if tag in tags:
                raise ValidationFailed(f"Tag '{tag}' is used twice.", field="traffic")
            tags.add(tag)
        if percent == 0 and not tag:
            continue  # a revision with no share and no tag is simply not routed
        seen.add(number)
        specs.append(TrafficSpec(revision=number, percent=percent, tag=tag))
    if sum(s.percent for s in specs) != 100:
        raise ValidationFailed(f"Percentages add up to {sum(s.percent for s in specs)}, not 100.", field="traffic")
    ready = set(Revision.objects.filter(function=function, number__in=seen, status=Revision.Status.READY)
                .values_list("number", flat=True))
    missing = sorted(seen - ready)
    if missing:
        raise ValidationFailed(f"Revision(s) {', '.join(map(str, missing))} are not deployed and ready.",
                               field="traffic")
    return specs


def function_traffic_set(*, acting_user, function: Function, targets: list[dict]) -> list[TrafficSpec]:
    """Split traffic between ready revisions: ``[{"revision": 3, "percent": 90, "tag": ""}, …]``."""
    _require(acting_user, function, "deploy")
    specs = validate_traffic(function, targets)
    ref = function_ref(function)
    with transaction.atomic():
        before = [(t.revision, t.percent, t.tag) for t in traffic_specs(function)]
        _write_traffic(function, specs)
        audit_record(actor=acting_user, action="function.traffic", tenant=function.tenant, target=function,
                     details={"from": before, "to": [(s.revision, s.percent, s.tag) for s in specs]})
        transaction.on_commit(lambda: _engine_call("set_traffic", ref, specs))
    return specs


def revision_rollback(*, acting_user, function: Function, number: int) -> Revision:
    """Send all traffic back to an earlier ready revision (tags on other revisions are kept)."""
    _require(acting_user, function, "deploy")
    revision = Revision.objects.filter(function=function, number=number).first()
    if revision is None:
        raise NotFound(f"Revision {number} not found.")
    if revision.status != Revision.Status.READY:
        raise Conflict(f"Revision {number} is {revision.status}; only a ready revision can take traffic.")
    targets = [{"revision": number, "percent": 100}]
    targets += [{"revision": t.revision, "percent": 0, "tag": t.tag}
                for t in traffic_specs(function) if t.tag and t.revision != number]
    specs = validate_traffic(function, targets)
    ref = function_ref(function)
    with transaction.atomic():
        _write_traffic(function, specs)
        audit_record(actor=acting_user, action="revision.rollback", tenant=function.tenant, target=function,
                     details={"revision": number})
        transaction.on_commit(lambda: _engine_call("set_traffic", ref, specs))
    return revision


def function_take_offline(*, acting_user, function: Function) -> Function:
    _require(acting_user, function, "deploy")
    ref = function_ref(function)
    with transaction.atomic():
        Function.objects.filter(pk=function.pk).update(state=Function.State.OFFLINE)
        function.state = Function.State.OFFLINE
        audit_record(actor=acting_user, action="function.offline", tenant=function.tenant, target=function)
        transaction.on_commit(lambda: _engine_call("set_offline", ref, True))
    return function


def function_bring_online(*, acting_user, function: Function) -> Function:
    _require(acting_user, function, "deploy")
    if function.state != Function.State.OFFLINE:
        return function
    ref = function_ref(function)
    with tenant_locked(function.tenant_id) as tenant:
        # Back online, the function's reservation counts again: checked on its settings as they are now.
        current = Function.objects.select_for_update(of=("self",)).filter(pk=function.pk).first()
        if current is None:
            raise NotFound("Function not found.")
        if current.state != Function.State.OFFLINE:
            function.state = current.state
            return function
        _check_quota(tenant, current)
        state = (Function.State.DEPLOYED if TrafficTarget.objects.filter(function=current).exists()
                 else Function.State.DRAFT)
        Function.objects.filter(pk=current.pk).update(state=state)
        function.state = state
        audit_record(actor=acting_user, action="function.online", tenant=tenant, target=function)
        transaction.on_commit(lambda: _engine_call("set_offline", ref, False))
    return function
