"""Streams through the router: a watch (``GET /v1/sessions/{id}/watch``, the routes of
the route table marked ``stream``) is piped to the client as the owner writes it, never
buffered (router/forward.py buffers whole answers, so that a retry is always possible).

The pipe is spliced at the protocol level (``_Upstream``): the owner connection's
``data_received`` writes each chunk to the client's transport, so a watch costs the router
no task switch per event; the pump's task wakes only when the client falls behind (the
router then stops reading the owner until the client drains: the backlog builds up on the
owner, whose bounded buffer turns it into a ``reset``) or when the stream ends.

Opening is retried like any request (router/forward.py ``Forwarder``): on a connection
error, a node declared dead, or a 421, on the shard's next owner. An answer other than
200 (404, 429, 503, ...) is relayed whole. Once the owner's 200 head is in, bytes are
piped until the owner ends the stream (the shard moved, the session went, the node is
stopping), the connection breaks (the owner died), or the router declares the node dead
(missed health checks: a paused owner). The router then ends the client's stream too:
it does not carry a stream over to the new owner itself. The client resumes with the
last ``id:`` it received as ``Last-Event-ID`` (SSE clients do so by themselves), and
the new owner sends the changes after it, or ``reset`` (node/watch.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

from stickystate.http.stream import StreamSink, Streaming
from stickystate.http.wire import Header, Reply
from stickystate.router.cluster import Cluster, NodeView
from stickystate.router.forward import Attempts, Outgoing
from stickystate.router.metrics import RouterMetrics
from stickystate.router.settings import RouterSettings

log = logging.getLogger("stickystate.router")

MAX_HEAD = 64 * 1024  # an owner's answer head larger than this is refused (ValueError)


class _Upstream(asyncio.Protocol):
    """The owner's side of a piped stream. Until ``attach`` it collects what the owner
    sends (the answer's head, a refusal's body); after it, every chunk goes straight from
    ``data_received`` to the client's connection: no task switch and no future per chunk
    (the pump's task wakes only when the client falls behind or the stream ends). When
    the client's buffer is over its high-water mark, the owner is not read until it drains."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.sink: StreamSink | None = None
        self.ended = False  # the owner's connection closed (or broke)
        self.blocked = False  # reading paused until the client drains
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            self.buf += data
            self._wake()
            return
        sink.send(data)
        if sink.paused and not self.blocked and self.transport is not None:
            self.blocked = True
            self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool:
        return False  # the transport closes: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def changed(self) -> None:
        """Until the next chunk (before ``attach``), block or end."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def head(self) -> bytes:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if self.ended:
                raise asyncio.IncompleteReadError(bytes(self.buf), None)
            if len(self.buf) > MAX_HEAD:
                raise ValueError("answer head too large")
            await self.changed()
        head = bytes(self.buf[:end + 4])
        del self.buf[:end + 4]
        return head

    async def body(self, length: int | None) -> bytes:
        """A refusal's body: ``length`` bytes, or (no Content-Length) up to the end."""
        while not self.ended and (length is None or len(self.buf) < length):
            await self.changed()
        if length is not None and len(self.buf) < length:
            raise asyncio.IncompleteReadError(bytes(self.buf), length)
        return bytes(self.buf if length is None else self.buf[:length])

    def attach(self, sink: StreamSink) -> None:
        """From here on, the owner's bytes go straight to ``sink`` (what came with the head first)."""
        self.sink = sink
        if self.buf:
            rest, self.buf = bytes(self.buf), bytearray()
            self.data_received(rest)

    def unblock(self) -> None:
        if self.blocked and self.transport is not None and not self.ended:
            self.blocked = False
            self.transport.resume_reading()


class StreamForwarder:
    def __init__(self, settings: RouterSettings, cluster: Cluster, metrics: RouterMetrics,
                 internal_lines: bytes) -> None:
        self.settings = settings
        self.cluster = cluster
        self.metrics = metrics
        self.internal_lines = internal_lines
        self.open_streams = 0

    async def open(self, out: Outgoing) -> Reply | Streaming:
        tries = Attempts(self.settings, self.cluster, self.metrics, out.shard)
        while True:
            node = await tries.next()
            if isinstance(node, Reply):
                return node
            try:
                opened = await self._open(node, out, tries.attempt)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                await tries.unreachable(node, f"stream: {exc!r}")
                continue
            except asyncio.TimeoutError:
                tries.last_error = f"node {node.id}: timed out"
                continue
            if opened is None:
                await tries.misrouted(node)  # 421, or declared dead meanwhile
                continue
            return opened

    async def _open(self, node: NodeView, out: Outgoing, attempt: int) -> Reply | Streaming | None:
        url = urlsplit(node.url)
        timeout = self.settings.request_timeout_s
        loop = asyncio.get_running_loop()
        transport, up = await asyncio.wait_for(
            loop.create_connection(_Upstream, url.hostname or "127.0.0.1", url.port or 80,
                                   ssl=True if url.scheme == "https" else None), timeout)
        try:
            transport.write(b"".join((out.head, f"Host: {url.netloc}\r\n".encode(), out.tail, out.body)))
            head_read = asyncio.ensure_future(up.head())
            racing: set[asyncio.Future[Any]] = {head_read, node.down}
            done, _ = await asyncio.wait(racing, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if head_read not in done:
                head_read.cancel()
                if not node.down.done():
                    raise asyncio.TimeoutError
                transport.close()
                return None
            status, reason, headers = _parse_head(head_read.result())
            if status == 421:
                transport.close()
                return None
            if attempt:
                headers.append((b"X-Stickystate-Retries", str(attempt).encode()))
            if status != 200:
                length = next((int(v) for n, v in headers if n.lower() == b"content-length"), None)
                body = await asyncio.wait_for(up.body(length), timeout)
                transport.close()
                return Reply(status, reason, headers, body)
        except BaseException:
            transport.close()
            raise
        down = node.down

        async def pump(sink: StreamSink) -> None:
            """Ends when the owner ends the stream or its connection breaks, when the router
            declares the node dead (the client resumes elsewhere), or (cancelled) when the
            client goes."""
            self.open_streams += 1
            declared_dead = lambda _: transport.close()  # noqa: E731 - connection_lost ends the loop below
            down.add_done_callback(declared_dead)
            try:
                up.attach(sink)
                while not up.ended:
                    if up.blocked:
                        await sink.drain()
                        up.unblock()
                        continue
                    await up.changed()
            finally:
                down.remove_done_callback(declared_dead)
                self.open_streams -= 1
                transport.close()

        streaming = Streaming(200, headers, pump)
        streaming.discard = transport.close
        return streaming


def _parse_head(raw: bytes) -> tuple[int, bytes, list[Header]]:
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    headers: list[Header] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("bad header line")
        lname = name.strip().lower()
        if lname in (b"connection", b"keep-alive"):
            continue
        headers.append((name.strip(), value.strip()))
    return int(parts[1]), parts[2] if len(parts) > 2 else b"", headers
