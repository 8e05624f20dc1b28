"""The Nimbus Python runtime shim: serves a function's ``handle(event, context)`` over HTTP.

Standard library only, so it runs unchanged in the local engine's sandbox (unix socket,
``NIMBUS_SOCKET``) and as the entrypoint of the runtime image on Knative (``PORT``).
Log lines are JSON objects on stdout, tagged with the invocation they belong to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import datetime
import importlib
import inspect
import json
import logging
import os
import random
import socket
import sys
import threading
import time
import traceback
import urllib.parse

sys.dont_write_bytecode = True

# The shim is the process's entrypoint: its import time is the instance's start when the kernel
# cannot say when the process began (see _process_started).
_IMPORTED_AT = time.monotonic()

MAX_LOG_MESSAGE = 16000
MAX_HEADER_BYTES = 64 * 1024
HEALTH_PATH = "/_nimbus/health"
RESPONSE_KEYS = {"status", "headers", "body"}

# The invocation the current task or handler thread works for; log lines and print() use it.
current_invocation: contextvars.ContextVar = contextvars.ContextVar("nimbus_invocation", default=None)

_out_lock = threading.Lock()
_out_fd = 1


def _hex_id(bits: int) -> str:
    """A unique (not secret) identifier; random reseeds itself in every forked instance."""
    return f"{random.getrandbits(bits):0{bits // 4}x}"


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def emit(level: str, message: str, **extra) -> None:
    """Write one structured log line on the real stdout."""
    invocation = current_invocation.get()
    if len(message) > MAX_LOG_MESSAGE:
        message = message[:MAX_LOG_MESSAGE] + f"... [{len(message) - MAX_LOG_MESSAGE} characters cut]"
    record = {
        "time": _now_iso(), "level": level, "message": message,
        "invocation_id": invocation.invocation_id if invocation else None,
        "function": os.environ.get("NIMBUS_FUNCTION", ""), "revision": os.environ.get("NIMBUS_REVISION", ""),
    }
    instance = os.environ.get("NIMBUS_INSTANCE")
    if instance:
        record["instance"] = instance
    record.update(extra)
    data = (json.dumps(record, default=str) + "\n").encode()
    with _out_lock:
        view = memoryview(data)
        while view:
            try:
                written = os.write(_out_fd, view)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            except OSError:
                return
            view = view[written:]


class _PrintCapture:
    """sys.stdout / sys.stderr replacement: each complete line becomes a log line."""

    def __init__(self, level: str):
        self.level = level
        self._partial = threading.local()
        self.encoding = "utf-8"

    def write(self, text) -> int:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        buffered = getattr(self._partial, "text", "") + text
        *lines, rest = buffered.split("\n")
        self._partial.text = rest
        for line in lines:
            emit(self.level, line, stream="stdout" if self.level == "INFO" else "stderr")
        return len(text)

    def flush(self) -> None:
        rest = getattr(self._partial, "text", "")
        if rest:
            self._partial.text = ""
            emit(self.level, rest)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return _out_fd


class _JsonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info))
            emit(record.levelname, message, logger=record.name)
        except Exception:  # noqa: BLE001 - a broken log call never breaks the handler
            self.handleError(record)


def configure_output() -> None:
    """Route print() and the logging module into structured lines (called once per process)."""
    global _out_fd
    _out_fd = os.dup(1)
    sys.stdout = _PrintCapture("INFO")
    sys.stderr = _PrintCapture("ERROR")
    root = logging.getLogger()
    root.handlers[:] = [_JsonLogHandler()]
    root.setLevel(logging.INFO)


# ---- the instance's cold start ---------------------------------------------------------------

def _process_started() -> float:
    """When this process began, on the time.monotonic() clock.

    The kernel's own start time (/proc/self/stat field 22, clock ticks since boot, which is
    CLOCK_BOOTTIME's origin), so the interpreter's start-up counts too, to a clock tick (10 ms);
    where /proc is missing or disagrees with this module's import time (no CLOCK_BOOTTIME, a
    foreign /proc), the import time of this module, which misses only the interpreter's start-up.
    """
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        # Fields after "(comm)" start at field 3; starttime is field 22.
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
        now = time.monotonic()
        if 0 <= _IMPORTED_AT - (now - age) < 60:
            return now - age
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return _IMPORTED_AT


class _InstanceStart:
    """This instance's cold start: when it began, how long until it could call its handler, and
    whether its first invocation has been answered yet (that one reports the cold start)."""

    def __init__(self, started: float):
        self.started = started
        self.init_ms: float | None = None
        self.pending = True

    def loaded(self) -> None:
        """The handler is loaded (or failed to): the init time ends here, once per instance."""
        if self.init_ms is None:
            self.init_ms = max(0.0, (time.monotonic() - self.started) * 1000)

    def take(self) -> float | None:
        """The init time to report with this invocation: only the instance's first one has it."""
        if not self.pending:
            return None
        self.pending = False
        self.loaded()
        return self.init_ms


instance_start = _InstanceStart(_process_started())


def _forked_instance() -> None:
    # A local-engine instance forked from the zygote (nimbus_zygote.py): the handler was imported
    # before the fork, so its start is the fork and its init ends when it starts serving, never the
    # zygote's age.
    global instance_start
    instance_start = _InstanceStart(time.monotonic())


os.register_at_fork(after_in_child=_forked_instance)


# ---- the function contract ------------------------------------------------------------------

class Event:
    """What the handler receives: the HTTP request, and a CloudEvent when one came in."""

    def __init__(self, method: str, path: str, query: dict, headers: dict, body: bytes, raw_query: str = ""):
        self.method = method
        self.path = path
        self.query = query
        self.raw_query = raw_query
        self.headers = headers
        self.body = body
        self.cloudevent = _cloudevent(headers, body)

    def json(self):
        return json.loads(self.body.decode("utf-8") if self.body else "null")

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self):
        return f"Event({self.method} {self.path})"


def _cloudevent(headers: dict, body: bytes) -> dict | None:
    content_type = headers.get("content-type", "")
    if content_type.startswith("application/cloudevents+json"):
        try:
            event = json.loads(body or b"{}")
        except ValueError:
            return None
        return event if isinstance(event, dict) and "type" in event else None
    if "ce-type" in headers and "ce-id" in headers:
        event = {name[3:]: value for name, value in headers.items() if name.startswith("ce-")}
        data: object = body
        if content_type.startswith("application/json") or content_type.endswith("+json"):
            try:
                data = json.loads(body or b"null")
            except ValueError:
                pass
        elif content_type.startswith("text/"):
            data = body.decode("utf-8", "replace")
        if content_type:
            event["datacontenttype"] = content_type
        event["data"] = data
        return event
    return None


class Context:
    """What the handler knows about its invocation."""

    def __init__(self, invocation_id: str, trace_id: str, parent_span: str, timeout: float):
        self.function = os.environ.get("NIMBUS_FUNCTION", "")
        self.revision = os.environ.get("NIMBUS_REVISION", "")
        self.tenant = os.environ.get("NIMBUS_TENANT", "")
        self.invocation_id = invocation_id
        self.trace_id = trace_id
        self.parent_span = parent_span
        self.span_id = _hex_id(64)
        self.memory_mb = int(os.environ.get("NIMBUS_MEMORY_MB", "0") or 0)
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.logger = logging.getLogger("function")
        self.spans: list[dict] = []

    def remaining_time(self) -> float:
        """Seconds left before the platform stops this invocation."""
        return max(0.0, self.deadline - time.monotonic())

    @property
    def remaining_ms(self) -> int:
        return int(self.remaining_time() * 1000)

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms

    @contextlib.contextmanager
    def span(self, name: str, **attributes):
        """Record a user-defined span; spans are reported with the invocation."""
        span = {"name": str(name), "span_id": _hex_id(64), "parent_id": self.span_id,
                "start": _now_iso(), "attributes": attributes}
        start = time.perf_counter()
        try:
            yield span
        except BaseException as exc:
            span["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            span["duration_ms"] = round((time.perf_counter() - start) * 1000, 3)
            self.spans.append(span)

    def __repr__(self):
        return f"Context({self.function}@{self.revision} {self.invocation_id})"


class Runtime:
    """The loaded handler (or why it failed to load) and how to call it."""

    def __init__(self):
        self.code_dir = os.environ.get("NIMBUS_CODE_DIR", "/var/nimbus/code")
        self.handler_name = os.environ.get("NIMBUS_HANDLER", "handler.handle")
        self.timeout = float(os.environ.get("NIMBUS_TIMEOUT_SECONDS", "30") or 30)
        self.debug = os.environ.get("NIMBUS_DEBUG", "") in ("1", "true", "yes")
        self.memory_mb = int(os.environ.get("NIMBUS_MEMORY_MB", "0") or 0)
        # With one request at a time (the platform enforces it), a sync handler runs on the server's
        # own thread: no thread hop per request, and no thread to start on an instance's first one.
        self.inline_sync = os.environ.get("NIMBUS_CONCURRENCY", "") == "1"
        self.handler = None
        self.is_async = False
        self.load_error: str | None = None
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None

    def load(self) -> None:
        deps = os.environ.get("NIMBUS_DEPS_DIR")
        for path in ([deps] if deps else []) + [self.code_dir]:
            if path and path not in sys.path:
                sys.path.insert(0, path)
        module_name, _, attr = self.handler_name.rpartition(".")
        try:
            module = importlib.import_module(module_name or "handler")
            handler = getattr(module, attr)
            if not callable(handler):
                raise TypeError(f"{self.handler_name} is not callable")
        except BaseException as exc:  # noqa: BLE001 - a broken handler must still answer health with why
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not isinstance(exc, SystemExit):
                raise
            self.load_error = "".join(traceback.format_exception(exc)).strip()
            emit("ERROR", f"could not import handler {self.handler_name}:\n{self.load_error}")
            instance_start.loaded()
            return
        self.handler = handler
        self.is_async = inspect.iscoroutinefunction(handler)
        instance_start.loaded()

    async def invoke(self, event: Event, context: Context) -> tuple[int, list[tuple[str, str]], bytes, str | None]:
        """Call the handler; (status, headers, body, error) where error is set when it failed."""
        if self.handler is None:
            return self._error(500, "The handler could not be imported.", self.load_error or "")
        try:
            if self.is_async:
                result = await self.handler(event, context)
            elif self.inline_sync:
                result = self.handler(event, context)
                if inspect.isawaitable(result):
                    result = await result
            else:
                if self.executor is None:
                    self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=64,
                                                                          thread_name_prefix="handler")
                call = contextvars.copy_context().run
                result = await asyncio.get_running_loop().run_in_executor(
                    self.executor, call, self.handler, event, context)
                if inspect.isawaitable(result):
                    result = await result
            status, headers, body = to_response(result)
            return status, headers, body, None
        except MemoryError:
            limit = f" of {self.memory_mb} MB" if self.memory_mb else ""
            message = f"The function ran out of memory (limit{limit}); the instance is restarted."
            emit("ERROR", message)
            status, headers, body, _ = self._error(500, message, "")
            headers = [(k, "memory" if k == "X-Nimbus-Error" else v) for k, v in headers]
            return status, headers, body, message
        except Exception as exc:  # noqa: BLE001 - the handler's own failure becomes a 500
            tb = "".join(traceback.format_exception(exc)).strip()
            emit("ERROR", f"handler raised {type(exc).__name__}: {exc}\n{tb}")
            return self._error(500, f"{type(exc).__name__}: {exc}", tb)

    def _error(self, status: int, message: str, tb: str):
        payload = {"error": "The function failed.", "invocation_id": current_invocation.get().invocation_id}
        if self.debug:
            payload["detail"] = message
            payload["traceback"] = tb
        body = json.dumps(payload).encode()
        return status, [("Content-Type", "application/json"), ("X-Nimbus-Error", "handler")], body, message


def _encode_body(body) -> tuple[bytes, str]:
    if body is None:
        return b"", "text/plain; charset=utf-8"
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body), "application/octet-stream"
    if isinstance(body, str):
        return body.encode("utf-8"), "text/plain; charset=utf-8"
    return json.dumps(body, default=str).encode("utf-8"), "application/json"


def to_response(result) -> tuple[int, list[tuple[str, str]], bytes]:
    """The handler's return value as an HTTP response."""
    if isinstance(result, dict) and "status" in result and set(result) <= RESPONSE_KEYS \
            and isinstance(result["status"], int):
        body, content_type = _encode_body(result.get("body"))
        headers = [(str(k), str(v)) for k, v in (result.get("headers") or {}).items()]
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers.append(("Content-Type", content_type))
        return int(result["status"]), headers, body
    body, content_type = _encode_body(result)
    return (200 if result is not None else 204), [("Content-Type", content_type)], body


# ---- HTTP/1.1 server --------------------------------------------------------------------------

class _Invocation:
    __slots__ = ("invocation_id",)

    def __init__(self, invocation_id: str):
        self.invocation_id = invocation_id


def _parse_traceparent(value: str | None) -> tuple[str, str]:
    parts = (value or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return parts[1], parts[2]
    return _hex_id(128), ""


REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 413: "Payload Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


class Server:
    def __init__(self, runtime: Runtime, on_fatal=None):
        self.runtime = runtime
        self.on_fatal = on_fatal or (lambda code: os._exit(code))
        self.max_body = int(os.environ.get("NIMBUS_MAX_BODY_BYTES", str(16 * 1024 * 1024)))

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                keep_alive = await self._one_request(reader, writer)
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _one_request(self, reader, writer) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            await self._write(writer, 400, [("Content-Type", "text/plain")], b"bad request line", False)
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        body = b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(chunks)
        elif headers.get("content-length"):
            length = int(headers["content-length"])
            if length > self.max_body:
                await self._write(writer, 413, [("Content-Type", "text/plain")], b"body too large", False)
                return False
            body = await reader.readexactly(length)
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        path, _, raw_query = target.partition("?")
        path = urllib.parse.unquote(path)
        if path == HEALTH_PATH:
            if self.runtime.load_error:
                payload = {"status": "error", "error": self.runtime.load_error}
                await self._write(writer, 500, [("Content-Type", "application/json")],
                                  json.dumps(payload).encode(), keep_alive)
            else:
                await self._write(writer, 200, [("Content-Type", "application/json")], b'{"status": "ok"}',
                                  keep_alive)
            return keep_alive
        status, out_headers, out_body = await self.invoke(method, path, raw_query, headers, body)
        fatal = ("X-Nimbus-Error", "memory") in out_headers
        await self._write(writer, status, out_headers, out_body, keep_alive and not fatal)
        if fatal:
            # Memory exhaustion can leave the interpreter in a bad state: start afresh.
            await writer.drain()
            self.on_fatal(137)
        return keep_alive

    async def invoke(self, method, path, raw_query, headers, body):
        invocation_id = headers.get("x-nimbus-invocation-id") or _hex_id(128)
        trace_id, parent = _parse_traceparent(headers.get("traceparent"))
        token = current_invocation.set(_Invocation(invocation_id))
        try:
            query = {k: v[0] if len(v) == 1 else v
                     for k, v in urllib.parse.parse_qs(raw_query, keep_blank_values=True).items()}
            event = Event(method, path, query, headers, body, raw_query)
            context = Context(invocation_id, trace_id, parent, self.runtime.timeout)
            init_ms = instance_start.take()  # before any await: one invocation alone is the first
            handler_started = time.perf_counter()
            status, out_headers, out_body, error = await self.runtime.invoke(event, context)
            handler_ms = (time.perf_counter() - handler_started) * 1000
            out_headers = list(out_headers)
            # What only the instance knows: the Knative engine records cold starts and queueing from these.
            out_headers.append(("X-Nimbus-Handler-Ms", f"{handler_ms:.3f}"))
            if init_ms is not None:
                out_headers += [("X-Nimbus-Cold-Start", "1"), ("X-Nimbus-Init-Ms", f"{init_ms:.3f}")]
            out_headers.append(("X-Nimbus-Invocation-Id", invocation_id))
            if context.revision:
                # Which revision answered: behind Knative's traffic split only the instance knows.
                out_headers.append(("X-Nimbus-Revision", context.revision))
            out_headers.append(("traceparent", f"00-{trace_id}-{context.span_id}-01"))
            if context.spans:
                spans = json.dumps(context.spans, default=str)
                emit("INFO", f"{len(context.spans)} span(s) recorded", spans=context.spans)
                if len(spans) < 8000:
                    out_headers.append(("X-Nimbus-Spans", spans))
            return status, out_headers, out_body
        finally:
            sys.stdout.flush()
            current_invocation.reset(token)

    async def _write(self, writer, status, headers, body, keep_alive) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        for name, value in headers:
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body)
        await writer.drain()


async def serve(runtime: Runtime, *, unix_path: str | None = None, port: int | None = None,
                listening_sock: socket.socket | None = None, on_listening=None) -> None:
    server_obj = Server(runtime)
    limit = MAX_HEADER_BYTES
    if listening_sock is not None:
        if listening_sock.family == socket.AF_UNIX:
            server = await asyncio.start_unix_server(server_obj.handle_connection, sock=listening_sock, limit=limit)
        else:
            server = await asyncio.start_server(server_obj.handle_connection, sock=listening_sock, limit=limit)
    elif unix_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(unix_path)
        server = await asyncio.start_unix_server(server_obj.handle_connection, path=unix_path, limit=limit)
    else:
        server = await asyncio.start_server(server_obj.handle_connection, host="0.0.0.0", port=port, limit=limit)
    # Ready to answer: a forked instance's init ends here (a shim started as the entrypoint ended
    # its init when the handler loaded).
    instance_start.loaded()
    if on_listening:
        on_listening()
    async with server:
        await server.serve_forever()


def _exit_on_stdin_eof() -> None:
    with contextlib.suppress(Exception):
        while sys.__stdin__.buffer.read(65536):
            pass
    os._exit(0)


def load_environment() -> None:
    """The function's own variables: the local engine hands them over inside the sandbox through an
    inherited file (NIMBUS_ENV_FD), never through the launcher's environment."""
    fd = os.environ.pop("NIMBUS_ENV_FD", None)
    if not fd:
        return
    with open(int(fd), "rb") as file:
        values = json.loads(file.read() or b"{}")
    os.environ.update({str(k): str(v) for k, v in values.items()})


def main() -> None:
    load_environment()
    configure_output()
    runtime = Runtime()
    runtime.load()
    if os.environ.get("NIMBUS_CHECK"):
        # The engine's deploy check: does the handler import?
        os._exit(0 if runtime.load_error is None else 1)
    socket_path = os.environ.get("NIMBUS_SOCKET")
    listen_fd = os.environ.pop("NIMBUS_LISTEN_FD", None)
    # The local engine binds the instance's socket itself and hands it over (nothing writable is shared).
    listening = socket.socket(fileno=int(listen_fd)) if listen_fd else None
    port = int(os.environ.get("PORT", "8080"))
    if (socket_path or listening) and sys.__stdin__ is not None and not sys.__stdin__.isatty():
        # In the local engine stdin is a pipe from the engine: when it closes, the engine is gone.
        threading.Thread(target=_exit_on_stdin_eof, daemon=True).start()
    where = "the engine's socket" if listening else socket_path or f"0.0.0.0:{port}"
    emit("INFO", f"serving {runtime.handler_name} on {where}")
    try:
        asyncio.run(serve(runtime, unix_path=socket_path, port=port, listening_sock=listening,
                          on_listening=lambda: emit("INFO", "listening", nimbus="ready")))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
