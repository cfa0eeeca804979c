"""The node's session handlers: parse, call NodeStore, render. No state logic here.

``NodeHandlers`` take a ``HandlerRequest`` (stickystate/http/request.py: ``method``,
``path_qs``, ``headers.get/getall``, ``match_info``, ``query``, ``read()``) and return an
``Answer``, not an aiohttp response: the node's aiohttp app (node/http.py) calls them with
its ``web.Request`` and renders the answer, and the node's fast front (node/fastpath.py)
calls them with a ``FastRequest`` for the routes marked ``fast`` in the route table.
Errors are typed (stickystate/errors.py) and rendered once, by ``error_answer``.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable
import secrets
from typing import Any

from stickystate.errors import BadRequest, StickyError, Unavailable
from stickystate.http.request import HandlerRequest
from stickystate.http.wire import Answer, json_answer
from stickystate.node import validate as v
from stickystate.node.ops import Op, view
from stickystate.node.settings import NodeSettings
from stickystate.node.store import NodeStore, WriteResult, fingerprint
from stickystate.node.watch import parse_position
from stickystate.node.watch_stream import Watch
from stickystate.protocol import (DURABILITY_HEADER, EPOCH_HEADER, IDEMPOTENCY_KEY_HEADER, IF_MATCH_HEADER,
                                  IF_NONE_MATCH_HEADER, LAST_EVENT_ID_HEADER, OWNER_HEADER, PREFER_HEADER,
                                  PREFERENCE_APPLIED_HEADER, REPLAYED_HEADER, SESSION_ID_HEADER, SESSION_ID_MESSAGE,
                                  SHARD_HEADER, TENANT_HEADER, WATCH_MUTED_HEADER, WATCH_SHARED_HEADER)

LONG_POLL_MAX_S = 25.0  # below the router's request timeout (30 s): a long-poll answers before it gives up
_WAIT_RE = re.compile(r"([0-9]|1[0-9]|2[0-4])(\.[0-9]{1,6})?|25(\.0{1,6})?")  # [0, 25] s, as docs/openapi.yaml
_ETAG_RE = re.compile(r'(?:W/)?"?([0-9]{1,19})"?')


Handler = Callable[["NodeHandlers", HandlerRequest], Awaitable[Any]]


def client_facing(handler: Handler) -> Handler:
    """Errors name the session as the client knows it: the stored id is namespaced by the
    tenant (``tenant:id``), and neither the tenant's name nor another id may show."""

    @functools.wraps(handler)
    async def wrapped(self: NodeHandlers, request: HandlerRequest) -> Answer:
        try:
            return await handler(self, request)
        except StickyError as exc:
            tenant = request.headers.get(TENANT_HEADER)
            if tenant:
                exc.message = exc.message.replace(f"'{tenant}:", "'")
            raise

    return wrapped


def _int_param(request: HandlerRequest, name: str, default: int, lo: int, hi: int) -> int:
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
    h = {OWNER_HEADER: store.me} if minimal else {SHARD_HEADER: str(result_shard), OWNER_HEADER: store.me}
    if epoch is not None:
        h[EPOCH_HEADER] = str(epoch)
    if version is not None:
        h["ETag"] = f'"{version}"'
    return h


class NodeHandlers:
    def __init__(self, store: NodeStore, settings: NodeSettings) -> None:
        self.store = store
        self.settings = settings
        self.limits = settings.limits

    # -- helpers ------------------------------------------------------------------
    async def _write(self, request: HandlerRequest, op: Op, body: bytes, appended_field: str | None = None) -> Answer:
        durability = v.durability(request.headers.get(DURABILITY_HEADER), self.settings.default_durability)
        if_match = v.if_match(request.headers.get(IF_MATCH_HEADER))
        idem = v.idempotency_key(request.headers.get(IDEMPOTENCY_KEY_HEADER))
        fp = fingerprint(request.method, request.path_qs, body) if idem else ""
        result: WriteResult = await self.store.write(op, if_match=if_match, idem=idem, request_fingerprint=fp,
                                                     appended_field=appended_field)
        if durability == "log":
            if result.delivery is not None and not result.delivery.done():
                self.store.replicator.hurry()  # we wait for Kafka: no send interval for this one
            await self.store.confirm(result)
        state = result.state
        minimal = state is not None and v.prefers_minimal(request.headers.getall(PREFER_HEADER, []))
        headers = _headers(result.shard, result.epoch, self.store, state["version"] if state else None, minimal)
        if result.replayed:
            headers[REPLAYED_HEADER] = "true"
        if state is None:
            return Answer(204, headers, None)
        if minimal:
            # RFC 7240: the client keeps no copy of the state (it lives here), so a write
            # answers with what identifies the result, not the whole session.
            headers[PREFERENCE_APPLIED_HEADER] = "return=minimal"
            return json_answer(self._render_minimal(request, state, with_id=op["op"] == "create"),
                               result.status, headers)
        return json_answer(self._render(request, state, self.store.clock()), result.status, headers)

    def _sid(self, request: HandlerRequest) -> str:
        """The stored id: the client's id, namespaced by the tenant the router vouched for."""
        sid = v.session_id(request.match_info["sid"])
        tenant = request.headers.get(TENANT_HEADER)
        return f"{tenant}:{sid}" if tenant else sid

    @staticmethod
    def _render(request: HandlerRequest, state: dict[str, Any], now: float) -> dict[str, Any]:
        body = view(state, now)
        if request.headers.get(TENANT_HEADER):
            body["id"] = body["id"].split(":", 1)[1]
        return body

    @staticmethod
    def _render_minimal(request: HandlerRequest, state: dict[str, Any], with_id: bool) -> dict[str, Any]:
        """``Prefer: return=minimal``: the session without its data, and without its id
        (the client named it in the path) except on a create, whose id may be generated."""
        body = {"id": state["id"], "version": state["version"], "expires_at": state["expires_at"]}
        if not with_id:
            del body["id"]
        elif request.headers.get(TENANT_HEADER):
            body["id"] = body["id"].split(":", 1)[1]
        return body

    # -- public API -------------------------------------------------------------------
    @client_facing
    async def create(self, request: HandlerRequest) -> Answer:
        if request.headers.get(IF_MATCH_HEADER) is not None:
            # It could never hold: the session does not exist yet (412), or the id is taken (409).
            raise BadRequest("If-Match does not apply to a create", code="bad_if_match")
        body = await request.read()
        # No body is an empty create; a body must be a JSON object (``null`` included: it is
        # not taken for "no body").
        doc = v.json_object(v.parse_json(body, self.limits), "body") if body.strip() else {}
        unknown = set(doc) - {"id", "data", "ttl_s"}
        if unknown:
            raise BadRequest(f"unknown fields {sorted(unknown)}", code="bad_operation")
        if "id" in doc:
            # Present, it must be an id: not null, a number, an array or an object (never
            # taken for "no id": a malformed id must not create a session under another).
            sid = doc["id"]
            if not isinstance(sid, str):
                raise BadRequest(SESSION_ID_MESSAGE, code="bad_id")
        else:
            sid = request.headers.get(SESSION_ID_HEADER) or secrets.token_urlsafe(16)
        v.session_id(sid)
        tenant = request.headers.get(TENANT_HEADER)
        if tenant:
            sid = f"{tenant}:{sid}"
        data = v.json_object(doc.get("data", {}), "data")
        ttl = v.ttl(doc["ttl_s"], self.limits) if "ttl_s" in doc else self.settings.default_ttl_s
        return await self._write(request, {"op": "create", "sid": sid, "data": data, "ttl_s": ttl}, body)

    @client_facing
    async def get(self, request: HandlerRequest) -> Answer:
        sid = self._sid(request)
        wait = request.query.get("wait_s")
        if wait is not None:
            return await self._long_poll(request, sid, wait)
        shard, state = await self.store.read(sid)
        return json_answer(self._render(request, state, self.store.clock()), 200,
                           _headers(shard.id, shard.my_epoch, self.store, state["version"]))

    async def _long_poll(self, request: HandlerRequest, sid: str, wait: str) -> Answer:
        """``?wait_s=n`` with ``If-None-Match: "<version>"``: the session as soon as its
        version is another, or 304 after n seconds (no If-None-Match: at once)."""
        if not _WAIT_RE.fullmatch(wait):
            raise BadRequest(f"wait_s must be a number of seconds in [0, {LONG_POLL_MAX_S:g}]", code="bad_query")
        raw = request.headers.get(IF_NONE_MATCH_HEADER)
        held = None
        if raw is not None:
            m = _ETAG_RE.fullmatch(raw.strip())
            if m is None:
                raise BadRequest('If-None-Match must be "<version>"', code="bad_if_none_match")
            held = int(m.group(1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(wait)
        while True:
            shard, state = await self.store.read(sid)
            headers = _headers(shard.id, shard.my_epoch, self.store, state["version"])
            if state["version"] != held:
                return json_answer(self._render(request, state, self.store.clock()), 200, headers)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return Answer(304, headers, None)
            hub = self.store.watch
            fut = hub.next_change(sid)
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                hub.forget_poll(sid, fut)

    @client_facing
    async def watch(self, request: HandlerRequest) -> Answer | Watch:
        """Open a watch (node/watch.py): the caller streams ``Watch.frames``, then ``close``s it."""
        sid = self._sid(request)
        changes_only = request.query.get("changes_only", "0")
        if changes_only not in ("0", "1", "true", "false"):
            raise BadRequest("changes_only must be 1, 0, true or false", code="bad_query")
        position = None
        last = request.headers.get(LAST_EVENT_ID_HEADER)
        if last is not None:
            position = parse_position(last)
            if position is None:
                raise BadRequest("Last-Event-ID must be <version> or <version>:<epoch>:<life>",
                                 code="bad_last_event_id")
        elif request.query.get("after_version") is not None:
            position = (_int_param(request, "after_version", 0, 0, 2**62), None, None)
        shard, state = await self.store.read(sid)
        tenant = request.headers.get(TENANT_HEADER)
        watch = Watch(self.store.watch, shard, sid, sid.split(":", 1)[1] if tenant else sid,
                      changes_only in ("1", "true"), self.store.clock,
                      self.store.watch.log_reads if self.settings.replication else None,
                      # only a router's (node/access.py refuses them from clients)
                      shared=request.headers.get(WATCH_SHARED_HEADER) == "1",
                      mute_after_first=request.headers.get(WATCH_MUTED_HEADER) == "1")
        watch.open(position)
        watch.headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                         "X-Accel-Buffering": "no", **_headers(shard.id, shard.my_epoch, self.store, None)}
        return watch


    @client_facing
    async def history(self, request: HandlerRequest) -> Answer:
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

    @client_facing
    async def meta(self, request: HandlerRequest) -> Answer:
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

    @client_facing
    async def replace(self, request: HandlerRequest) -> Answer:
        sid = self._sid(request)
        body = await request.read()
        data = v.json_object(v.parse_json(body, self.limits), "body")
        ttl = v.ttl_query(request.query.get("ttl_s"), self.limits) or self.settings.default_ttl_s
        return await self._write(request, {"op": "replace", "sid": sid, "data": data, "ttl_s": ttl}, body)

    @client_facing
    async def patch(self, request: HandlerRequest) -> Answer:
        sid = self._sid(request)
        body = await request.read()
        patch = v.json_object(v.parse_json(body, self.limits), "merge patch")
        return await self._write(request, {"op": "patch", "sid": sid, "patch": patch}, body)

    @client_facing
    async def append(self, request: HandlerRequest) -> Answer:
        sid = self._sid(request)
        field = v.key_name(request.match_info["field"], "field")
        body = await request.read()
        doc = v.json_object(v.parse_json(body, self.limits), "body")
        items = doc.get("items")
        if not isinstance(items, list):
            raise BadRequest("items must be a JSON array", code="bad_operation")
        if set(doc) - {"items", "max_len"}:
            raise BadRequest(f"unknown fields {sorted(set(doc) - {'items', 'max_len'})}", code="bad_operation")
        max_len = v.max_len(doc["max_len"], self.limits) if "max_len" in doc else None
        if max_len is None and len(items) > self.limits.max_list_len:
            raise v.PayloadTooLarge(f"more than {self.limits.max_list_len} items", limit="max_list_len")
        op = {"op": "append", "sid": sid, "field": field, "items": items, "max_len": max_len}
        return await self._write(request, op, body, appended_field=field)

    @client_facing
    async def set_key(self, request: HandlerRequest) -> Answer:
        sid = self._sid(request)
        key = v.key_name(request.match_info["key"])
        body = await request.read()
        value = v.parse_json(body, self.limits)
        ttl = v.ttl_query(request.query.get("ttl_s"), self.limits)
        return await self._write(request, {"op": "set_key", "sid": sid, "key": key, "value": value, "ttl_s": ttl}, body)

    @client_facing
    async def delete_key(self, request: HandlerRequest) -> Answer:
        sid = self._sid(request)
        key = v.key_name(request.match_info["key"])
        return await self._write(request, {"op": "delete_key", "sid": sid, "key": key}, b"")

    @client_facing
    async def delete(self, request: HandlerRequest) -> Answer:
        sid = self._sid(request)
        return await self._write(request, {"op": "delete", "sid": sid}, b"")
