"""Streams through the router: a watch (``GET /v1/sessions/{id}/watch``, the routes of
the route table marked ``stream``) is piped to the client as the owner writes it, never
buffered (router/forward.py buffers whole answers, so that a retry is always possible).

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

READ_CHUNK = 64 * 1024


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
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
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
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(url.hostname or "127.0.0.1", url.port or 80,
                                    ssl=True if url.scheme == "https" else None), timeout)
        try:
            writer.write(b"".join((out.head, f"Host: {url.netloc}\r\n".encode(), out.tail, out.body)))
            head_read = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
            racing: set[asyncio.Future[Any]] = {head_read, node.down}
            done, _ = await asyncio.wait(racing, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if head_read not in done:
                head_read.cancel()
                if not node.down.done():
                    raise asyncio.TimeoutError
                writer.close()
                return None
            status, reason, headers = _parse_head(head_read.result())
            if status == 421:
                writer.close()
                return None
            if attempt:
                headers.append((b"X-Stickystate-Retries", str(attempt).encode()))
            if status != 200:
                length = next((int(v) for n, v in headers if n.lower() == b"content-length"), None)
                body = await asyncio.wait_for(reader.readexactly(length) if length is not None else reader.read(),
                                              timeout)
                writer.close()
                return Reply(status, reason, headers, body)
        except BaseException:
            writer.close()
            raise
        down = node.down

        async def pump(sink: StreamSink) -> None:
            self.open_streams += 1
            try:
                while True:
                    read = asyncio.ensure_future(reader.read(READ_CHUNK))
                    racing: set[asyncio.Future[Any]] = {read, down}
                    done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                    if read not in done:  # the node was declared dead: end the stream, the client resumes
                        read.cancel()
                        return
                    data = read.result()
                    if not data:
                        return
                    sink.send(data)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                return  # the owner's connection broke: the client's stream ends, it resumes
            finally:
                self.open_streams -= 1
                writer.close()

        streaming = Streaming(200, headers, pump)
        streaming.discard = writer.close
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
