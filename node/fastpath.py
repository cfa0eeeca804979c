"""The node's fast front: HTTP/1.1 on asyncio Protocols, heads parsed with httptools.

Why: with replication off a node spent ~55-60% of its ~190 us of CPU per request in
aiohttp (request objects, routing, middlewares, building the Response), several times
the work of the request itself. The router had the same problem and answered it with an
httptools front; both use stickystate/http/ (``ClientConnection``: parsing, pipelining,
answers in order, keep-alive, chunked bodies, 100-continue, malformed requests answered
400 and closed; ``render``: the answer's framing; ``Front.relay_local``).

What it answers itself, by calling the very handlers the aiohttp app routes to
(node/handlers.py ``NodeHandlers``: same validation, store calls and rendering) and doing
what the app's edge middleware does (the access check of node/access.py: internal
secret or a client's API key, request id, log context, metrics per op and status, typed
errors as JSON): the routes of the route table
(``stickystate.protocol.ROUTES``) marked ``fast`` (every session operation but
``/history``), with ``{sid}``, ``{field}``, ``{key}`` made only of ``[A-Za-z0-9._:-]`` (not ``.`` or
``..``) and a query string, if any, only of ``[A-Za-z0-9._~=&-]``: those need no URL
decoding or normalisation, so the path means here exactly what it means to aiohttp.
Everything else (``/history``, which reads Kafka; ``/internal/*``, ``/metrics``,
``/livez``, ``/readyz``; HEAD; unknown paths and methods, 404s and 405s; ids with
percent-escapes or other characters) is relayed as it came, bytes in and out, to the
node's aiohttp app on a private Unix socket, which checks and counts it itself.

Limits as aiohttp's: a request line or header over 8190 bytes, or more than 128
headers, is a 400 (and the connection is closed); a body over ``max_body_bytes`` is
refused by the handlers that read it (413 ``too_large``), as aiohttp's ``client_max_size``
does; a body over ``max(16 MiB, 2 x max_body_bytes)`` is refused while it arrives (413,
connection closed).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time

from stickystate import logs
from stickystate.errors import StickyError
from stickystate.http.aio import error_answer
from stickystate.http.connection import FrontLimits, Incoming
from stickystate.http.front import Front
from stickystate.http.request import FastRequest, HandlerRequest
from stickystate.http.stream import StreamSink, Streaming
from stickystate.http.upstream import UpstreamPool
from stickystate.http.wire import Answer, Reply, json_answer, new_request_id, render, reply_of
from stickystate.node.access import NodeAccess
from stickystate.node.handlers import NodeHandlers
from stickystate.node.metrics import NodeMetrics
from stickystate.node.settings import NodeSettings
from stickystate.node.watch_stream import Watch
from stickystate.protocol import FAST_ROUTES, ROUTER_ONLY_HEADERS, UNMETERED, error_body

log = logging.getLogger("stickystate.node")

MAX_LINE_BYTES = 8190  # aiohttp's max_line_size / max_field_size
MAX_HEADERS = 128  # aiohttp's max_headers
# The app itself has no request timeout (a /history page scans a partition); this only
# bounds how long a connection waits for an app that stopped answering.
LOCAL_TIMEOUT_S = 600.0
KEEPALIVE_TIMEOUT_S = 3630.0  # aiohttp's keepalive_timeout: idle connections live as long as before
_ROUTER_ONLY = frozenset(name.lower().encode() for name in ROUTER_ONLY_HEADERS)  # refused from clients
_SIMPLE_QUERY = re.compile(rb"[A-Za-z0-9._~=&-]+")


def match(method: bytes, target: bytes) -> tuple[str, dict[str, str], str] | None:
    """(handler name, path parameters, query string) of a request this front answers
    itself, or None: relay it to the aiohttp app."""
    path, sep, query = target.partition(b"?")
    found = FAST_ROUTES.match(method, path)
    if found is None:
        return None
    if sep and not _SIMPLE_QUERY.fullmatch(query):
        return None  # percent-escapes, '+', or an empty query: aiohttp's own parsing decides
    route, params = found
    return route.op, params, query.decode()


class NodeFront(Front):
    """What every connection of the fast front shares."""

    def __init__(self, settings: NodeSettings, handlers: NodeHandlers, metrics: NodeMetrics,
                 local: UpstreamPool, access: NodeAccess | None = None) -> None:
        limits = FrontLimits(max_request_bytes=max(16 << 20, 2 * settings.limits.max_body_bytes),
                             max_head_bytes=1 << 20,  # the per-line and header-count limits bind first
                             keepalive_timeout_s=KEEPALIVE_TIMEOUT_S,
                             max_line_bytes=MAX_LINE_BYTES, max_headers=MAX_HEADERS)
        super().__init__(local, limits, local_host=b"node", local_timeout_s=LOCAL_TIMEOUT_S)
        self.node_settings = settings
        self.handlers = handlers
        self.metrics = metrics
        self.access = access or NodeAccess(settings)
        self.max_body_bytes = settings.limits.max_body_bytes

    async def answer(self, req: Incoming) -> Sequence[bytes] | Streaming:
        """The bytes of the answer to ``req`` (never raises: a bug is a 500, not a hung connection)."""
        rid = _request_id(req.headers)
        if req.refusal is not None:
            return render(req.refusal, req, rid)
        found = match(req.method, req.target)
        token = logs.request_id.set(rid.decode("utf-8", "surrogateescape"))
        try:
            if found is None:
                return render(await self.relay_local(req, rid), req, rid)
            op, params, query = found
            started = time.perf_counter()
            status = 500
            try:
                reply = await self._handle(req, op, params, query)
                status = reply.status if isinstance(reply, Reply) else 200
            finally:
                if op not in UNMETERED:
                    self.count(op, status, time.perf_counter() - started)
            if isinstance(reply, Watch):
                return streaming_of(reply, rid)
            return render(reply, req, rid)
        except Exception:
            log.exception("unhandled error", extra={"path": _path(req)})
            return render(_reply(_INTERNAL), req, rid)
        finally:
            logs.request_id.reset(token)

    async def _handle(self, req: Incoming, op: str, params: dict[str, str], query: str) -> Reply | Watch:
        internal = authorization = api_key = None
        reserved = False
        for n, v in req.headers:  # one pass over the headers the access check reads
            name = n.lower()
            if name == b"x-stickystate-internal":
                internal = internal if internal is not None else v
            elif name == b"authorization":
                authorization = authorization if authorization is not None else v
            elif name == b"x-api-key":
                api_key = api_key if api_key is not None else v
            elif name in _ROUTER_ONLY:
                reserved = True
        admission = self.access.admit(internal=internal, authorization=_str(authorization), api_key=_str(api_key),
                                      reserved=reserved, session_route=True, now=time.monotonic())
        refusal = admission.refusal
        if refusal is not None:
            return _reply(Answer(refusal.status, dict(refusal.headers), error_body(refusal.code, refusal.message)))
        if admission.tenant is not None:
            # the key's tenant, stated to the handlers as a router would state it
            req.headers.append((b"X-Stickystate-Tenant", admission.tenant.encode()))
        try:
            request: HandlerRequest = FastRequest(req, params, query, self.max_body_bytes)
            answer = await getattr(self.handlers, op)(request)
            if isinstance(answer, Watch):
                return answer
        except (StickyError, web.HTTPRequestEntityTooLarge) as exc:
            answer = error_answer(exc)
        except Exception:
            log.exception("unhandled error", extra={"path": _path(req)})
            return _reply(_INTERNAL)
        return _reply(answer)


def streaming_of(watch: Watch, rid: bytes) -> Streaming:
    """A watch as a streamed answer: its frames written as they come (stickystate/http/stream.py)."""

    async def pump(sink: StreamSink) -> None:
        watch.sink = sink  # changes may be written straight from the write path (node/watch.py)
        try:
            async for chunk in watch.frames():
                sink.send(chunk)
                await sink.drain()
        finally:
            watch.close()

    out = Streaming(200, [(k.encode(), v.encode()) for k, v in watch.headers.items()], pump)
    out.request_id = rid
    out.discard = watch.close
    return out


_INTERNAL = json_answer({"error": "internal", "message": "internal error"}, 500)


def _path(req: Incoming) -> str:
    return req.target.partition(b"?")[0].decode("utf-8", "surrogateescape")


def _reply(answer: Answer) -> Reply:
    return reply_of(answer, rfc822_formatted_time().encode())


def _str(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "surrogateescape")


def _first(headers: list[tuple[bytes, bytes]], lname: bytes) -> bytes | None:
    for n, v in headers:
        if len(n) == len(lname) and n.lower() == lname:
            return v
    return None


def _request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The client's X-Request-Id (the first one, if not empty), else a new one."""
    return _first(headers, b"x-request-id") or new_request_id()
