"""The node's fast front: HTTP/1.1 on asyncio Protocols, heads parsed with httptools.

Why: with replication off a node spent ~55-60% of its ~190 us of CPU per request in
aiohttp (request objects, routing, middlewares, building the Response), several times
the work of the request itself. The router had the same problem and answered it with
router/relay.py; this front reuses its connection handling (``ClientConnection``:
parsing, pipelining, answers in order, keep-alive, chunked bodies, 100-continue,
malformed requests answered 400 and closed) and its answer framing (``_render``).

What it answers itself, by calling the very handlers the aiohttp app routes to
(node/http.py ``NodeHandlers``: same validation, store calls and rendering) and doing
what the app's edge middleware does (internal secret, request id, log context,
metrics per op and status, typed errors as JSON):

    POST /v1/sessions                                       create
    GET | PUT | PATCH | DELETE /v1/sessions/{id}            get | replace | patch | delete
    GET /v1/sessions/{id}/meta                              meta
    POST /v1/sessions/{id}/lists/{field}                    append
    PUT | DELETE /v1/sessions/{id}/keys/{key}               set_key | delete_key

with ``{id}``, ``{field}``, ``{key}`` made only of ``[A-Za-z0-9._:-]`` (not ``.`` or
``..``) and a query string, if any, only of ``[A-Za-z0-9._~=&-]``: those need no URL
decoding or normalisation, so the path means here exactly what it means to aiohttp.
Everything else (``/history``, which reads Kafka; ``/internal/*``, ``/metrics``,
``/livez``, ``/readyz``; HEAD; unknown paths and methods, 404s and 405s; ids with
percent-escapes or other characters) is relayed as it came, bytes in and out, to the
node's aiohttp app on a private Unix socket, which checks and counts it itself.

Limits as aiohttp's: a request line or header over 8190 bytes, or more than 128
headers, is a 400 (and the connection is closed); a body over ``max_body_bytes`` is refused
by the handlers that read it (413 ``too_large``), as aiohttp's ``client_max_size`` does; a body over ``max(16 MiB, 2 x max_body_bytes)`` is refused
while it arrives (413, connection closed).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time

from stickystate.node.errors import StickyError
from stickystate.node.http import UNAUTHORIZED_MESSAGE, UNMETERED, Answer, NodeHandlers, error_answer, json_answer
from stickystate.node.metrics import NodeMetrics
from stickystate.node.settings import NodeSettings
from stickystate.router.forward import HOP_BY_HOP, error_reply, new_request_id
from stickystate.router.relay import ClientConnection, Front, Incoming, _render, _Stop
from stickystate.router.upstream import Reply, UpstreamError, UpstreamPool
from stickystate import logs

log = logging.getLogger("stickystate.node")

MAX_LINE_BYTES = 8190  # aiohttp's max_line_size / max_field_size
MAX_HEADERS = 128  # aiohttp's max_headers
# The app itself has no request timeout (a /history page scans a partition); this only
# bounds how long a connection waits for an app that stopped answering.
LOCAL_TIMEOUT_S = 600.0
KEEPALIVE_TIMEOUT_S = 3630.0  # aiohttp's keepalive_timeout: idle connections live as long as before
_SEGMENT = rb"([A-Za-z0-9._:-]+)"
_SESSION_PATH = re.compile(rb"/v1/sessions(?:/" + _SEGMENT + rb"(?:/(meta)|/(lists|keys)/" + _SEGMENT + rb")?)?")
_SIMPLE_QUERY = re.compile(rb"[A-Za-z0-9._~=&-]+")
# (method, shape of the path) -> the NodeHandlers method (its name is the op in the metrics)
_ROUTES = {
    (b"POST", "sessions"): "create",
    (b"GET", "session"): "get",
    (b"PUT", "session"): "replace",
    (b"PATCH", "session"): "patch",
    (b"DELETE", "session"): "delete",
    (b"GET", "meta"): "meta",
    (b"POST", "lists"): "append",
    (b"PUT", "keys"): "set_key",
    (b"DELETE", "keys"): "delete_key",
}
# Dropped from requests relayed to the node's aiohttp app (framing is redone; the request
# id is sent once, the one this front answers with).
_LOCAL_DROPPED = frozenset(h.encode() for h in HOP_BY_HOP - {"host", "date", "server"} | {"x-request-id"})
_JSON = (b"Content-Type", b"application/json")


@dataclass(frozen=True)
class FrontLimits:
    """What ``ClientConnection`` reads from its front's settings."""

    max_request_bytes: int
    max_head_bytes: int = 1 << 20  # the per-line and header-count limits below bind first
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S


def match(method: bytes, target: bytes) -> tuple[str, dict[str, str], str] | None:
    """(handler name, path parameters, query string) of a request this front answers
    itself, or None: relay it to the aiohttp app."""
    path, sep, query = target.partition(b"?")
    m = _SESSION_PATH.fullmatch(path)
    if m is None:
        return None
    sid, meta, kind, name = m.groups()
    if sid is None:
        shape = "sessions"
    elif meta is not None:
        shape = "meta"
    elif kind is not None:
        shape = kind.decode()
    else:
        shape = "session"
    handler = _ROUTES.get((method, shape))
    if handler is None or sid in (b".", b"..") or name in (b".", b".."):
        return None
    if sep and not _SIMPLE_QUERY.fullmatch(query):
        return None  # percent-escapes, '+', or an empty query: aiohttp's own parsing decides
    params: dict[str, str] = {}
    if sid is not None:
        params["sid"] = sid.decode()
    if name is not None:
        params["field" if kind == b"lists" else "key"] = name.decode()
    return handler, params, query.decode()


class _Headers:
    """The request's headers as the handlers read them (aiohttp's CIMultiDictProxy
    ``get``/``getall``: case-insensitive, first value; values decoded as aiohttp does)."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None:
        self._pairs = pairs

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.lower().encode()
        for n, v in self._pairs:
            if len(n) == len(key) and n.lower() == key:
                return v.decode("utf-8", "surrogateescape")
        return default

    def getall(self, name: str, default: list[str] | None = None) -> list[str]:
        key = name.lower().encode()
        found = [v.decode("utf-8", "surrogateescape") for n, v in self._pairs if n.lower() == key]
        if found:
            return found
        if default is None:
            raise KeyError(name)
        return default


class FastRequest:
    """What ``NodeHandlers`` read from a request, without an aiohttp Request."""

    __slots__ = ("method", "path_qs", "headers", "match_info", "_query_string", "_query", "_body", "_max_body")

    def __init__(self, req: Incoming, params: dict[str, str], query: str, max_body_bytes: int) -> None:
        self.method = req.method.decode()
        self.path_qs = req.target.decode()
        self.headers = _Headers(req.headers)
        self.match_info = params
        self._query_string = query
        self._query: dict[str, str] | None = None
        self._body = req.body[0] if len(req.body) == 1 else b"".join(req.body)
        self._max_body = max_body_bytes

    @property
    def query(self) -> dict[str, str]:
        if self._query is None:
            q: dict[str, str] = {}
            for k, v in parse_qsl(self._query_string, keep_blank_values=True):
                q.setdefault(k, v)  # the first value, as MultiDict.get
            self._query = q
        return self._query

    async def read(self) -> bytes:
        # as aiohttp's Request.read() with client_max_size (the same exception, so the same 413)
        if len(self._body) > self._max_body:
            raise web.HTTPRequestEntityTooLarge(self._max_body)
        return self._body


class NodeFront(Front):
    """What every connection of the fast front shares (``ClientConnection``'s front)."""

    def __init__(self, settings: NodeSettings, handlers: NodeHandlers, metrics: NodeMetrics,
                 local: UpstreamPool) -> None:
        super().__init__(local)
        self.node_settings = settings
        self.settings = FrontLimits(max_request_bytes=max(16 << 20, 2 * settings.limits.max_body_bytes))
        self.handlers = handlers
        self.metrics = metrics
        self.secret = settings.internal_secret.encode()
        self.max_body_bytes = settings.limits.max_body_bytes
        self.owner = settings.node_id.encode()

    async def answer(self, req: Incoming) -> Sequence[bytes]:
        """The bytes of the answer to ``req`` (never raises: a bug is a 500, not a hung connection)."""
        rid = _request_id(req.headers)
        if req.refusal is not None:
            return _render(req.refusal, req, rid)
        route = match(req.method, req.target)
        token = logs.request_id.set(rid.decode("utf-8", "surrogateescape"))
        try:
            if route is None:
                return _render(await self._relay(req, rid), req, rid)
            op, params, query = route
            started = time.perf_counter()
            status = 500
            try:
                reply = await self._handle(req, op, params, query)
                status = reply.status
            finally:
                if op not in UNMETERED:
                    self._count(op, status, time.perf_counter() - started)
            return _render(reply, req, rid)
        except Exception:
            log.exception("unhandled error", extra={"path": _path(req)})
            return _render(_reply(_INTERNAL), req, rid)
        finally:
            logs.request_id.reset(token)

    async def _handle(self, req: Incoming, op: str, params: dict[str, str], query: str) -> Reply:
        if self.secret and not hmac.compare_digest(_first(req.headers, b"x-stickystate-internal") or b"", self.secret):
            return _reply(_UNAUTHORIZED)
        try:
            answer = await getattr(self.handlers, op)(FastRequest(req, params, query, self.max_body_bytes))
        except (StickyError, web.HTTPRequestEntityTooLarge) as exc:
            answer = error_answer(exc)
        except Exception:
            log.exception("unhandled error", extra={"path": _path(req)})
            return _reply(_INTERNAL)
        return _reply(answer)

    async def _relay(self, req: Incoming, rid: bytes) -> Reply:
        """To the node's aiohttp app, as the client sent it (it does its own checks and counts)."""
        body = b"".join(req.body)
        head = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
        for name, value in req.headers:
            if name.lower() not in _LOCAL_DROPPED:
                head += (name, b": ", value, b"\r\n")
        if not req.has_host:  # HTTP/1.0 may leave it out; aiohttp wants one
            head.append(b"Host: node\r\n")
        head.append(b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n" % (rid, len(body)))
        try:
            return await self.local.exchange((b"".join(head), body), head_request=req.method == b"HEAD",
                                             timeout_s=LOCAL_TIMEOUT_S)
        except UpstreamError as exc:
            log.error("node app unreachable", extra={"reason": exc.detail})
            return error_reply(503, code="unavailable", message="node busy", headers=(("Retry-After", "1"),))


_UNAUTHORIZED = json_answer({"error": "unauthorized", "message": UNAUTHORIZED_MESSAGE}, 401)
_INTERNAL = json_answer({"error": "internal", "message": "internal error"}, 500)


def _path(req: Incoming) -> str:
    return req.target.partition(b"?")[0].decode("utf-8", "surrogateescape")
_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}


def _reply(answer: Answer) -> Reply:
    headers = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
    if answer.body is not None:
        headers.append(_JSON)
    headers.append((b"Date", rfc822_formatted_time().encode()))
    return Reply(answer.status, _PHRASES[answer.status], headers, answer.body or b"")


def _first(headers: list[tuple[bytes, bytes]], lname: bytes) -> bytes | None:
    for n, v in headers:
        if len(n) == len(lname) and n.lower() == lname:
            return v
    return None


def _request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The client's X-Request-Id (the first one, if not empty), else a new one."""
    return _first(headers, b"x-request-id") or new_request_id()


class NodeConnection(ClientConnection):
    """The router's client connection with aiohttp's limits on request lines and headers
    (so a request too big for the aiohttp app is refused the same way here)."""

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self._req().target) > MAX_LINE_BYTES:
            self._refuse(error_reply(400, code="bad_request", message="request line too long"))
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        if len(name) > MAX_LINE_BYTES or len(value) > MAX_LINE_BYTES or len(self._req().headers) > MAX_HEADERS:
            self._refuse(error_reply(400, code="bad_request", message="request header too long, or too many"))
            raise _Stop
