"""The node's aiohttp app: every route of the route table the node serves
(``stickystate.protocol.ROUTES``), the edge middleware (internal secret, request id, log
context, metrics), and the node's own endpoints (assignment, status, metrics, health).

The session routes call ``NodeHandlers`` (node/handlers.py), the same handlers the fast
front (node/fastpath.py) calls for the routes marked ``fast``; this app answers the rest
(``/history``, ``/internal/*``, ``/metrics``, ``/livez``, ``/readyz``, 404s and 405s), and
everything when the node runs with ``--fast-path off``.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from aiohttp import web

from stickystate import logs
from stickystate.errors import BadRequest
from stickystate.http.aio import add_route, answering, as_response, error_response, errors_middleware, \
    json_response, without_server_header
from stickystate.http.wire import Answer
from stickystate.node import validate as v
from stickystate.node.access import NodeAccess
from stickystate.node.handlers import NodeHandlers
from stickystate.node.metrics import NodeMetrics
from stickystate.node.settings import NodeSettings
from stickystate.node.store import NodeStore
from stickystate.protocol import (API_KEY_HEADER, AUTHORIZATION_HEADER, INTERNAL_HEADER, NODE, OPEN_PATHS,
                                  REQUEST_ID_HEADER, ROUTER_ONLY_HEADERS, SESSION_PATHS, TENANT_HEADER, UNMETERED,
                                  routes_of)

log = logging.getLogger("stickystate.node")

STORE: web.AppKey[NodeStore] = web.AppKey("store", NodeStore)
SETTINGS: web.AppKey[NodeSettings] = web.AppKey("settings", NodeSettings)
METRICS: web.AppKey[NodeMetrics] = web.AppKey("metrics", NodeMetrics)
HANDLERS: web.AppKey[NodeHandlers] = web.AppKey("handlers", NodeHandlers)
# One per process, shared with the fast front: a tenant has one token bucket on this node.
ACCESS: web.AppKey[NodeAccess] = web.AppKey("access", NodeAccess)


def make_edge_middleware(settings: NodeSettings, metrics: NodeMetrics, access: NodeAccess | None = None) -> Any:
    access = access or NodeAccess(settings)

    @web.middleware
    async def edge(request: web.Request, handler: Any) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID_HEADER) or secrets.token_hex(8)
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        resource = request.match_info.route.resource
        op = request.match_info.handler.__name__ if resource is not None else "unmatched"
        status = 500
        try:
            if request.path in OPEN_PATHS:
                resp: web.StreamResponse = await handler(request)
            else:
                internal = request.headers.get(INTERNAL_HEADER)
                admission = access.admit(
                    internal=None if internal is None else internal.encode("utf-8", "surrogateescape"),
                    authorization=request.headers.get(AUTHORIZATION_HEADER),
                    api_key=request.headers.get(API_KEY_HEADER),
                    reserved=any(name in request.headers for name in ROUTER_ONLY_HEADERS),
                    session_route=resource is not None and resource.canonical in SESSION_PATHS,
                    now=time.monotonic())
                refusal = admission.refusal
                if refusal is not None:
                    resp = error_response(refusal.status, refusal.code, refusal.message, dict(refusal.headers))
                else:
                    if admission.tenant is not None:
                        # the key's tenant, stated to the handlers as a router would state it
                        headers = request.headers.copy()
                        headers[TENANT_HEADER] = admission.tenant
                        request = request.clone(headers=headers)
                    resp = await handler(request)
            status = resp.status
            resp.headers[REQUEST_ID_HEADER] = rid
            return resp
        finally:
            if op not in UNMETERED:
                metrics.requests.labels(op, str(status)).inc()
                metrics.latency.labels(op).observe(time.perf_counter() - started)
            logs.request_id.reset(token)

    return edge


class NodeEndpoints:
    """The node's own endpoints (not session operations)."""

    def __init__(self, store: NodeStore, settings: NodeSettings, metrics: NodeMetrics) -> None:
        self.store = store
        self.settings = settings
        self.node_metrics = metrics

    async def assign(self, request: web.Request) -> web.Response:
        doc = v.json_object(v.parse_json(await request.read(), self.settings.limits), "assignment")
        try:
            generation = int(doc["generation"])
            owners = {int(s): str(n) for s, n in doc["owners"].items()}
            standbys = {int(s): [str(n) for n in chain] for s, chain in doc.get("standbys", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadRequest(f"bad assignment: {exc!r}", code="bad_assignment") from None
        return json_response(await self.store.assign(generation, owners, standbys))

    async def status(self, request: web.Request) -> web.Response:
        return json_response(self.store.status())

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(self.node_metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(self, request: web.Request) -> web.Response:
        return json_response({"alive": True, "node": self.store.me})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.store.ready
        return json_response({"ready": ready, "node": self.store.me, "recovering": sorted(self.store.recovering),
                              "draining": self.store.draining}, 200 if ready else 503)


def streaming(handlers: NodeHandlers) -> Any:
    """The watch route on aiohttp (``--fast-path off``, and HEAD relayed by the fast front):
    the same handler and frames as the fast front's (node/fastpath.py ``streaming_of``)."""

    async def watch(request: web.Request) -> web.StreamResponse:
        opened = await handlers.watch(request)
        if isinstance(opened, Answer):
            return as_response(opened)
        headers = {**opened.headers, REQUEST_ID_HEADER: logs.request_id.get() or ""}
        if request.method == "HEAD":
            opened.close()
            return web.Response(status=200, headers=headers)
        resp = web.StreamResponse(status=200, headers=headers)
        resp.force_close()  # the stream ends with the connection, as on the fast front
        try:
            await resp.prepare(request)
            async for chunk in opened.frames():
                await resp.write(chunk)  # raises once the client is gone: at the latest at the next heartbeat
        except ConnectionResetError:
            pass
        finally:
            opened.close()
        return resp

    return watch


def build_app(settings: NodeSettings, store: NodeStore | None = None) -> web.Application:
    store = store or NodeStore(settings)
    metrics = NodeMetrics(store)
    access = NodeAccess(settings)
    app = web.Application(middlewares=[make_edge_middleware(settings, metrics, access), errors_middleware(log)],
                          client_max_size=settings.limits.max_body_bytes)
    app.on_response_prepare.append(without_server_header)
    app[STORE] = store
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[ACCESS] = access
    if settings.auth == "open" and not settings.internal_secret:
        log.warning("AUTH IS OPEN: no internal secret, anyone who can reach this port can read and write "
                    "every session (local development only)")
    handlers = app[HANDLERS] = NodeHandlers(store, settings)
    endpoints = NodeEndpoints(store, settings, metrics)
    for route in routes_of(NODE):
        if route.stream:
            add_route(app, route, streaming(handlers))
        elif route.forwarded:
            add_route(app, route, answering(getattr(handlers, route.op)))
        else:
            add_route(app, route, getattr(endpoints, route.op))

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        await store.start()
        yield
        await store.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
