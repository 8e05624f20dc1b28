"""The portal's HTTP server: daphne, with request bodies bounded while they arrive.

Daphne's web layer stores a whole request body (in a temporary file past 100 KB) before the ASGI
application sees a byte of it, so a limit kept by the application alone would let a caller fill the
server's disk first. Here each request's body is counted as it arrives: a declared length over
``NIMBUS_MAX_BODY_BYTES``, or a streamed body that grows past it, is answered 413 in the API's error
shape (naming the limit) and the connection is closed a moment later; nothing past the limit is stored.

Run it as daphne, with daphne's arguments: ``python -m portal.serve -b 0.0.0.0 -p 8000 portal.asgi:application``.
"""

from __future__ import annotations

import io
import json
import logging
import sys

from daphne import http_protocol
from daphne.cli import CommandLineInterface

logger = logging.getLogger("portal.serve")

# Seconds a refused request's connection stays open, its upload read and dropped, before it closes.
CLOSE_AFTER_SECONDS = 1.0


def body_limit() -> int:
    from django.conf import settings

    return settings.NIMBUS_MAX_BODY_BYTES


def refusal(limit: int) -> bytes:
    """The raw 413 answer: the request line is not read yet, so it is written to the socket as is."""
    from portal.errors import BodyTooLarge

    body = json.dumps(BodyTooLarge(limit).as_dict()).encode()
    head = (b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n")
    return head + body


class BoundedRequest(http_protocol.WebRequest):
    """Daphne's request, refusing a body over the limit before it is stored."""

    refused = False
    received = 0
    limit = 0

    def gotLength(self, length):
        self.limit = body_limit()
        if length is not None and length > self.limit:
            self.refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.refused:
            return
        self.received += len(data)
        if self.received > self.limit:
            self.refuse()
            return
        super().handleContentChunk(data)

    def refuse(self) -> None:
        self.refused = True
        self.content = io.BytesIO()  # empty, and stays so: later chunks are dropped
        # Twisted answers "Expect: 100-continue" after gotLength: the client must not be told to go on.
        self.requestHeaders.removeHeader(b"expect")
        self.channel.transport.write(refusal(self.limit))
        logger.info("refused a body over %d bytes from %s", self.limit, self.channel.transport.getPeer())
        # Closed a moment later, not at once: closing with the client's upload unread makes the kernel
        # reset the connection, which can lose the answer on its way. Meanwhile what comes is dropped.
        from twisted.internet import reactor  # daphne's (asyncio) reactor, installed when daphne loads

        reactor.callLater(CLOSE_AFTER_SECONDS, self.channel.loseConnection)

    def process(self):
        if self.refused:
            return  # answered already, and the connection is closing
        super().process()

    def requestReceived(self, command, path, version):
        if self.refused:
            return
        super().requestReceived(command, path, version)


def main(argv: list[str] | None = None) -> None:
    # Daphne's factory builds each request from this module attribute.
    http_protocol.WebRequest = BoundedRequest
    CommandLineInterface().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
