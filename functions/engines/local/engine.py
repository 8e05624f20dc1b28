"""The local engine: revisions run as sandboxed processes on this machine, behind the gateway.

It owns the pools (one per revision), the route table the gateway reads, the invocation
records writer and a ring buffer of recent log lines per function.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from datetime import datetime, timezone as dt_timezone
from pathlib import Path

from django.conf import settings

from functions.engines.base import (
    DeployEvent,
    FunctionRef,
    FunctionStatus,
    InvokeResult,
    LogLine,
    ProgressCallback,
    RevisionSpec,
    RevisionStatus,
    TenantSpec,
    TrafficSpec,
)
from functions.engines.local import client, egress, resources, sandbox
from functions.engines.local.cpu import CpuThrottle
from functions.engines.local.deps import Installer, ensure_deps
from functions.engines.local.instances import InstanceFailed, Pool, Saturated
from functions.engines.local.records import RecordsWriter
from functions.engines.local.routes import RouteTable, with_own_connection
from portal.errors import EngineError

log = logging.getLogger(__name__)

LOG_BUFFER = 2000
UPKEEP_INTERVAL = 0.25
UNROUTED_GRACE_SECONDS = 30.0
ROUTE_CHECK_SECONDS = 5.0
_engines: weakref.WeakSet = weakref.WeakSet()
_sequence = itertools.count(1)


def stop_all_engines() -> None:
    """Stop every engine of this process (atexit, and the tests' cleanup fixture)."""
    for engine in list(_engines):
        engine.shutdown()


atexit.register(stop_all_engines)


class LocalEngine:
    name = "local"
    runs_cron = False  # the portal's delivery worker fires cron triggers from the database

    def __init__(self, *, idle_seconds: float | None = None, queue_limit: int | None = None,
                 sandbox_mode: str | None = None, zygote: bool = True, route_ttl: float = 3.0, **overrides):
        self.settings = dict(settings.NIMBUS_LOCAL)
        self.settings.update({k.upper(): v for k, v in overrides.items()})
        if idle_seconds is not None:
            self.settings["IDLE_SECONDS"] = idle_seconds
        if queue_limit is not None:
            self.settings["QUEUE_LIMIT"] = queue_limit
        self.sandbox_mode = sandbox.resolve_mode(sandbox_mode or self.settings.get("SANDBOX", "bwrap"))
        self.use_zygote = zygote
        self.python = str(self.settings.get("PYTHON") or "")
        self.allow_cidrs = tuple(str(c) for c in self.settings.get("EGRESS_ALLOW_CIDRS") or ())
        egress.ruleset(self.allow_cidrs)  # a malformed CIDR stops the engine here, not at the first call
        self.resources = resources.detect(mode=str(self.settings.get("RESOURCES") or "auto"))
        self.installer = Installer(sandboxed=self.sandbox_mode == "bwrap",
                                   local_dirs=tuple(str(p) for p in self.settings.get("DEPS_LOCAL_DIRS") or ()),
                                   python=self.python)
        self.code_root = Path(self.settings["CODE_DIR"])
        self.deps_root = Path(self.settings["DEPS_CACHE_DIR"])
        # Copies of the runtime shims and pip when the checkout sits in a folder the tenants cannot enter.
        self.tools_root = self.code_root.parent / "sandbox-tools"
        socket_root = Path(self.settings.get("SOCKET_DIR") or tempfile.gettempdir())
        # Short, per-engine socket folders (unix socket paths are limited to 107 bytes), the engine's own.
        socket_root.mkdir(parents=True, exist_ok=True)
        self.socket_root = socket_root / f"{os.getpid()}-{next(_sequence)}"
        self.socket_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_host()
        self.runtime_dir = sandbox.reachable_copy(sandbox.RUNTIMES_DIR, self.tools_root)
        self.installer = dataclasses.replace(self.installer, tools_root=str(self.tools_root))
        self.routes = RouteTable(ttl=route_ttl)
        self.routes.on_load = self._retire_unrouted_revisions
        self.records = RecordsWriter(self.settings.get("RETENTION"))
        self.pools: dict[int, Pool] = {}
        self.pools_lock = threading.Lock()
        self.prepare_locks: dict[int, threading.Lock] = collections.defaultdict(threading.Lock)
        self.log_buffers: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=LOG_BUFFER))
        self.log_changed = threading.Condition()
        self.upkeep_thread: threading.Thread | None = None
        # The functions' millicores: the cgroup's CPU quota where there is one, else a userspace throttle.
        cgroup_cpu = "cpu" in getattr(self.resources, "controllers", ())
        self.cpu_throttle = CpuThrottle() if self.settings.get("CPU_THROTTLE", True) and not cgroup_cpu else None
        self.stopped = False
        _engines.add(self)
        self._announce()

    def _check_host(self) -> None:
        """Refuse to start where the tenants' uids could not reach their own code."""
        if os.geteuid() != 0:
            return
        problem = sandbox.uid_range_problem(self.settings)
        if problem:
            raise EngineError(f"The sandbox's uid range is unsafe: {problem}.")
        if self.sandbox_mode != "bwrap":
            return
        for folder in self.installer.local_dirs:
            if not sandbox.reachable(folder):
                raise EngineError(f"NIMBUS_DEPS_LOCAL_DIRS: {folder} is not reachable by the sandbox's uids (a "
                                  "folder on its path is private, or it does not exist).")
        for root in (self.code_root, self.deps_root):
            root.mkdir(parents=True, exist_ok=True)
            if not sandbox.reachable(root):
                raise EngineError(f"{root} is not reachable by the sandbox's uids (a folder on its path is "
                                  "private): give its folders the search bit for others (chmod o+x), or move "
                                  "NIMBUS_DATA_DIR.")
        sandbox.python_executable(self.python)  # raises with what to set when no usable interpreter exists

    def _announce(self) -> None:
        """Say once, at start, what holds the functions here."""
        if self.sandbox_mode == "none":
            log.warning("local engine: NO SANDBOX (NIMBUS_LOCAL_SANDBOX=none): functions are not isolated from "
                        "the host, the portal or each other")
        else:
            if os.geteuid() == 0:
                log.info("local engine: bubblewrap sandbox with seccomp, per-tenant host uids from %s",
                         self.settings.get("SANDBOX_UID_BASE", sandbox.DEFAULT_UID_BASE))
            else:
                log.warning("local engine: bubblewrap sandbox with seccomp, all tenants under the portal's own uid "
                            "%s (the portal is not root): tenants are apart by namespaces only", os.geteuid())
            problem = egress.check()
            if problem:
                log.warning("local engine: functions with egress cannot start here: %s", problem)
            else:
                log.info("local engine: egress through slirp4netns, the host and private ranges blocked")
        if self.resources.kind == "rlimit":
            log.warning("local engine: resource control by rlimits only (%s): memory per process, /tmp not "
                        "counted, CPU by a userspace throttle", self.resources.describe())
        else:
            log.info("local engine: resource control %s", self.resources.describe())

    def isolation(self, spec: RevisionSpec) -> sandbox.Isolation:
        tenant_id = spec.function.tenant_id
        if not tenant_id and os.geteuid() == 0:
            raise EngineError(f"{spec}: no tenant id, so no host identity to run it as.")
        identity = sandbox.identity_for(tenant_id, self.settings) if tenant_id else None
        return sandbox.Isolation(identity=identity, resources=self.resources, allow_cidrs=self.allow_cidrs,
                                 python=self.python)

    def _tenant_dir(self, root: Path, spec: RevisionSpec) -> Path:
        """The tenant's folder under ``root``: the platform's, readable by the tenant's gid only."""
        folder = root / spec.function.tenant
        folder.mkdir(parents=True, exist_ok=True)
        identity = self.isolation(spec).identity
        if identity is not None:
            os.chown(folder, os.geteuid(), identity.gid)
            os.chmod(folder, 0o750)
        return folder

    @property
    def idle_seconds(self) -> float:
        return float(self.settings.get("IDLE_SECONDS", 60))

    @property
    def max_body_bytes(self) -> int:
        # The portal-wide body limit, unless this engine was given its own (tests).
        return int(self.settings.get("MAX_BODY_BYTES") or settings.NIMBUS_MAX_BODY_BYTES)

    # ---- the Engine protocol ---------------------------------------------------------------------

    def ensure_tenant(self, tenant: TenantSpec) -> None:
        (self.code_root / tenant.slug).mkdir(parents=True, exist_ok=True)

    def deploy(self, spec: RevisionSpec, *, traffic: list[TrafficSpec], progress: ProgressCallback) -> None:
        deps_path = self._deps_step(spec, progress)
        progress(DeployEvent("instance", "running", f"Starting the {spec.runtime} runtime "
                                                      f"({'sandboxed' if self.sandbox_mode == 'bwrap' else 'NOT ISOLATED: no sandbox'})."))
        pool = self._new_pool(spec, deps_path)
        try:
            pool.start()
        except EngineError as exc:
            pool.close()
            progress(DeployEvent("instance", "failed", exc.message, output=str(exc.details.get("output", ""))))
            raise
        except Exception as exc:
            pool.close()
            progress(DeployEvent("instance", "failed", f"{type(exc).__name__}: {exc}"))
            raise EngineError(f"The runtime could not start: {exc}") from exc
        progress(DeployEvent("instance", "ok", "Runtime started; the handler imported."))
        if spec.min_instances > 0:
            self._health_step(spec, pool, progress)
        else:
            progress(DeployEvent("health", "ok", "The handler imports; no instance is kept warm (min instances 0), "
                                                 "the first request starts one."))
        with self.pools_lock:
            old = self.pools.get(spec.revision_id)
            self.pools[spec.revision_id] = pool
        if old is not None:
            old.close()
        # The revisions this one replaces keep serving until the database routes traffic away from
        # them (run_deploy writes it after this returns); the route table's next load retires them.
        self.routes.invalidate(eager_seconds=10)
        self._ensure_upkeep()
        split = ", ".join(f"{t.percent}% → revision {t.revision}" + (f" (tag {t.tag})" if t.tag else "")
                          for t in traffic)
        progress(DeployEvent("traffic", "ok", f"Routing {split or 'unchanged'}."))

    def _deps_step(self, spec: RevisionSpec, progress: ProgressCallback) -> Path | None:
        from functions.engines.local.deps import manifest_name

        manifest = manifest_name(spec.runtime)
        if manifest not in spec.files:
            progress(DeployEvent("dependencies", "ok", f"No {manifest}: nothing to install."))
            return None
        progress(DeployEvent("dependencies", "running", f"Installing {manifest}…"))
        try:
            result = ensure_deps(spec.runtime, spec.files, self._tenant_dir(self.deps_root, spec), self.installer,
                                 self.isolation(spec))
        except EngineError as exc:
            progress(DeployEvent("dependencies", "failed", exc.message, output=str(exc.details.get("output", ""))))
            raise
        message = (f"{manifest} unchanged: using the cached install." if result.cached
                   else f"Installed {manifest}.")
        progress(DeployEvent("dependencies", "ok", message, output=result.output))
        return result.path

    def _health_step(self, spec: RevisionSpec, pool: Pool, progress: ProgressCallback) -> None:
        progress(DeployEvent("health", "running", "Starting a first instance and checking /_nimbus/health."))
        try:
            inst = pool.acquire_sync()
        except (InstanceFailed, Saturated) as exc:
            pool.close()
            progress(DeployEvent("health", "failed", f"The first instance did not start: {exc}"))
            raise EngineError(f"The first instance did not start: {exc}") from None
        try:
            status, body = client.get_sync(inst, "/_nimbus/health")
        except OSError as exc:
            status, body = 0, str(exc).encode()
        finally:
            pool.release(inst)
        if status != 200:
            pool.close()
            text = body.decode("utf-8", "replace")
            progress(DeployEvent("health", "failed", f"Health check answered {status}.", output=text))
            raise EngineError(f"The health check of the first instance failed ({status}).", details={"output": text})
        progress(DeployEvent("health", "ok", f"Instance {inst.id} is healthy ({inst.init_ms:.0f} ms to start)."))

    def set_traffic(self, function: FunctionRef, traffic: list[TrafficSpec]) -> None:
        self._retire_unrouted(function, traffic)
        self.routes.invalidate()

    def set_offline(self, function: FunctionRef, offline: bool) -> None:
        if offline:
            for pool in self._pools_of(function.function_id):
                self._drop_pool(pool)
        self.routes.invalidate()

    def delete(self, function: FunctionRef) -> None:
        for pool in self._pools_of(function.function_id):
            self._drop_pool(pool, retire=False)
        shutil.rmtree(self.code_root / function.tenant / function.name, ignore_errors=True)
        self.log_buffers.pop(self._log_key(function.function_id), None)
        self.routes.invalidate()

    async def invoke(self, *, tenant: str, name: str, tag: str = "", method: str = "POST", path: str = "/",
                     headers: list[tuple[str, str]] | None = None, body: bytes = b"", trigger: str = "async",
                     invocation_id=None) -> InvokeResult:
        from functions.engines.local.invoke import invoke

        return await invoke(self, tenant=tenant, name=name, tag=tag, method=method, path=path, headers=headers,
                            body=body, trigger=trigger, invocation_id=invocation_id)

    def sync_triggers(self, function: FunctionRef, triggers: list[dict], *, policy=None) -> None:
        """Nothing to do: the delivery worker reads cron and event triggers from the database."""

    def sync_sequence(self, tenant: str, name: str, functions: list[str] | None, *, policy=None) -> None:
        """Nothing to do: the delivery worker runs sequences from the database."""

    # The instances' output reader stores every log line as it is written (records.py).
    log_pull_seconds = 0.0

    def pull_logs(self) -> int:
        """Nothing to pull: log lines reach the log store by themselves on this engine."""
        return 0

    def status(self, function: FunctionRef) -> FunctionStatus:
        self.routes.refresh(force=True)
        route = self.routes.routes.get((function.tenant, function.name))
        url = f"{settings.NIMBUS_PUBLIC_URL}/fn/{function.tenant}/{function.name}/"
        pools = {p.spec.number: p for p in self._pools_of(function.function_id)}
        revisions = []
        for target in (route.targets if route else []):
            pool = pools.get(target.revision)
            revisions.append(RevisionStatus(
                revision=target.revision, ready=True, percent=target.percent, tag=target.tag,
                instances=pool.snapshot()["instances"] if pool else 0,
                url=f"{settings.NIMBUS_PUBLIC_URL}/fn/{function.tenant}/{function.name}@{target.tag}/"
                if target.tag else url))
        ready = bool(route and any(t.percent for t in route.targets)) and not (route and route.offline)
        latest = max((t.revision for t in route.targets), default=None) if route else None
        return FunctionStatus(ready=ready, url=url if ready else None, latest_ready_revision=latest,
                              revisions=revisions, offline=bool(route and route.offline),
                              message="" if ready else "Not serving.")

    def logs(self, function: FunctionRef, *, revision: int | None = None, since: datetime | None = None,
             follow: bool = False, limit: int = 500) -> Iterator[LogLine]:
        key = self._log_key(function.function_id)

        def matching(lines):
            for line in lines:
                if revision is not None and line.revision != revision:
                    continue
                if since is not None and line.time <= since:
                    continue
                yield line

        started = datetime.now(dt_timezone.utc)
        lines = list(matching(list(self.log_buffers.get(key, ()))))[-limit:]
        if not lines:
            # Nothing in memory (the portal restarted, or another process served): the stored lines.
            lines = self._stored_logs(function, revision, since, limit)
        yield from lines
        if not follow:
            return
        last = lines[-1].time if lines else (since or started)
        while not self.stopped:
            with self.log_changed:
                self.log_changed.wait(timeout=1.0)
            fresh = [line for line in matching(list(self.log_buffers.get(key, ()))) if line.time > last]
            if fresh:
                last = fresh[-1].time
                yield from fresh

    def _stored_logs(self, function: FunctionRef, revision: int | None, since: datetime | None,
                     limit: int) -> list[LogLine]:
        from functions.models import InvocationLog

        rows = InvocationLog.objects.filter(invocation__function_id=function.function_id)
        if revision is not None:
            rows = rows.filter(invocation__revision__number=revision)
        if since is not None:
            rows = rows.filter(time__gt=since)
        rows = rows.order_by("-time", "-id").values_list("time", "level", "message", "invocation_id",
                                                         "invocation__revision__number", "invocation__instance")
        return [LogLine(time=when, message=message, level=level, revision=number, invocation_id=str(invocation_id),
                        instance=instance or None)
                for when, level, message, invocation_id, number, instance in reversed(rows[:limit])]

    # ---- pools ----------------------------------------------------------------------------------------

    def _log_key(self, function_id: int) -> str:
        return str(function_id)

    def _pools_of(self, function_id: int) -> list[Pool]:
        with self.pools_lock:
            return [p for p in self.pools.values() if p.spec.function.function_id == function_id]

    def _drop_pool(self, pool: Pool, retire: bool = True) -> None:
        with self.pools_lock:
            if self.pools.get(pool.spec.revision_id) is pool:
                del self.pools[pool.spec.revision_id]
        if retire:
            pool.retire()
        else:
            pool.close()

    def _retire_unrouted_revisions(self, routes: dict) -> None:
        """Stop the pools of revisions the database no longer routes to (after a grace period, so that
        a revision being deployed is not stopped before its traffic is written)."""
        routed = {t.revision_id for route in routes.values() if not route.offline for t in route.targets}
        newest = {}
        for route in routes.values():
            newest[route.function_id] = max(t.revision for t in route.targets)
        now = time.monotonic()

        def unrouted(pool: Pool) -> bool:
            if pool.spec.revision_id in routed:
                return False
            being_deployed = pool.spec.number > newest.get(pool.spec.function.function_id, 0)
            return not being_deployed or now - pool.created_at > UNROUTED_GRACE_SECONDS

        with self.pools_lock:
            stale = [p for p in self.pools.values() if unrouted(p)]
        for pool in stale:
            self._drop_pool(pool)

    def _retire_unrouted(self, function: FunctionRef, traffic: list[TrafficSpec]) -> None:
        routed = {t.revision for t in traffic}
        for pool in self._pools_of(function.function_id):
            if pool.spec.number not in routed:
                self._drop_pool(pool)

    def code_dir(self, spec: RevisionSpec) -> Path:
        return self.code_root / spec.function.tenant / spec.function.name / f"{spec.number}-{spec.content_hash[:12]}"

    def _write_code(self, spec: RevisionSpec) -> Path:
        target = self.code_dir(spec)
        self._tenant_dir(self.code_root, spec)
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        for path, content in spec.files.items():
            file = work / path
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(content)
            os.chmod(file, 0o644)
        for folder in [work, *[p for p in work.rglob("*") if p.is_dir()]]:
            os.chmod(folder, 0o755)
        try:
            os.rename(work, target)
        except OSError:  # another process prepared the same revision first
            shutil.rmtree(work, ignore_errors=True)
        return target

    def _new_pool(self, spec: RevisionSpec, deps_path: Path | None) -> Pool:
        code_dir = self._write_code(spec)
        layout = sandbox.Layout(code_dir=code_dir, deps_dir=deps_path, sandboxed=self.sandbox_mode == "bwrap",
                                runtime_dir=self.runtime_dir)
        return Pool(spec=spec, layout=layout, socket_dir=self.socket_root / str(spec.revision_id),
                    isolation=self.isolation(spec), settings=self.settings,
                    on_log=lambda record, s=spec: self._on_log(s, record), use_zygote=self.use_zygote,
                    cpu_throttle=self.cpu_throttle)

    def pool_for(self, revision_id: int) -> Pool | None:
        with self.pools_lock:
            pool = self.pools.get(revision_id)
        if pool is not None and not pool.closed and not pool.retired:
            return pool
        return None

    def prepare(self, revision_id: int) -> Pool:
        """The pool of a ready revision, prepared from the database if this process has none yet
        (after a restart, or a deploy done by another process)."""
        pool = self.pool_for(revision_id)
        if pool is not None:
            return pool
        with self.prepare_locks[revision_id]:
            pool = self.pool_for(revision_id)
            if pool is not None:
                return pool
            from functions.models import Revision
            from functions.services import revision_spec

            revision = Revision.objects.select_related("function__tenant__quota").get(
                pk=revision_id, status=Revision.Status.READY)
            spec = revision_spec(revision)
            result = ensure_deps(spec.runtime, spec.files, self._tenant_dir(self.deps_root, spec), self.installer,
                                 self.isolation(spec))
            pool = self._new_pool(spec, result.path)
            pool.start()
            with self.pools_lock:
                self.pools[revision_id] = pool
            self._ensure_upkeep()
            return pool

    # ---- logs ------------------------------------------------------------------------------------------

    def _on_log(self, spec: RevisionSpec, record: dict) -> None:
        try:
            when = datetime.fromisoformat(record["time"]) if record.get("time") else datetime.now(dt_timezone.utc)
        except (TypeError, ValueError):
            when = datetime.now(dt_timezone.utc)
        level = str(record.get("level") or "INFO").upper()
        message = str(record.get("message", ""))
        invocation_id = record.get("invocation_id") or None
        line = LogLine(time=when, message=message, level=level, revision=spec.number,
                       invocation_id=invocation_id, instance=record.get("instance"))
        self.log_buffers[self._log_key(spec.function.function_id)].append(line)
        with self.log_changed:
            self.log_changed.notify_all()
        if invocation_id:
            self.records.add_log(invocation_id, when, level, message)

    # ---- upkeep and shutdown ---------------------------------------------------------------------

    def _ensure_upkeep(self) -> None:
        if self.upkeep_thread is None or not self.upkeep_thread.is_alive():
            self.upkeep_thread = threading.Thread(target=self._upkeep_loop, name="nimbus-upkeep", daemon=True)
            self.upkeep_thread.start()

    def _upkeep_loop(self) -> None:
        last_route_check = time.monotonic()
        while not self.stopped:
            time.sleep(UPKEEP_INTERVAL)
            with self.pools_lock:
                pools = list(self.pools.values())
            if pools and time.monotonic() - last_route_check > ROUTE_CHECK_SECONDS:
                # Without requests nobody reloads routes: check now and then that pools are still routed.
                last_route_check = time.monotonic()
                try:
                    with_own_connection(self.routes.refresh)
                except Exception:  # noqa: BLE001 - the database may be briefly unavailable; try later
                    log.warning("could not reload the route table", exc_info=True)
            for pool in pools:
                try:
                    pool.upkeep(self.idle_seconds)
                except Exception:  # noqa: BLE001 - one pool's trouble must not stop the others' upkeep
                    log.exception("upkeep of %s failed", pool.spec)

    def shutdown(self) -> None:
        """Stop every instance and fork server, and write the pending records."""
        if self.stopped:
            return
        self.stopped = True
        with self.pools_lock:
            pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            pool.close()
        if self.cpu_throttle is not None:
            self.cpu_throttle.close()  # no instance is left stopped, whatever happened to its pool
        with self.log_changed:
            self.log_changed.notify_all()
        self.records.stop()
        self.resources.close()
        shutil.rmtree(self.socket_root, ignore_errors=True)
