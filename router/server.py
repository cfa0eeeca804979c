"""Running a router: the relay on the client port, the aiohttp app behind it.

Start-up: the app's lifecycle starts the cluster view (probe every node, push the first
placement), the app listens on a Unix socket in a private temporary directory, then the
relay listens on ``host:port``. Shutdown (SIGTERM/SIGINT): stop accepting, let requests
in progress finish (idle keep-alive connections are closed at once), close the upstream
connections, then the app (health checks stop).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import tempfile

from aiohttp import web

from stickystate.router.app import RouterCore, build_app
from stickystate.http.front import local_app_pool, serving_front
from stickystate.router.relay import RelayFront
from stickystate.router.settings import RouterSettings

log = logging.getLogger("stickystate.router")


async def serve(settings: RouterSettings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or until ``stop`` is set)."""
    loop = asyncio.get_running_loop()
    core = RouterCore(settings)
    runner = web.AppRunner(build_app(settings, core), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        with tempfile.TemporaryDirectory(prefix="stickystate-router-") as private:
            app_socket = os.path.join(private, "app.sock")
            local = await local_app_pool(runner, app_socket, "router-app")
            front = RelayFront(settings, core.gate, core.forwarder, core.metrics, local)
            # What exists now (modules, both apps, the cluster view) lives as long as the
            # process: keep it out of the cyclic GC's full passes, which would otherwise walk
            # ~50k objects and hold every request in flight for tens of milliseconds.
            gc.collect()
            gc.freeze()
            async with serving_front(front, settings.host, settings.port, 1024):
                log.info("router listening", extra={"url": f"http://{settings.host}:{settings.port}"})
                if stop is None:
                    stop = asyncio.Event()
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        loop.add_signal_handler(sig, stop.set)
                await stop.wait()
    finally:
        await runner.cleanup()

