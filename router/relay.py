"""The router's front: HTTP/1.1 on asyncio Protocols, parsed with httptools.

Why not aiohttp here: for a proxy, building an aiohttp ``Request`` and a client request
and parsing the answer back into a ``Response`` cost about 0.4 ms of CPU per request,
several times the extra hop itself. Here a request costs one C parse of the head, one
pass over its headers (router/forward.py) and a join; the node's answer is parsed only
far enough to know where it ends and which headers to drop, and relayed.

Per client connection: requests are parsed as they arrive (pipelining allowed) and
answered strictly in order by one task, which exists while there is something to answer.
Bodies are read whole before forwarding (chunked ones de-chunked; over
``max_request_bytes``: 413 and close), so a retry can send them again. Malformed requests
get a 400 and the connection is closed after the answers before it. Keep-alive follows
the client's HTTP version and ``Connection`` header.

Session requests (``POST /v1/sessions``, ``/v1/sessions/{id}...``) are checked here
(API key, rate limit: router/auth.py), forwarded by router/forward.py, and counted in
the router's metrics. Every other request is relayed as it came to the router's aiohttp
app (its own endpoints, 404s, 405s; it checks and counts those itself) over a private
Unix socket: one listening port for clients, one implementation of those endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httptools
from aiohttp import web

from stickystate.router.auth import Gate
from stickystate.router.forward import (HOP_BY_HOP, Forwarder, HeaderScan, error_reply, is_session_request, new_request_id,
                            prepare, _str)
from stickystate.router.metrics import RouterMetrics
from stickystate.router.settings import RouterSettings
from stickystate.router.upstream import Header, Reply, UpstreamError, UpstreamPool
from stickystate import logs

log = logging.getLogger("stickystate.router")

MAX_PIPELINE = 32  # requests read ahead of the one being answered before reading pauses
LINGER_S = 2.0  # after a last answer, how long to keep reading (and dropping) what the client still sends
# Dropped from every answer relayed to a client: framing and connection management are
# this hop's own; X-Request-Id is re-added (the same value); no Server header (no version
# disclosure, fewer bytes).
_REPLY_DROPPED = frozenset(h.encode() for h in HOP_BY_HOP - {"date"} | {"x-request-id"})
# Dropped from requests relayed to the router's own app (the rest goes as the client sent it).
_LOCAL_DROPPED = frozenset(h.encode() for h in HOP_BY_HOP - {"host", "date", "server"} | {"x-request-id"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Stop(Exception):
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


DRAIN_TIMEOUT_S = 10.0  # on shutdown: how long requests in progress may take to finish
SWEEP_INTERVAL_S = 5.0  # how often idle keep-alive connections are looked at


class Front:
    """What the connections of one httptools front share, the router's (RelayFront) or a
    node's (node/fastpath.py): the connections themselves, the local app they relay to,
    request metrics, the keep-alive sweep and the drain on shutdown. A subclass sets
    ``settings`` (``keepalive_timeout_s`` and the request limits ClientConnection reads)
    and ``metrics`` (``requests`` and ``latency`` labelled by one name and the status),
    and answers requests (``answer``)."""

    settings: Any
    metrics: Any

    def __init__(self, local: UpstreamPool) -> None:
        self.local = local
        self.connections: set[ClientConnection] = set()
        self.closing = False
        # prometheus children per (label, status): labels() per request is a lookup and a lock
        self._counted: dict[tuple[str, int], tuple[Any, Any]] = {}

    async def answer(self, req: Incoming) -> Sequence[bytes]:
        raise NotImplementedError

    def _count(self, label: str, status: int, elapsed_s: float) -> None:
        children = self._counted.get((label, status))
        if children is None:
            children = self._counted[(label, status)] = (self.metrics.requests.labels(label, str(status)),
                                                         self.metrics.latency.labels(label))
        counter, histogram = children
        counter.inc()
        histogram.observe(elapsed_s)

    def sweep(self, now: float) -> None:
        """Close keep-alive connections idle longer than the keep-alive timeout."""
        limit = self.settings.keepalive_timeout_s
        for conn in list(self.connections):
            if conn.idle and now - conn.last_active > limit:
                conn.close()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests; let those in progress finish (up to timeout_s), then close."""
        self.closing = True
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()


async def local_app_pool(runner: web.AppRunner, app_socket: str, name: str) -> UpstreamPool:
    """Start ``runner``'s aiohttp app on a Unix socket; the pool of connections to it."""
    await web.UnixSite(runner, app_socket).start()
    loop = asyncio.get_running_loop()

    def open_local(factory):  # type: ignore[no-untyped-def]
        return loop.create_unix_connection(factory, app_socket)

    return UpstreamPool(name, open_local)


@asynccontextmanager
async def serving_front(front: Front, connection: Callable[[Any], ClientConnection], host: str, port: int,
                        backlog: int) -> AsyncIterator[asyncio.Server]:
    """Listen on host:port with ``connection(front)`` per client until the block ends; then
    stop accepting, drain the front's connections and close its local pool."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: connection(front), host, port, reuse_address=True, backlog=backlog)
    sweeper = asyncio.create_task(_sweep(front), name="front-keepalive-sweep")
    try:
        yield server
    finally:
        server.close()
        await front.drain(DRAIN_TIMEOUT_S)
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        front.local.close()


async def _sweep(front: Front) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        front.sweep(time.monotonic())


class RelayFront(Front):
    """What every client connection shares: settings, checks, forwarder, metrics."""

    def __init__(self, settings: RouterSettings, gate: Gate, forwarder: Forwarder, metrics: RouterMetrics,
                 local: UpstreamPool) -> None:
        super().__init__(local)
        self.settings = settings
        self.gate = gate
        self.forwarder = forwarder
        self.metrics = metrics

    async def answer(self, req: Incoming) -> Sequence[bytes]:
        """The bytes of the answer to ``req``."""
        if req.refusal is not None:
            return _render(req.refusal, req, HeaderScan(req.headers).request_id or new_request_id())
        method = req.method
        started = time.perf_counter()
        scan = HeaderScan(req.headers)
        rid = scan.request_id or new_request_id()
        token = logs.request_id.set(rid.decode("latin-1"))
        try:
            if not is_session_request(method, req.target):
                return _render(await self._relay_local(req, rid), req, rid)
            reply = await self._forward(req, scan, rid)
            self._count(method.decode("latin-1"), reply.status, time.perf_counter() - started)
            return _render(reply, req, rid)
        except Exception:
            log.exception("unhandled error", extra={"path": _str(req.target)})
            return _render(error_reply(500, code="internal", message="internal error"), req, rid)
        finally:
            logs.request_id.reset(token)

    async def _forward(self, req: Incoming, scan: HeaderScan, rid: bytes) -> Reply:
        tenant, refusal = self.gate.admit(_str(scan.authorization), _str(scan.api_key), time.monotonic())
        if refusal is not None:
            if refusal.status == 429:
                self.metrics.rate_limited.inc()
            return error_reply(refusal.status, code=refusal.code, message=refusal.message, headers=refusal.headers)
        body = req.body[0] if len(req.body) == 1 else b"".join(req.body)
        out = prepare(req.method, req.target, scan, body, tenant=tenant, request_id=rid,
                      internal_lines=self.forwarder.internal_lines, partitions=self.settings.partitions)
        if isinstance(out, Reply):
            return out
        return await self.forwarder.forward(out)

    async def _relay_local(self, req: Incoming, rid: bytes) -> Reply:
        """To the router's aiohttp app, as the client sent it (it does its own checks)."""
        body = b"".join(req.body)
        head = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
        for name, value in req.headers:
            if name.lower() not in _LOCAL_DROPPED:
                head += (name, b": ", value, b"\r\n")
        if not req.has_host:  # HTTP/1.0 may leave it out; aiohttp wants one
            head.append(b"Host: router\r\n")
        head.append(b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n" % (rid, len(body)))
        try:
            reply = await self.local.exchange((b"".join(head), body), head_request=req.method == b"HEAD",
                                              timeout_s=self.settings.request_timeout_s)
        except UpstreamError as exc:
            log.error("router app unreachable", extra={"reason": exc.detail})
            reply = error_reply(503, code="unavailable", message="router busy", headers=(("Retry-After", "1"),))
        return reply


class ClientConnection(asyncio.Protocol):
    def __init__(self, front: Front) -> None:
        self.front = front
        self.settings = front.settings
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
        for fut in (self._writable, self._waiting):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def eof_received(self) -> bool:
        """The client will send nothing more: answer what came complete, then close."""
        self._stopped = True
        self._eof = True
        self._current = None
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
            if not self._stopped:  # else a callback stopped it on purpose (_Stop)
                self._refuse(error_reply(400, code="bad_request", message=f"malformed HTTP request: {exc}"))
        if self._current is not None and self._head_bytes >= 0 and not self._began_in_read and not self._stopped:
            # Still inside a head that began in an earlier read: all of this read is head.
            # (on_header counts finished headers; this bounds a header that never ends.)
            self._head_bytes += len(data)
            if self._head_bytes > self.settings.max_head_bytes:
                self._refuse(error_reply(400, code="bad_request", message="request head too large"))
        if len(self._queue) >= MAX_PIPELINE and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    # -- httptools callbacks (a _Stop raised here ends parsing: see data_received) ------
    def _req(self) -> Incoming:
        if self._stopped or self._current is None:
            raise _Stop
        return self._current

    def on_message_begin(self) -> None:
        if self._stopped:
            raise _Stop
        self._current = Incoming()
        self._head_bytes = 0
        self._began_in_read = True

    def on_url(self, url: bytes) -> None:
        self._req().target += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req()
        req.headers.append((name, value))
        self._count_head(len(name) + len(value) + 4)
        if len(name) == 4 and name.lower() == b"host":
            req.has_host = True
        elif len(name) == 14 and name.lower() == b"content-length":
            if value.isdigit() and int(value) > self.settings.max_request_bytes:
                self._too_large()
        elif len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self._continue_wanted = True

    def on_headers_complete(self) -> None:
        req = self._req()
        self._head_bytes = -1
        req.method = self.parser.get_method()
        req.http10 = self.parser.get_http_version() == "1.0"
        if req.http10:
            self._continue_wanted = False
        elif not req.has_host:  # RFC 9112 3.2: a 1.1 request without Host is a 400
            self._refuse(error_reply(400, code="bad_request", message="HTTP/1.1 request without a Host header"))
            raise _Stop
        self._maybe_continue()

    def on_body(self, body: bytes) -> None:
        req = self._req()
        req.size += len(body)
        if req.size > self.settings.max_request_bytes:
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
            if req.size > self.settings.max_request_bytes:
                self._too_large()
            return
        self._head_bytes += n
        if self._head_bytes > self.settings.max_head_bytes:
            self._refuse(error_reply(400, code="bad_request", message="request head too large"))
            raise _Stop

    # -- answering ---------------------------------------------------------------------
    def _enqueue(self, req: Incoming) -> None:
        self._queue.append(req)
        waiting = self._waiting
        if waiting is not None:
            self._waiting = None
            waiting.set_result(None)
        elif self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def _refuse(self, reply: Reply) -> None:
        """Answer ``reply`` after the requests before it, then close; parse nothing more."""
        self._stopped = True
        self._current = None
        req = Incoming()
        req.refusal = reply
        req.keep_alive = False
        self._enqueue(req)

    def _too_large(self) -> None:
        limit = self.settings.max_request_bytes
        self._refuse(error_reply(413, code="too_large", message=f"request body over {limit} bytes",
                                 limit="max_body_bytes"))
        raise _Stop

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
                    break
                self._queue.popleft()
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


def _render(reply: Reply, req: Incoming, request_id: bytes) -> Sequence[bytes]:
    """Status line, the reply's headers minus this hop's, the request id, framing, body."""
    status = reply.status
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reply.reason)]
    length = None
    for name, value in reply.headers:
        lname = name.lower()
        if lname in _REPLY_DROPPED:
            if lname == b"content-length":
                length = value
            continue
        out.append(name + b": " + value + b"\r\n")
    out.append(b"X-Request-Id: " + request_id + b"\r\n")
    body = reply.body
    if req.method == b"HEAD":
        if length is not None:
            out.append(b"Content-Length: " + length + b"\r\n")
        body = b""
    elif status >= 200 and status not in (204, 304):
        out.append(b"Content-Length: %d\r\n" % len(body))
    else:
        body = b""
    if not req.keep_alive:
        out.append(b"Connection: close\r\n")
    elif req.http10:
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return (b"".join(out), body) if body else (b"".join(out),)
