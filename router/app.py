"""The router's HTTP front: find the shard, forward to its owner, fail over.

A request is routed by its session id (from the path; for ``POST /v1/sessions`` from
the body, or an id the router generates). Every write gets an ``Idempotency-Key`` if
the client sent none, so the router may retry any request on the next owner: a write
that reached the log before its node died is answered from the new owner's
idempotency record (rebuilt from the log), one that did not is applied once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from node.http import (INTERNAL_HEADER, REQUEST_ID_HEADER, SESSION_ID_HEADER, TENANT_HEADER, error_response,
                       errors_middleware, json_response)
from node.validate import SESSION_ID_RE
from router.auth import KeyRing, RateLimiter, bearer
from router.cluster import Cluster
from router.metrics import RouterMetrics
from router.placement import shard_of
from router.settings import RouterSettings
from stickystate import logs

log = logging.getLogger("stickystate.router")

CLUSTER: web.AppKey[Cluster] = web.AppKey("cluster", Cluster)
TENANT: web.RequestKey[str] = web.RequestKey("tenant", str)
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http", aiohttp.ClientSession)

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailers",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Date", "Server"))
# Client headers never forwarded: credentials, and what only the router may assert.
STRIPPED = HOP_BY_HOP | {h.lower() for h in (SESSION_ID_HEADER, TENANT_HEADER, INTERNAL_HEADER, "Authorization",
                                              "X-Api-Key")}
OPEN_PATHS = frozenset({"/livez", "/readyz", "/metrics"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Forwarder:
    def __init__(self, settings: RouterSettings, cluster: Cluster, http: aiohttp.ClientSession,
                 metrics: RouterMetrics) -> None:
        self.settings = settings
        self.cluster = cluster
        self.http = http
        self.metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout_s)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in STRIPPED)
        headers[REQUEST_ID_HEADER] = logs.request_id.get() or secrets.token_hex(8)
        headers.update(self.cluster.internal_headers)
        tenant = request.get(TENANT)
        if tenant:
            headers[TENANT_HEADER] = tenant
        sid = request.match_info.get("sid")
        if sid is None:  # POST /v1/sessions
            sid = _id_from_create_body(body)
            if sid is None:
                sid = secrets.token_urlsafe(16)
                headers[SESSION_ID_HEADER] = sid
        if not SESSION_ID_RE.fullmatch(sid):
            return error_response(400, "bad_id", "session id must be 1-128 characters of [A-Za-z0-9._:-]")
        if request.method in WRITE_METHODS and "Idempotency-Key" not in request.headers:
            headers["Idempotency-Key"] = "router-" + secrets.token_urlsafe(12)
        shard = shard_of(f"{tenant}:{sid}" if tenant else sid, self.settings.partitions)
        return await self.forward(request.method, request.path_qs, headers, body, shard)

    async def _send(self, url: str, method: str, headers: CIMultiDict[str],
                    body: bytes) -> tuple[int, bytes, dict[str, str]]:
        """One attempt: status, body, and the response headers worth relaying."""
        async with self.http.request(method, url, data=body or None, headers=headers,
                                     timeout=self._timeout) as resp:
            relayed = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
            return resp.status, await resp.read(), relayed

    async def forward(self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes,
                      shard: int) -> web.StreamResponse:
        last_error = "no attempt"
        for attempt in range(self.settings.max_attempts):
            if attempt:
                self.metrics.retries.inc()
                await asyncio.sleep(min(0.05 * 2 ** (attempt - 1), 1.0))
            try:
                await self.cluster.settled()
            except asyncio.TimeoutError:
                return error_response(503, "rebalancing", "cluster placement did not settle in time",
                                      {"Retry-After": "1"})
            node = self.cluster.owner(shard)
            if node is None:
                return error_response(503, "no_nodes", "no healthy node", {"Retry-After": "1"})
            # Race the request against the node being declared dead (missed health checks:
            # a paused node holds the request until it resumes). Every request is retry-safe
            # here: reads, and writes carry an Idempotency-Key; a paused owner's late write
            # is fenced by the new owner's claim.
            sending = asyncio.ensure_future(self._send(node.url + path_qs, method, headers, body))
            await asyncio.wait((sending, node.down), return_when=asyncio.FIRST_COMPLETED)
            if not sending.done():
                sending.cancel()
                last_error = f"node {node.id} declared dead while answering"
                continue
            try:
                status, payload, resp_headers = sending.result()
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                last_error = f"node {node.id}: {exc!r}"
                self.cluster.mark_dead(node, repr(exc))
                continue
            if status == 421:
                last_error = f"node {node.id} does not serve shard {shard}"
                self.cluster.resync(node)
                continue
            if attempt:
                resp_headers["X-Stickystate-Retries"] = str(attempt)
            return web.Response(status=status, body=payload, headers=resp_headers)
        return error_response(503, "unavailable", f"gave up after {self.settings.max_attempts} attempts: {last_error}",
                              {"Retry-After": "1"})


def _id_from_create_body(body: bytes) -> str | None:
    if not body.strip():
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    sid = doc.get("id") if isinstance(doc, dict) else None
    return sid if isinstance(sid, str) else None


def make_edge_middleware(settings: RouterSettings, metrics: RouterMetrics) -> Any:
    """Request id, API key -> tenant, per-tenant rate limit, and request metrics."""
    keys = KeyRing(dict(settings.api_keys))
    limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)

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
        tenant = None
        if settings.auth == "keys":
            tenant = keys.tenant_of(bearer(request.headers.get("Authorization")) or request.headers.get("X-Api-Key"))
            if tenant is None:
                return error_response(401, "unauthorized", "a valid API key is required "
                                      "(Authorization: Bearer <key> or X-Api-Key)", {"WWW-Authenticate": "Bearer"})
            request[TENANT] = tenant
        # Open mode has no tenants, so no per-tenant limit either.
        wait = limiter.check(tenant, time.monotonic()) if tenant else 0.0
        if wait > 0:
            metrics.rate_limited.inc()
            return error_response(429, "rate_limited", "request rate limit of this tenant exceeded",
                                  {"Retry-After": str(max(1, math.ceil(wait)))})
        return await handler(request)

    return edge


def build_app(settings: RouterSettings) -> web.Application:
    cluster = Cluster(settings)
    metrics = RouterMetrics(cluster)
    app = web.Application(middlewares=[make_edge_middleware(settings, metrics), errors_middleware],
                          client_max_size=16 * 1024 * 1024)
    app[CLUSTER] = cluster
    state: dict[str, Forwarder] = {}
    if settings.auth == "open":
        log.warning("AUTH IS OPEN: no API keys required, every client shares one namespace "
                    "(local development only)")

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=256, keepalive_timeout=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        app[HTTP] = http
        await cluster.start(http)
        state["fwd"] = Forwarder(settings, cluster, http, metrics)
        yield
        await cluster.stop()
        await http.close()

    app.cleanup_ctx.append(lifecycle)

    async def forward(request: web.Request) -> web.StreamResponse:
        return await state["fwd"].handle(request)

    async def cluster_view(request: web.Request) -> web.Response:
        return json_response(cluster.view())

    async def livez(request: web.Request) -> web.Response:
        return json_response({"alive": True})

    async def metrics_view(request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def readyz(request: web.Request) -> web.Response:
        view = cluster.view()
        ready = view["settled"] and any(n["healthy"] for n in view["nodes"])
        return json_response({"ready": ready}, 200 if ready else 503)

    app.router.add_route("POST", "/v1/sessions", forward)
    for path in ("/v1/sessions/{sid}", "/v1/sessions/{sid}/{rest:.*}"):
        app.router.add_route("*", path, forward)
    app.router.add_get("/v1/cluster", cluster_view)
    app.router.add_get("/livez", livez)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/readyz", readyz)
    return app


