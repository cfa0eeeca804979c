"""HTTP edge of a node: parse, call NodeStore, render. No state logic here."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import orjson
from aiohttp import web

from node import validate as v
from node.errors import BadRequest, StickyError
from node.ops import Op, view
from node.settings import NodeSettings
from node.store import NodeStore, WriteResult, fingerprint

log = logging.getLogger("stickystate.node")

STORE: web.AppKey[NodeStore] = web.AppKey("store", NodeStore)
SETTINGS: web.AppKey[NodeSettings] = web.AppKey("settings", NodeSettings)
SESSION_ID_HEADER = "X-Stickystate-Session-Id"  # set by the router when it generated the id


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers, content_type="application/json")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> web.Response:
    return json_response({"error": code, "message": message, **extra}, status, headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except StickyError as exc:
        headers = exc.headers()
        if exc.status == 421 and exc.extra.get("owner"):
            headers["X-Stickystate-Owner"] = str(exc.extra["owner"])
        return json_response(exc.body(), exc.status, headers)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, "too_large", exc.text or "body too large", limit="max_body_bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason, dict(exc.headers) if exc.status == 405 else None)
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal", "internal error")


def _headers(result_shard: int, epoch: int | None, store: NodeStore, version: int | None) -> dict[str, str]:
    h = {"X-Stickystate-Shard": str(result_shard), "X-Stickystate-Owner": store.me}
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
    async def _write(self, request: web.Request, op: Op, body: bytes, appended_field: str | None = None) -> web.Response:
        durability = v.durability(request.headers.get("Durability"), self.settings.default_durability)
        if_match = v.if_match(request.headers.get("If-Match"))
        idem = v.idempotency_key(request.headers.get("Idempotency-Key"))
        fp = fingerprint(request.method, request.path_qs, body) if idem else ""
        result: WriteResult = await self.store.write(op, if_match=if_match, idem=idem, request_fingerprint=fp,
                                                     appended_field=appended_field)
        if durability == "log":
            await self.store.confirm(result)
        state = result.state
        headers = _headers(result.shard, result.epoch, self.store, state["version"] if state else None)
        if result.replayed:
            headers["Idempotent-Replayed"] = "true"
        if state is None:
            return web.Response(status=204, headers=headers)
        return json_response(view(state, self.store.clock()), result.status, headers)

    def _sid(self, request: web.Request) -> str:
        return v.session_id(request.match_info["sid"])

    # -- public API -------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
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
        data = v.json_object(doc.get("data", {}), "data")
        ttl = v.ttl(doc.get("ttl_s"), self.limits) or self.settings.default_ttl_s
        return await self._write(request, {"op": "create", "sid": sid, "data": data, "ttl_s": ttl}, body)

    async def get(self, request: web.Request) -> web.Response:
        sid = self._sid(request)
        shard, state = await self.store.read(sid)
        return json_response(view(state, self.store.clock()), 200,
                             _headers(shard.id, shard.my_epoch, self.store, state["version"]))

    async def replace(self, request: web.Request) -> web.Response:
        sid = self._sid(request)
        body = await request.read()
        data = v.json_object(v.parse_json(body, self.limits), "body")
        ttl = v.ttl(request.query.get("ttl_s"), self.limits) or self.settings.default_ttl_s
        return await self._write(request, {"op": "replace", "sid": sid, "data": data, "ttl_s": ttl}, body)

    async def patch(self, request: web.Request) -> web.Response:
        sid = self._sid(request)
        body = await request.read()
        patch = v.json_object(v.parse_json(body, self.limits), "merge patch")
        return await self._write(request, {"op": "patch", "sid": sid, "patch": patch}, body)

    async def append(self, request: web.Request) -> web.Response:
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

    async def set_key(self, request: web.Request) -> web.Response:
        sid = self._sid(request)
        key = v.key_name(request.match_info["key"])
        body = await request.read()
        value = v.parse_json(body, self.limits)
        ttl = v.ttl(request.query.get("ttl_s"), self.limits)
        return await self._write(request, {"op": "set_key", "sid": sid, "key": key, "value": value, "ttl_s": ttl}, body)

    async def delete_key(self, request: web.Request) -> web.Response:
        sid = self._sid(request)
        key = v.key_name(request.match_info["key"])
        return await self._write(request, {"op": "delete_key", "sid": sid, "key": key}, b"")

    async def delete(self, request: web.Request) -> web.Response:
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

    async def livez(self, request: web.Request) -> web.Response:
        return json_response({"alive": True, "node": self.store.me})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.store.ready
        return json_response({"ready": ready, "node": self.store.me, "recovering": sorted(self.store.recovering),
                              "draining": self.store.draining}, 200 if ready else 503)


async def serve(settings: NodeSettings) -> None:
    """Run a node until SIGTERM/SIGINT, then drain before closing anything."""
    import signal

    store = NodeStore(settings)
    app = build_app(settings, store)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("node listening", extra={"url": f"http://{settings.host}:{settings.port}"})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Keep listening while draining: the router must still reach us for health checks,
    # and requests get a 421 it retries on the shards' next owners.
    await store.drain()
    await runner.cleanup()


def build_app(settings: NodeSettings, store: NodeStore | None = None) -> web.Application:
    store = store or NodeStore(settings)
    app = web.Application(middlewares=[errors_middleware], client_max_size=settings.limits.max_body_bytes)
    app[STORE] = store
    app[SETTINGS] = settings
    h = NodeHandlers(store, settings)
    app.router.add_post("/v1/sessions", h.create)
    app.router.add_get("/v1/sessions/{sid}", h.get)
    app.router.add_put("/v1/sessions/{sid}", h.replace)
    app.router.add_patch("/v1/sessions/{sid}", h.patch)
    app.router.add_delete("/v1/sessions/{sid}", h.delete)
    app.router.add_post("/v1/sessions/{sid}/lists/{field}", h.append)
    app.router.add_put("/v1/sessions/{sid}/keys/{key}", h.set_key)
    app.router.add_delete("/v1/sessions/{sid}/keys/{key}", h.delete_key)
    app.router.add_post("/internal/assign", h.assign)
    app.router.add_get("/internal/status", h.status)
    app.router.add_get("/livez", h.livez)
    app.router.add_get("/readyz", h.readyz)

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        await store.start()
        yield
        await store.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
