"""HTTP/1.1 to an instance over its unix socket: the gateway's async client (with keep-alive
connections per instance) and a blocking call for deploy health checks."""

from __future__ import annotations

import asyncio
import http.client
import socket

from functions.engines.local.instances import Instance

MAX_RESPONSE_HEAD = 64 * 1024


class InstanceGone(Exception):
    """The instance closed the connection without a complete response (it died)."""

    def __init__(self, message: str, *, before_request: bool = False):
        super().__init__(message)
        # Nothing reached the instance: the request can safely go to another one.
        self.before_request = before_request


async def _connection(inst: Instance):
    loop = asyncio.get_running_loop()
    while inst.idle_connections:
        try:
            owner, reader, writer = inst.idle_connections.pop()
        except IndexError:
            break
        if owner is loop and not writer.is_closing() and not reader.at_eof():
            return reader, writer
        if owner is loop:
            writer.close()
    return await asyncio.open_unix_connection(str(inst.socket_path), limit=MAX_RESPONSE_HEAD)


async def call(inst: Instance, method: str, target: str, headers: list[tuple[str, str]], body: bytes):
    """(status, headers, body) of one request to ``inst``. Raises InstanceGone if it dies."""
    try:
        reader, writer = await _connection(inst)
    except OSError as exc:
        raise InstanceGone(f"cannot connect: {exc}", before_request=True) from None
    head = [f"{method} {target} HTTP/1.1", "Host: instance"]
    head += [f"{name}: {value}" for name, value in headers]
    head.append(f"Content-Length: {len(body)}")
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + body)
        await writer.drain()
        status, response_headers, response_body, keep_alive = await _read_response(reader)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        writer.close()
        raise InstanceGone(f"{type(exc).__name__}: {exc}") from None
    except BaseException:
        writer.close()
        raise
    if keep_alive and inst.state != "dead":
        inst.idle_connections.append((asyncio.get_running_loop(), reader, writer))
    else:
        writer.close()
    return status, response_headers, response_body


async def _read_response(reader: asyncio.StreamReader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = []
    length = None
    keep_alive = True
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name, value = name.strip(), value.strip()
        lowered = name.lower()
        if lowered == "content-length":
            length = int(value)
        elif lowered == "connection":
            keep_alive = value.lower() != "close"
        else:
            headers.append((name, value))
    if length is None:
        body = await reader.read()
        keep_alive = False
    else:
        body = await reader.readexactly(length)
    return status, headers, body, keep_alive


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("instance", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def get_sync(inst: Instance, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """A blocking GET (health checks from deploy threads)."""
    connection = _UnixHTTPConnection(str(inst.socket_path), timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
