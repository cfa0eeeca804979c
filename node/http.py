"""HTTP edge of a node: parse, call NodeStore, render. No state logic here.

The session handlers (``NodeHandlers``) take anything shaped like an aiohttp request
(``method``, ``path_qs``, ``headers.get/getall``, ``match_info``, ``query``, ``read()``)
and return an ``Answer``, not an aiohttp response: the aiohttp app renders it
(``as_response``), and so does the node's fast front (node/fastpath.py), which calls the
same handlers for the hot session requests without building aiohttp objects. Errors
are rendered once (``error_answer``) for both.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import re
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from stickystate.node import validate as v
from stickystate.node.errors import BadRequest, StickyError, Unavailable
from stickystate.node.ops import Op, view
from stickystate.node.metrics import NodeMetrics
from stickystate.node.settings import NodeSettings
from stickystate.node.store import NodeStore, WriteResult, fingerprint
from stickystate import logs

log = logging.getLogger("stickystate.node")

STORE: web.AppKey[NodeStore] = web.AppKey("store", NodeStore)
SETTINGS: web.AppKey[NodeSettings] = web.AppKey("settings", NodeSettings)
METRICS: web.AppKey[NodeMetrics] = web.AppKey("metrics", NodeMetrics)
HANDLERS: web.AppKey["NodeHandlers"] = web.AppKey("handlers")
# Headers only the router (holding the internal secret) may set:
SESSION_ID_HEADER = "X-Stickystate-Session-Id"  # the id the router generated for a create
TENANT_HEADER = "X-Stickystate-Tenant"  # the authenticated tenant: namespaces every session id
INTERNAL_HEADER = "X-Stickystate-Internal"  # the cluster's internal secret
REQUEST_ID_HEADER = "X-Request-Id"
OPEN_PATHS = frozenset({"/livez", "/readyz", "/metrics"})
UNAUTHORIZED_MESSAGE = "nodes accept requests only from routers and peers holding the cluster's internal secret"
UNMETERED = frozenset({"metrics", "livez", "readyz", "status"})


class Answer:
    """A session handler's answer, for either front to render: a JSON body (or none, 204)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes | None) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def json_answer(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, headers or {}, orjson.dumps(body))


def as_response(answer: Answer) -> web.Response:
    if answer.body is None:
        return web.Response(status=answer.status, headers=answer.headers)
    return web.Response(body=answer.body, status=answer.status, headers=answer.headers,
                        content_type="application/json")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return as_response(json_answer(body, status, headers))


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> web.Response:
    return json_response({"error": code, "message": message, **extra}, status, headers)


def error_answer(exc: StickyError | web.HTTPRequestEntityTooLarge) -> Answer:
    """A typed error as its JSON answer (both fronts)."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return json_answer({"error": "too_large", "message": exc.text or "body too large",
                            "limit": "max_body_bytes"}, 413)
    headers = exc.headers()
    if exc.status == 421 and exc.extra.get("owner"):
        headers["X-Stickystate-Owner"] = str(exc.extra["owner"])
    return json_answer(exc.body(), exc.status, headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except (StickyError, web.HTTPRequestEntityTooLarge) as exc:
        return as_response(error_answer(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, exc.reason, allow)
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal", "internal error")


def make_edge_middleware(settings: NodeSettings, metrics: NodeMetrics) -> Any:
    secret = settings.internal_secret.encode()

    @web.middleware
    async def edge(request: web.Request, handler: Any) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID_HEADER) or secrets.token_hex(8)
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        op = request.match_info.handler.__name__ if request.match_info.route.resource is not None else "unmatched"
        status = 500
        try:
            if secret and request.path not in OPEN_PATHS and not hmac.compare_digest(
                    request.headers.get(INTERNAL_HEADER, "").encode(), secret):
                resp: web.StreamResponse = error_response(401, "unauthorized", UNAUTHORIZED_MESSAGE)
            else:
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


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"-?[0-9]{1,19}", raw) or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be an integer in [{lo}, {hi}]", code="bad_query")
    return int(raw)


def _headers(result_shard: int, epoch: int | None, store: NodeStore, version: int | None,
             minimal: bool = False) -> dict[str, str]:
    # The shard is derivable from the id (crc32 % partitions): only full answers carry it,
    # a minimal one is kept small (docs/BENCHMARKS.md, "Bytes per turn").
    h = {"X-Stickystate-Owner": store.me} if minimal else {
        "X-Stickystate-Shard": str(result_shard), "X-Stickystate-Owner": store.me}
    if epoch is not None:
        h["X-Stickystate-Epoch"] = str(epoch)
    if version is not None:
        h["ETag"] = f'"{version}"'
    return h


class NodeHandlers:
    def __init__(self, store: NodeStore, settings: NodeSettings) -> None:
        self.store = store
        self.settings = settings
        self.limits = settings.limits

    # -- helpers ------------------------------------------------------------------
    async def _write(self, request: web.Request, op: Op, body: bytes, appended_field: str | None = None) -> Answer:
        durability = v.durability(request.headers.get("Durability"), self.settings.default_durability)
        if_match = v.if_match(request.headers.get("If-Match"))
        idem = v.idempotency_key(request.headers.get("Idempotency-Key"))
        fp = fingerprint(request.method, request.path_qs, body) if idem else ""
        result: WriteResult = await self.store.write(op, if_match=if_match, idem=idem, request_fingerprint=fp,
                                                     appended_field=appended_field)
        if durability == "log":
            if result.delivery is not None and not result.delivery.done():
                self.store.replicator.hurry()  # we wait for Kafka: no send interval for this one
            await self.store.confirm(result)
        state = result.state
        minimal = state is not None and v.prefers_minimal(request.headers.getall("Prefer", []))
        headers = _headers(result.shard, result.epoch, self.store, state["version"] if state else None, minimal)
        if result.replayed:
            headers["Idempotent-Replayed"] = "true"
        if state is None:
            return Answer(204, headers, None)
        if minimal:
            # RFC 7240: the client keeps no copy of the state (it lives here), so a write
            # answers with what identifies the result, not the whole session.
            headers["Preference-Applied"] = "return=minimal"
            return json_answer(self._render_minimal(request, state, with_id=op["op"] == "create"),
                               result.status, headers)
        return json_answer(self._render(request, state, self.store.clock()), result.status, headers)

    def _sid(self, request: web.Request) -> str:
        """The stored id: the client's id, namespaced by the tenant the router vouched for."""
        sid = v.session_id(request.match_info["sid"])
        tenant = request.headers.get(TENANT_HEADER)
        return f"{tenant}:{sid}" if tenant else sid

    @staticmethod
    def _render(request: web.Request, state: dict[str, Any], now: float) -> dict[str, Any]:
        body = view(state, now)
        if request.headers.get(TENANT_HEADER):
            body["id"] = body["id"].split(":", 1)[1]
        return body

    @staticmethod
    def _render_minimal(request: web.Request, state: dict[str, Any], with_id: bool) -> dict[str, Any]:
        """``Prefer: return=minimal``: the session without its data, and without its id
        (the client named it in the path) except on a create, whose id may be generated."""
        body = {"id": state["id"], "version": state["version"], "expires_at": state["expires_at"]}
        if not with_id:
            del body["id"]
        elif request.headers.get(TENANT_HEADER):
            body["id"] = body["id"].split(":", 1)[1]
        return body

    # -- public API -------------------------------------------------------------------
    async def create(self, request: web.Request) -> Answer:
        body = await request.read()
        doc = v.parse_json(body, self.limits, optional=True)
        if doc is None:
            doc = {}
        doc = v.json_object(doc, "body")
        unknown = set(doc) - {"id", "data", "ttl_s"}
        if unknown:
            raise BadRequest(f"unknown fields {sorted(unknown)}", code="bad_operation")
        sid = doc.get("id") or request.headers.get(SESSION_ID_HEADER) or secrets.token_urlsafe(16)
        if not isinstance(sid, str):
            raise BadRequest("id must be a string", code="bad_id")
        v.session_id(sid)
        tenant = request.headers.get(TENANT_HEADER)
        if tenant:
            sid = f"{tenant}:{sid}"
        data = v.json_object(doc.get("data", {}), "data")
        ttl = v.ttl(doc.get("ttl_s"), self.limits) or self.settings.default_ttl_s
        return await self._write(request, {"op": "create", "sid": sid, "data": data, "ttl_s": ttl}, body)

    async def get(self, request: web.Request) -> Answer:
        sid = self._sid(request)
        shard, state = await self.store.read(sid)
        return json_answer(self._render(request, state, self.store.clock()), 200,
                           _headers(shard.id, shard.my_epoch, self.store, state["version"]))

    async def history(self, request: web.Request) -> Answer:
        sid = self._sid(request)
        after = _int_param(request, "after", -1, -1, 2**62)
        limit = _int_param(request, "limit", 100, 1, 1000)
        shard = await self.store.serving_shard(sid)
        if not self.settings.replication:
            raise BadRequest("history needs replication (this node keeps no log)", code="bad_operation")
        try:
            # Read-your-writes: every change answered before this request (Durability:
            # memory ones too, which may still be queued) is in the log before it is read.
            await self.store.replicator.flush([shard.id], timeout_s=self.settings.replicator.kafka_deadline_s)
        except asyncio.TimeoutError:
            raise Unavailable("Kafka did not take this shard's queued changes in time", retry_after_s=1,
                              code="replication_unavailable") from None
        items, more = await self.store.history.read(shard.id, sid, after, limit)
        tenant = request.headers.get(TENANT_HEADER)
        for item in items:
            if tenant:
                item["sid"] = item["sid"].split(":", 1)[1]
        body = {"id": sid.split(":", 1)[1] if tenant else sid, "events": items,
                "next_after": items[-1]["offset"] if more and items else None}
        return json_answer(body, 200, _headers(shard.id, shard.my_epoch, self.store, None))

    async def meta(self, request: web.Request) -> Answer:
        sid = self._sid(request)
        shard, state = await self.store.read(sid)
        body = {
            "id": self._render(request, state, self.store.clock())["id"],
            "shard": shard.id,
            "owner": self.store.me,
            "epoch": shard.my_epoch,
            "version": state["version"],
            "size_bytes": shard.sizes.get(sid),
            "last_offset": shard.last_offset.get(sid),
            "created_at": state["created_at"],
            "updated_at": state["updated_at"],
            "expires_at": state["expires_at"],
            "ttl_s": state["ttl_s"],
        }
        return json_answer(body, 200, _headers(shard.id, shard.my_epoch, self.store, state["version"]))

    async def replace(self, request: web.Request) -> Answer:
        sid = self._sid(request)
        body = await request.read()
        data = v.json_object(v.parse_json(body, self.limits), "body")
        ttl = v.ttl(request.query.get("ttl_s"), self.limits) or self.settings.default_ttl_s
        return await self._write(request, {"op": "replace", "sid": sid, "data": data, "ttl_s": ttl}, body)

    async def patch(self, request: web.Request) -> Answer:
        sid = self._sid(request)
        body = await request.read()
        patch = v.json_object(v.parse_json(body, self.limits), "merge patch")
        return await self._write(request, {"op": "patch", "sid": sid, "patch": patch}, body)

    async def append(self, request: web.Request) -> Answer:
        sid = self._sid(request)
        field = v.key_name(request.match_info["field"], "field")
        body = await request.read()
        doc = v.json_object(v.parse_json(body, self.limits), "body")
        items = doc.get("items")
        if not isinstance(items, list):
            raise BadRequest("items must be a JSON array", code="bad_operation")
        if set(doc) - {"items", "max_len"}:
            raise BadRequest(f"unknown fields {sorted(set(doc) - {'items', 'max_len'})}", code="bad_operation")
        max_len = v.max_len(doc.get("max_len"), self.limits)
        if max_len is None and len(items) > self.limits.max_list_len:
            raise v.PayloadTooLarge(f"more than {self.limits.max_list_len} items", limit="max_list_len")
        op = {"op": "append", "sid": sid, "field": field, "items": items, "max_len": max_len}
        return await self._write(request, op, body, appended_field=field)

    async def set_key(self, request: web.Request) -> Answer:
        sid = self._sid(request)
        key = v.key_name(request.match_info["key"])
        body = await request.read()
        value = v.parse_json(body, self.limits)
        ttl = v.ttl(request.query.get("ttl_s"), self.limits)
        return await self._write(request, {"op": "set_key", "sid": sid, "key": key, "value": value, "ttl_s": ttl}, body)

    async def delete_key(self, request: web.Request) -> Answer:
        sid = self._sid(request)
        key = v.key_name(request.match_info["key"])
        return await self._write(request, {"op": "delete_key", "sid": sid, "key": key}, b"")

    async def delete(self, request: web.Request) -> Answer:
        sid = self._sid(request)
        return await self._write(request, {"op": "delete", "sid": sid}, b"")

    # -- internal ----------------------------------------------------------------------
    async def assign(self, request: web.Request) -> web.Response:
        doc = v.json_object(v.parse_json(await request.read(), self.limits), "assignment")
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

        return web.Response(body=generate_latest(request.app[METRICS].registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(self, request: web.Request) -> web.Response:
        return json_response({"alive": True, "node": self.store.me})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.store.ready
        return json_response({"ready": ready, "node": self.store.me, "recovering": sorted(self.store.recovering),
                              "draining": self.store.draining}, 200 if ready else 503)


LISTEN_BACKLOG = 1024


async def _without_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """No ``Server`` header (aiohttp adds one naming its version): no version disclosure,
    and 36 bytes less on every answer. Runs after aiohttp set its default headers."""
    response.headers.popall("Server", None)


def _aiohttp(handler: Callable[[web.Request], Awaitable[Answer]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A session handler as an aiohttp route (same ``__name__``: the op in the metrics)."""

    @functools.wraps(handler)
    async def route(request: web.Request) -> web.Response:
        return as_response(await handler(request))

    return route


def build_app(settings: NodeSettings, store: NodeStore | None = None) -> web.Application:
    store = store or NodeStore(settings)
    metrics = NodeMetrics(store)
    app = web.Application(middlewares=[make_edge_middleware(settings, metrics), errors_middleware],
                          client_max_size=settings.limits.max_body_bytes)
    app.on_response_prepare.append(_without_server_header)
    app[STORE] = store
    app[SETTINGS] = settings
    app[METRICS] = metrics
    if settings.auth == "open" and not settings.internal_secret:
        log.warning("AUTH IS OPEN: no internal secret, anyone who can reach this port can read and write "
                    "every session (local development only)")
    h = app[HANDLERS] = NodeHandlers(store, settings)
    app.router.add_post("/v1/sessions", _aiohttp(h.create))
    app.router.add_get("/v1/sessions/{sid}", _aiohttp(h.get))
    app.router.add_get("/v1/sessions/{sid}/meta", _aiohttp(h.meta))
    app.router.add_get("/v1/sessions/{sid}/history", _aiohttp(h.history))
    app.router.add_put("/v1/sessions/{sid}", _aiohttp(h.replace))
    app.router.add_patch("/v1/sessions/{sid}", _aiohttp(h.patch))
    app.router.add_delete("/v1/sessions/{sid}", _aiohttp(h.delete))
    app.router.add_post("/v1/sessions/{sid}/lists/{field}", _aiohttp(h.append))
    app.router.add_put("/v1/sessions/{sid}/keys/{key}", _aiohttp(h.set_key))
    app.router.add_delete("/v1/sessions/{sid}/keys/{key}", _aiohttp(h.delete_key))
    app.router.add_post("/internal/assign", h.assign)
    app.router.add_get("/internal/status", h.status)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/livez", h.livez)
    app.router.add_get("/readyz", h.readyz)

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        await store.start()
        yield
        await store.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
