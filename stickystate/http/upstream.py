"""Keep-alive HTTP/1.1 connections to one upstream, one exchange at a time (the router
to each node; each httptools front to its own aiohttp app on a Unix socket).

The caller sends a request it has read completely (head and a Content-Length-framed
body) and waits for the whole answer: ``httptools`` parses the response head to learn
where the body ends (Content-Length or chunked, or no body: 1xx/204/304 and answers to
HEAD), and the body is buffered. A connection that breaks mid-answer has therefore sent
nothing to the client, and the router may retry the request elsewhere.

Errors, each a ``UpstreamError`` with a ``reason`` for the log::

    UpstreamError
    ├── ConnectFailed     no connection could be opened (the node is down)
    ├── ConnectionBroken  the connection closed or broke before the answer was complete
    │                     (``nothing_received``: not one byte of an answer came back)
    ├── UpstreamTimeout   no complete answer within the request timeout
    ├── Abandoned         the caller gave up (the node was declared dead meanwhile)
    └── BadResponse       the answer was not valid HTTP/1.1
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import httptools

from stickystate.http.wire import Header, Reply


class UpstreamError(Exception):
    reason = "upstream error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


class ConnectFailed(UpstreamError):
    reason = "connect failed"


class ConnectionBroken(UpstreamError):
    reason = "connection broken"

    def __init__(self, detail: str = "", nothing_received: bool = False) -> None:
        super().__init__(detail)
        self.nothing_received = nothing_received


class UpstreamTimeout(UpstreamError):
    reason = "timed out"


class Abandoned(UpstreamError):
    reason = "abandoned"


class BadResponse(UpstreamError):
    reason = "bad response"


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; at most one exchange in flight (no upstream pipelining)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Reply] | None = None
        self._head_request = False
        self._received = False
        self._reason = b""
        self._headers: list[Header] = []
        self._body: list[bytes] = []
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._abandon: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the stream is out of step
            self._fail(BadResponse("unsolicited bytes from upstream"))
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(BadResponse(f"unparsable answer: {exc!r}"))

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.pool.forget(self)
        waiter = self._end_exchange()
        if waiter is not None and not waiter.done():
            detail = f"closed by upstream ({exc!r})" if exc else "closed by upstream"
            waiter.set_exception(ConnectionBroken(detail, nothing_received=not self._received))

    # -- httptools callbacks ---------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._head_request and self._parser.get_status_code() >= 200:
            # httptools cannot be told that an answer to HEAD has no body: finish here and
            # give the connection a fresh parser for its next exchange.
            status, keep_alive = self._parser.get_status_code(), self._parser.should_keep_alive()
            self._parser = httptools.HttpResponseParser(self)
            self._complete(status, keep_alive)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._waiter is None:
            return  # the end of an answer to HEAD that carried a body after all
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: an interim answer, the real one follows
            self._headers, self._body, self._reason = [], [], b""
            return
        self._complete(status, keep_alive=self._parser.should_keep_alive())

    # -- exchange --------------------------------------------------------------------
    async def exchange(self, parts: Sequence[bytes], head_request: bool, timeout_s: float,
                       abandon: asyncio.Future[None] | None) -> Reply:
        """Write the request and wait for the complete answer."""
        assert self.transport is not None and self._waiter is None
        loop = self.pool.loop
        waiter: asyncio.Future[Reply] = loop.create_future()
        self._waiter = waiter
        self._head_request = head_request
        self._received = False
        self._reason, self._headers, self._body = b"", [], []
        try:
            self.transport.writelines(parts)
        except (RuntimeError, OSError) as exc:  # closed under us (uvloop raises on a closed handle)
            self._waiter = None
            self.close()
            raise ConnectionBroken(f"write failed: {exc!r}", nothing_received=True) from exc
        self._timer = loop.call_later(timeout_s, self._on_timeout, timeout_s)
        if abandon is not None:
            self._abandon = abandon
            abandon.add_done_callback(self._on_abandon)
        try:
            return await waiter
        except asyncio.CancelledError:
            # The caller went away mid-exchange: the stream is out of step, drop the connection.
            self._fail(Abandoned("cancelled"))
            raise

    def _on_timeout(self, timeout_s: float) -> None:
        self._fail(UpstreamTimeout(f"no answer within {timeout_s:g} s"))

    def _on_abandon(self, fut: asyncio.Future[None]) -> None:
        if fut is self._abandon:  # not a late callback meant for an exchange already over
            self._fail(Abandoned())

    def _end_exchange(self) -> asyncio.Future[Reply] | None:
        """Detach the exchange's waiter, timer and abandon callback (before the connection
        can be reused, so none of them can touch the next exchange)."""
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._abandon is not None:
            self._abandon.remove_done_callback(self._on_abandon)
            self._abandon = None
        return waiter

    def _complete(self, status: int, keep_alive: bool) -> None:
        waiter = self._end_exchange()
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        reply = Reply(status, self._reason, self._headers, body)
        self._headers, self._body = [], []
        if keep_alive and not self._closed:
            self.pool.release(self)
        else:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def _fail(self, exc: UpstreamError) -> None:
        waiter = self._end_exchange()
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self._closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

    @property
    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()


class UpstreamPool:
    """Idle keep-alive connections to one upstream (a node, or the router's own aiohttp app).

    There is no cap on connections in use: each is carrying one client request, and the
    client connections bound those. At most ``max_idle`` are kept idle, each for at most
    ``idle_timeout_s`` (shorter than aiohttp's 75 s keep-alive on the nodes, so the node is
    not the one closing a connection as the router reuses it).
    """

    def __init__(self, name: str, open_connection: Callable[[Callable[[], asyncio.Protocol]],
                                                            Awaitable[tuple[asyncio.BaseTransport, asyncio.Protocol]]],
                 *, max_idle: int = 256, idle_timeout_s: float = 30.0) -> None:
        self.name = name
        self._open_connection = open_connection
        self.loop = asyncio.get_running_loop()
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self._closed = False

    async def exchange(self, parts: Sequence[bytes], *, head_request: bool = False, timeout_s: float = 30.0,
                       abandon: asyncio.Future[None] | None = None) -> Reply:
        """Send one request, return its complete answer, or raise an ``UpstreamError``.

        A pooled connection that the upstream had already closed (it breaks before one byte
        of the answer) is replaced by a fresh one, once: that is not the upstream failing.
        """
        conn = self._take_idle()
        if conn is not None:
            try:
                return await conn.exchange(parts, head_request, timeout_s, abandon)
            except ConnectionBroken as exc:
                if not exc.nothing_received:
                    raise
        conn = await self._connect(timeout_s)
        return await conn.exchange(parts, head_request, timeout_s, abandon)

    def _take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable and time.monotonic() - conn.idle_since < self.idle_timeout_s:
                return conn
            conn.close()
        return None

    async def _connect(self, timeout_s: float) -> UpstreamConnection:
        if self._closed:
            raise ConnectFailed(f"{self.name}: pool closed")
        try:
            _, conn = await asyncio.wait_for(self._open_connection(lambda: UpstreamConnection(self)), timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectFailed(f"{self.name}: {exc!r}") from exc
        assert isinstance(conn, UpstreamConnection)
        self._all.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)

    def close(self) -> None:
        """Close every connection, idle or busy (busy exchanges fail with ConnectionBroken)."""
        self._closed = True
        self._idle.clear()
        for conn in list(self._all):
            conn.close()
