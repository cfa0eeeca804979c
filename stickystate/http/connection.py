"""One client connection of an httptools front: HTTP/1.1 on an asyncio Protocol.

Requests are parsed as they arrive (pipelining allowed) and answered strictly in order by
one task, which exists while there is something to answer. Bodies are read whole (chunked
ones de-chunked; over ``max_request_bytes``: 413 and close), so a front may send them on
again (a retry on another node). Malformed requests get a 400 and the connection is closed
after the answers before it; so does a request line or header over ``max_line_bytes`` or
more than ``max_headers`` headers, where the front sets those (the node does: aiohttp's
limits, so both of its fronts refuse the same requests). Keep-alive follows the client's
HTTP version and ``Connection`` header; ``Expect: 100-continue`` is answered once the
answers before it are out. The front (stickystate/http/front.py) answers each request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httptools

from stickystate.http.stream import Streaming
from stickystate.http.wire import Header, Reply, error_reply

if TYPE_CHECKING:
    from stickystate.http.front import Front

log = logging.getLogger("stickystate.http")

MAX_PIPELINE = 32  # requests read ahead of the one being answered before reading pauses
LINGER_S = 2.0  # after a last answer, how long to keep reading (and dropping) what the client still sends
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class FrontLimits:
    """What a connection refuses: a body over ``max_request_bytes`` (413), a head over
    ``max_head_bytes``, a request line or one header over ``max_line_bytes``, more than
    ``max_headers`` headers (400; None: no such limit). Idle keep-alive connections are
    closed after ``keepalive_timeout_s``."""

    max_request_bytes: int
    max_head_bytes: int = 64 * 1024
    keepalive_timeout_s: float = 75.0
    max_line_bytes: int | None = None
    max_headers: int | None = None


class StopParsing(Exception):
    """Raised from a parser callback to stop parsing this connection (already answered)."""


class Incoming:
    """One parsed client request (or, with ``refusal``, the answer to a broken one)."""

    __slots__ = ("method", "target", "headers", "body", "size", "keep_alive", "http10", "has_host", "refusal")

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.headers: list[Header] = []
        self.body: list[bytes] = []
        self.size = 0
        self.keep_alive = True
        self.http10 = False
        self.has_host = False
        self.refusal: Reply | None = None



class ClientConnection(asyncio.Protocol):
    def __init__(self, front: Front) -> None:
        self.front = front
        self.limits: FrontLimits = front.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.last_active = time.monotonic()
        self._current: Incoming | None = None
        self._head_bytes = 0  # size of the current request's head so far (-1: head complete)
        self._began_in_read = False
        self._queue: deque[Incoming] = deque()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False  # no more requests are parsed (error, Connection: close, shutdown)
        self._lost = False
        self._reading_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._continue_wanted = False
        self._eof = False
        self._answering = False  # the serving task is working on the queue's first request
        self._waiting: asyncio.Future[None] | None = None  # the serving task waits for a request
        self._pump: asyncio.Task[None] | None = None  # a streamed answer's pump (cancelled when the client goes)

    @property
    def streaming(self) -> bool:
        """A streamed answer is being written (it ends when the connection closes)."""
        return self._pump is not None

    @property
    def idle(self) -> bool:
        return not self._answering and self._current is None and not self._queue

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._stopped = True
        self._queue.clear()  # nobody to answer; an exchange in progress finishes on its own
        self.front.connections.discard(self)
        if self._pump is not None:
            self._pump.cancel()
        for fut in (self._writable, self._waiting):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def eof_received(self) -> bool:
        """The client will send nothing more: answer what came complete, then close."""
        self._stopped = True
        self._eof = True
        self._current = None
        if self._pump is not None:
            self._pump.cancel()  # a streamed answer: the client that ends its side is gone
            return False
        if not self._answering and not self._queue:
            return False  # the transport closes
        if self._queue:
            self._queue[-1].keep_alive = False
        return True  # keep our side open for the answers

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        self.last_active = time.monotonic()
        self._began_in_read = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade (h2c, websocket) we do not do: the request was answered as plain
            # HTTP/1.1 (it is queued); what follows on this connection is not HTTP/1.1.
            self._stop_after_queue()
        except httptools.HttpParserError as exc:
            if not self._stopped:  # else a callback stopped it on purpose (StopParsing)
                self.refuse(error_reply(400, code="bad_request", message=f"malformed HTTP request: {exc}"))
        if self._current is not None and self._head_bytes >= 0 and not self._began_in_read and not self._stopped:
            # Still inside a head that began in an earlier read: all of this read is head.
            # (on_header counts finished headers; this bounds a header that never ends.)
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self.refuse(error_reply(400, code="bad_request", message="request head too large"))
        if len(self._queue) >= MAX_PIPELINE and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    # -- httptools callbacks (a StopParsing raised here ends parsing: see data_received) ------
    def _req(self) -> Incoming:
        if self._stopped or self._current is None:
            raise StopParsing
        return self._current

    def on_message_begin(self) -> None:
        if self._stopped:
            raise StopParsing
        self._current = Incoming()
        self._head_bytes = 0
        self._began_in_read = True

    def on_url(self, url: bytes) -> None:
        req = self._req()
        req.target += url
        self._count_head(len(url))
        line_limit = self.limits.max_line_bytes
        if line_limit is not None and len(req.target) > line_limit:
            self.refuse(error_reply(400, code="bad_request", message="request line too long"))
            raise StopParsing

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req()
        req.headers.append((name, value))
        self._count_head(len(name) + len(value) + 4)
        if len(name) == 4 and name.lower() == b"host":
            req.has_host = True
        elif len(name) == 14 and name.lower() == b"content-length":
            if value.isdigit() and int(value) > self.limits.max_request_bytes:
                self._too_large()
        elif len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self._continue_wanted = True
        limits = self.limits
        if ((limits.max_line_bytes is not None and max(len(name), len(value)) > limits.max_line_bytes)
                or (limits.max_headers is not None and len(req.headers) > limits.max_headers)):
            self.refuse(error_reply(400, code="bad_request", message="request header too long, or too many"))
            raise StopParsing

    def on_headers_complete(self) -> None:
        req = self._req()
        self._head_bytes = -1
        req.method = self.parser.get_method()
        req.http10 = self.parser.get_http_version() == "1.0"
        if req.http10:
            self._continue_wanted = False
        elif not req.has_host:  # RFC 9112 3.2: a 1.1 request without Host is a 400
            self.refuse(error_reply(400, code="bad_request", message="HTTP/1.1 request without a Host header"))
            raise StopParsing
        self._maybe_continue()

    def on_body(self, body: bytes) -> None:
        req = self._req()
        req.size += len(body)
        if req.size > self.limits.max_request_bytes:
            self._too_large()
        req.body.append(body)

    def on_message_complete(self) -> None:
        req = self._req()
        self._current = None
        req.keep_alive = self.parser.should_keep_alive() and not self.front.closing
        self._continue_wanted = False
        self._enqueue(req)
        if not req.keep_alive:
            self._stopped = True  # answer what came before and this, then close

    def _count_head(self, n: int) -> None:
        if self._head_bytes < 0:  # trailers of a chunked body: they count as body
            req = self._req()
            req.size += n
            if req.size > self.limits.max_request_bytes:
                self._too_large()
            return
        self._head_bytes += n
        if self._head_bytes > self.limits.max_head_bytes:
            self.refuse(error_reply(400, code="bad_request", message="request head too large"))
            raise StopParsing

    # -- answering ---------------------------------------------------------------------
    def _enqueue(self, req: Incoming) -> None:
        self._queue.append(req)
        waiting = self._waiting
        if waiting is not None:
            self._waiting = None
            waiting.set_result(None)
        elif self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def refuse(self, reply: Reply) -> None:
        """Answer ``reply`` after the requests before it, then close; parse nothing more."""
        self._stopped = True
        self._current = None
        req = Incoming()
        req.refusal = reply
        req.keep_alive = False
        self._enqueue(req)

    def _too_large(self) -> None:
        limit = self.limits.max_request_bytes
        self.refuse(error_reply(413, code="too_large", message=f"request body over {limit} bytes",
                                 limit="max_body_bytes"))
        raise StopParsing

    def _stop_after_queue(self) -> None:
        self._stopped = True
        if self._queue:
            self._queue[-1].keep_alive = False
        else:
            self.close()

    def _maybe_continue(self) -> None:
        """100 Continue for a client waiting to send its body, once the answers to its
        earlier requests are out (never in the middle of them)."""
        if self._continue_wanted and self._current is not None and not self._answering and not self._queue:
            self._continue_wanted = False
            if self.transport is not None and not self._lost:
                self.transport.write(_CONTINUE)

    async def _serve(self) -> None:
        """Answer queued requests in order; between requests, wait for the next one (one
        future per request, cheaper than a task per request)."""
        loop = asyncio.get_running_loop()
        try:
            while not self._lost:
                if not self._queue:
                    if self._stopped:
                        break
                    self.last_active = time.monotonic()
                    self._answering = False
                    if self.front.closing:
                        self.close()
                        break
                    self._maybe_continue()
                    self._waiting = loop.create_future()
                    await self._waiting
                    continue
                self._answering = True
                req = self._queue[0]
                data = await self.front.answer(req)
                if self._lost or self.transport.is_closing():  # type: ignore[union-attr] # gone, or closed by drain()
                    if isinstance(data, Streaming) and data.discard is not None:
                        data.discard()
                    break
                self._queue.popleft()
                if isinstance(data, Streaming):
                    await self._stream(data, req)
                    break
                self.transport.writelines(data)  # type: ignore[union-attr]
                if not req.keep_alive:
                    self._close_after_answer()
                    break
                if self._writable is not None:
                    await self._writable
                if self._reading_paused and len(self._queue) < MAX_PIPELINE // 2 and not self._lost:
                    self._reading_paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
        finally:
            self._task = None
            self._waiting = None
            self._answering = False

    # -- streamed answers (stickystate/http/stream.py) ----------------------------------
    def send(self, data: bytes) -> None:
        if not self._lost and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def paused(self) -> bool:
        return self._writable is not None

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("client gone")
        if self._writable is not None:
            await self._writable
            if self._lost:
                raise ConnectionResetError("client gone")

    async def _stream(self, answer: Streaming, req: Incoming) -> None:
        """Write a streamed answer's head, run its pump, then close: the body ends with the
        connection. Nothing after it on this connection is answered."""
        self._stopped = True
        self._queue.clear()
        self.send(answer.head())
        self._pump = asyncio.get_running_loop().create_task(answer.pump(self))
        try:
            await asyncio.wait({self._pump})
            failed = None if self._pump.cancelled() else self._pump.exception()
            if failed is not None and not isinstance(failed, ConnectionError):
                log.error("stream failed", exc_info=failed)
        finally:
            self._pump = None
            self.close()

    def _close_after_answer(self) -> None:
        """Half-close, then linger: closing while the client's unread bytes (the rest of a
        refused body, pipelined requests after a Connection: close) sit in our receive
        buffer would send it a reset that can destroy the answer before it reads it."""
        self._stopped = True
        tr = self.transport
        if tr is None or self._eof or not tr.can_write_eof():
            self.close()
            return
        tr.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            tr.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_S, self.close)

    def close(self) -> None:
        self._stopped = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
