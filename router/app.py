"""The router's aiohttp app: its own endpoints, and the same session forwarding as the relay.

In a running router (router/server.py) clients talk to the relay (router/relay.py), which
forwards session requests itself and hands everything else to this app over a private
Unix socket: ``/v1/cluster``, ``/livez``, ``/readyz``, ``/metrics``, and the 401s, 404s
and 405s of any other path. The app's session routes use the same ``Forwarder`` and
``prepare`` as the relay, so the app on its own is a complete router (it is what the
in-process tests build), just a slower one.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from stickystate import logs
from stickystate.http.aio import add_route, error_response, errors_middleware, json_response, without_server_header
from stickystate.http.wire import Reply
from stickystate.protocol import OPEN_PATHS, REQUEST_ID_HEADER, ROUTER, routes_of
from stickystate.auth import Gate
from stickystate.router.cluster import Cluster
from stickystate.router.forward import STRIPPED, Forwarder, HeaderScan, prepare  # noqa: F401 - STRIPPED: part of the contract
from stickystate.router.metrics import RouterMetrics
from stickystate.router.settings import RouterSettings

log = logging.getLogger("stickystate.router")

CLUSTER: web.AppKey[Cluster] = web.AppKey("cluster", Cluster)
TENANT: web.RequestKey[str] = web.RequestKey("tenant", str)
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http", aiohttp.ClientSession)

_NOT_RELAYED = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date",
                          b"server", b"x-request-id"})


class RouterCore:
    """What both fronts share: membership, metrics, the API-key gate and the forwarder."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.cluster = Cluster(settings)
        self.metrics = RouterMetrics(self.cluster)
        self.gate = Gate(settings.auth, dict(settings.api_keys), settings.rate_limit_rps, settings.rate_limit_burst)
        self.forwarder = Forwarder(settings, self.cluster, self.metrics)


def make_edge_middleware(settings: RouterSettings, metrics: RouterMetrics, gate: Gate | None = None) -> Any:
    """Request id, API key -> tenant, per-tenant rate limit, and request metrics."""
    gate = gate or Gate(settings.auth, dict(settings.api_keys), settings.rate_limit_rps, settings.rate_limit_burst)

    @web.middleware
    async def edge(request: web.Request, handler: Any) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID_HEADER) or secrets.token_hex(8)
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        status = 500
        try:
            resp = await _guarded(request, handler)
            status = resp.status
            resp.headers[REQUEST_ID_HEADER] = rid
            return resp
        finally:
            if request.path not in OPEN_PATHS:
                metrics.requests.labels(request.method, str(status)).inc()
                metrics.latency.labels(request.method).observe(time.perf_counter() - started)
            logs.request_id.reset(token)

    async def _guarded(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        tenant, refusal = gate.admit(request.headers.get("Authorization"), request.headers.get("X-Api-Key"),
                                     time.monotonic())
        if refusal is not None:
            if refusal.status == 429:
                metrics.rate_limited.inc()
            return error_response(refusal.status, refusal.code, refusal.message, dict(refusal.headers))
        if tenant is not None:
            request[TENANT] = tenant
        return await handler(request)

    return edge


def web_response(reply: Reply) -> web.Response:
    headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in reply.headers
                          if k.lower() not in _NOT_RELAYED)
    return web.Response(status=reply.status, body=reply.body, headers=headers)


def build_app(settings: RouterSettings, core: RouterCore | None = None) -> web.Application:
    core = core or RouterCore(settings)
    cluster, metrics = core.cluster, core.metrics
    app = web.Application(middlewares=[make_edge_middleware(settings, metrics, core.gate), errors_middleware(log)],
                          client_max_size=settings.max_request_bytes)
    app.on_response_prepare.append(without_server_header)
    app[CLUSTER] = cluster
    if settings.auth == "open":
        log.warning("AUTH IS OPEN: no API keys required, every client shares one namespace "
                    "(local development only)")

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        # Health checks and assignments: a handful of requests a second, aiohttp is fine.
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=16, keepalive_timeout=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        app[HTTP] = http
        await cluster.start(http)
        yield
        await cluster.stop()
        core.forwarder.close()
        await http.close()

    app.cleanup_ctx.append(lifecycle)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rid = logs.request_id.get().encode()  # type: ignore[union-attr] # set by the edge middleware
        out = prepare(request.method.encode(), request.raw_path.encode("utf-8", "surrogateescape"),
                      HeaderScan(request.raw_headers), body, tenant=request.get(TENANT), request_id=rid,
                      internal_lines=core.forwarder.internal_lines, partitions=settings.partitions)
        return web_response(out if isinstance(out, Reply) else await core.forwarder.forward(out))

    async def cluster_view(request: web.Request) -> web.Response:
        # "tenant": the caller's (its key's; null when open): a placement-aware client
        # computes shards over the ids the nodes store, "<tenant>:<id>"
        return json_response({**cluster.view(), "tenant": request.get(TENANT)})

    async def livez(request: web.Request) -> web.Response:
        return json_response({"alive": True})

    async def metrics_view(request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def readyz(request: web.Request) -> web.Response:
        view = cluster.view()
        ready = view["settled"] and any(n["healthy"] for n in view["nodes"])
        return json_response({"ready": ready}, 200 if ready else 503)

    own = {"cluster": cluster_view, "livez": livez, "metrics": metrics_view, "readyz": readyz}
    for route in routes_of(ROUTER):
        add_route(app, route, forward if route.forwarded else own[route.op])
    return app
