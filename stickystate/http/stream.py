"""Answers whose body is written as it comes (``Streaming``): a watch's Server-Sent
Events on a node, and the router's pipe of them to the client.

A front's ``answer`` returns either the bytes of a whole answer or a ``Streaming``; the
client connection (stickystate/http/connection.py) then writes its head, runs its
``pump`` with itself as the ``StreamSink``, and closes the connection when the pump
returns (the body ends with the connection: no Content-Length, no chunked framing, so
every hop can relay it as plain bytes). The pump is cancelled when the client goes.
Back-pressure: ``StreamSink.drain`` waits while the transport's buffer is over its
high-water mark, so a client that does not read stops its own pump, nobody else.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

from stickystate.http.wire import PHRASES, Header


class StreamSink(Protocol):
    """Where a pump writes: the client connection."""

    def send(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    @property
    def paused(self) -> bool:
        """The client's buffer is over its high-water mark (``drain`` would wait)."""
        ...


class Streaming:
    """A streamed answer: the status and headers (framing is added here), and the pump
    that writes the body to a ``StreamSink`` until it returns."""

    __slots__ = ("status", "headers", "pump", "request_id", "discard")

    def __init__(self, status: int, headers: Iterable[Header], pump: Callable[[StreamSink], Coroutine[Any, Any, None]]) -> None:
        self.status = status
        self.headers = list(headers)
        self.pump = pump
        self.request_id = b"-"  # set by the front that answers with it
        self.discard: Callable[[], None] | None = None  # called instead of the pump if the client went first

    def head(self) -> bytes:
        out = [b"HTTP/1.1 %d %s\r\n" % (self.status, PHRASES.get(self.status, b"OK"))]
        for name, value in self.headers:
            lname = name.lower()
            if lname in (b"connection", b"content-length", b"keep-alive", b"x-request-id", b"server"):
                continue
            out.append(name + b": " + value + b"\r\n")
        out.append(b"X-Request-Id: " + self.request_id + b"\r\nConnection: close\r\n\r\n")
        return b"".join(out)
