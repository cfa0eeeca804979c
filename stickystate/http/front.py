"""An httptools front: what its client connections share, and how it is served.

Both the router (router/relay.py) and the nodes (node/fastpath.py) listen for clients
with one: it answers the hot requests itself and relays every other request, as it came,
to the process's own aiohttp app on a private Unix socket (``relay_local``), so that one
port serves everything and the rarer endpoints keep one implementation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from stickystate.http.connection import ClientConnection, FrontLimits, Incoming
from stickystate.http.stream import Streaming
from stickystate.http.upstream import UpstreamError, UpstreamPool
from stickystate.http.wire import Reply, error_reply
from stickystate.protocol import HOP_BY_HOP

log = logging.getLogger("stickystate.http")

DRAIN_TIMEOUT_S = 10.0  # on shutdown: how long requests in progress may take to finish
SWEEP_INTERVAL_S = 5.0  # how often idle keep-alive connections are looked at
# Dropped from requests relayed to the local app (framing is redone; the request id is
# sent once, the one this front answers with).
_LOCAL_DROPPED = frozenset(h.encode() for h in HOP_BY_HOP - {"host", "date", "server"} | {"x-request-id"})


class Front:
    """What the connections of one httptools front share: the connections themselves, the
    local app they relay to, request metrics, the keep-alive sweep and the drain on
    shutdown. A subclass sets ``metrics`` (``requests`` and ``latency`` labelled by one
    name and the status) and answers requests (``answer``)."""

    metrics: Any

    def __init__(self, local: UpstreamPool, limits: FrontLimits, *, local_host: bytes,
                 local_timeout_s: float) -> None:
        self.local = local
        self.limits = limits
        self.local_host = local_host  # Host of relayed HTTP/1.0 requests that had none (aiohttp wants one)
        self.local_timeout_s = local_timeout_s
        self.connections: set[ClientConnection] = set()
        self.closing = False
        # prometheus children per (label, status): labels() per request is a lookup and a lock
        self._counted: dict[tuple[str, int], tuple[Any, Any]] = {}

    async def answer(self, req: Incoming) -> Sequence[bytes] | Streaming:
        """The bytes of the answer to ``req``; must not raise."""
        raise NotImplementedError

    def count(self, label: str, status: int, elapsed_s: float) -> None:
        children = self._counted.get((label, status))
        if children is None:
            children = self._counted[(label, status)] = (self.metrics.requests.labels(label, str(status)),
                                                         self.metrics.latency.labels(label))
        counter, histogram = children
        counter.inc()
        histogram.observe(elapsed_s)

    async def relay_local(self, req: Incoming, rid: bytes) -> Reply:
        """To the process's aiohttp app, as the client sent it (it does its own checks and counts)."""
        body = b"".join(req.body)
        head = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
        for name, value in req.headers:
            if name.lower() not in _LOCAL_DROPPED:
                head += (name, b": ", value, b"\r\n")
        if not req.has_host:  # HTTP/1.0 may leave it out; aiohttp wants one
            head.append(b"Host: " + self.local_host + b"\r\n")
        head.append(b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n" % (rid, len(body)))
        try:
            return await self.local.exchange((b"".join(head), body), head_request=req.method == b"HEAD",
                                             timeout_s=self.local_timeout_s)
        except UpstreamError as exc:
            log.error("local app unreachable", extra={"app": self.local.name, "reason": exc.detail})
            return error_reply(503, code="unavailable", message=f"{self.local_host.decode()} busy",
                               headers=(("Retry-After", "1"),))

    def sweep(self, now: float) -> None:
        """Close keep-alive connections idle longer than the keep-alive timeout."""
        limit = self.limits.keepalive_timeout_s
        for conn in list(self.connections):
            if conn.idle and now - conn.last_active > limit:
                conn.close()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests; let those in progress finish (up to timeout_s), then close."""
        self.closing = True
        for conn in list(self.connections):
            if conn.idle or conn.streaming:  # a stream never finishes by itself: its client resumes elsewhere
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

    def open_local(factory: Callable[[], asyncio.Protocol]) -> Any:
        return loop.create_unix_connection(factory, app_socket)

    return UpstreamPool(name, open_local)


@asynccontextmanager
async def serving_front(front: Front, host: str, port: int, backlog: int) -> AsyncIterator[asyncio.Server]:
    """Listen on host:port, one ``ClientConnection`` per client, until the block ends; then
    stop accepting, drain the front's connections and close its local pool."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientConnection(front), host, port, reuse_address=True,
                                      backlog=backlog)
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
