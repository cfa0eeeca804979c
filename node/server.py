"""Running a node: its aiohttp app, behind the fast front (node/fastpath.py) or not.

With ``fast_path`` (the default) the app listens on a Unix socket in a private
temporary directory and the fast front on ``host:port``: it answers the hot session
requests itself and relays everything else to the app. Without it the app listens on
``host:port`` itself (the reference path the fast front is tested against).

Shutdown (SIGTERM/SIGINT): drain the store while still listening (the router must
still reach us for health checks, and requests get a 421 it retries on the shards'
next owners), then stop accepting, finish the requests in progress, close the app.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from stickystate.node.liveness import LivenessEcho
from stickystate.node.http import ACCESS, HANDLERS, METRICS, STORE, build_app
from stickystate.node.settings import NodeSettings
from stickystate.node.store import NodeStore

log = logging.getLogger("stickystate.node")

# A deep accept queue: aiohttp's default (128) overflows when a burst of clients
# connects at once; the dropped handshakes come back as 1 s SYN retransmits.
LISTEN_BACKLOG = 1024


@dataclass
class RunningNode:
    store: NodeStore
    port: int  # the port actually bound (settings.port may be 0)


async def serve(settings: NodeSettings) -> None:
    """Run a node until SIGTERM/SIGINT, then drain before closing anything."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings) as node:
        await stop.wait()
        await node.store.drain()


@asynccontextmanager
async def running(settings: NodeSettings) -> AsyncIterator[RunningNode]:
    """The node, listening on ``settings.host:settings.port`` until the block ends."""
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    echo = LivenessEcho(settings.host, settings.liveness_port) if settings.liveness_port >= 0 else None
    app[STORE].liveness_port = echo.port if echo is not None else None
    try:
        if not settings.fast_path:
            site = web.TCPSite(runner, settings.host, settings.port, backlog=LISTEN_BACKLOG)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            log.info("node listening", extra={"url": f"http://{settings.host}:{port}", "fast_path": False})
            yield RunningNode(app[STORE], port)
            return
        with tempfile.TemporaryDirectory(prefix="stickystate-node-") as private:
            async with _fast_front(settings, app, runner, os.path.join(private, "app.sock")) as port:
                yield RunningNode(app[STORE], port)
    finally:
        await runner.cleanup()
        if echo is not None:
            echo.close()


@asynccontextmanager
async def _fast_front(settings: NodeSettings, app: web.Application, runner: web.AppRunner,
                      app_socket: str) -> AsyncIterator[int]:
    from stickystate.http.front import local_app_pool, serving_front
    from stickystate.node.fastpath import NodeFront

    local = await local_app_pool(runner, app_socket, "node-app")
    front = NodeFront(settings, app[HANDLERS], app[METRICS], local, app[ACCESS])
    async with serving_front(front, settings.host, settings.port, LISTEN_BACKLOG) as server:
        port = server.sockets[0].getsockname()[1]
        log.info("node listening", extra={"url": f"http://{settings.host}:{port}", "fast_path": True})
        yield port
