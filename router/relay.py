"""The router's front: HTTP/1.1 on asyncio Protocols, parsed with httptools
(stickystate/http/: connections, framing, the upstream pool).

Why not aiohttp here: for a proxy, building an aiohttp ``Request`` and a client request
and parsing the answer back into a ``Response`` cost about 0.4 ms of CPU per request,
several times the extra hop itself. Here a request costs one C parse of the head, one
pass over its headers (router/forward.py) and a join; the node's answer is parsed only
far enough to know where it ends and which headers to drop, and relayed.

Session requests (the routes of ``stickystate.protocol.ROUTES`` marked ``forwarded``,
with any method: a wrong method is the owner's 405 to give) are checked here (API key,
rate limit: stickystate/auth.py), forwarded by router/forward.py, and counted in the router's
metrics. Every other request is relayed as it came to the router's aiohttp app (its own
endpoints, 404s, 405s; it checks and counts those itself) over a private Unix socket: one
listening port for clients, one implementation of those endpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from stickystate import logs
from stickystate.http.connection import FrontLimits, Incoming
from stickystate.http.front import Front
from stickystate.http.stream import Streaming
from stickystate.http.upstream import UpstreamPool
from stickystate.http.wire import Reply, error_reply, new_request_id, render
from stickystate.auth import Gate
from stickystate.protocol import STREAM_PATHS, TENANT_HEADER, WATCH_SHARED_HEADER
from stickystate.router.forward import Forwarder, HeaderScan, as_str, is_session_request, prepare
from stickystate.router.metrics import RouterMetrics
from stickystate.router.settings import RouterSettings
from stickystate.router.streams import StreamForwarder

log = logging.getLogger("stickystate.router")


class RelayFront(Front):
    """What every client connection shares: settings, checks, forwarder, metrics."""

    def __init__(self, settings: RouterSettings, gate: Gate, forwarder: Forwarder, metrics: RouterMetrics,
                 local: UpstreamPool) -> None:
        limits = FrontLimits(max_request_bytes=settings.max_request_bytes, max_head_bytes=settings.max_head_bytes,
                             keepalive_timeout_s=settings.keepalive_timeout_s)
        super().__init__(local, limits, local_host=b"router", local_timeout_s=settings.request_timeout_s)
        self.settings = settings
        self.gate = gate
        self.forwarder = forwarder
        self.metrics = metrics
        self.streams = StreamForwarder(settings, forwarder.cluster, metrics, forwarder.internal_lines)

    async def answer(self, req: Incoming) -> Sequence[bytes] | Streaming:
        """The bytes of the answer to ``req``."""
        if req.refusal is not None:
            return render(req.refusal, req, HeaderScan(req.headers).request_id or new_request_id())
        method = req.method
        started = time.perf_counter()
        scan = HeaderScan(req.headers)
        rid = scan.request_id or new_request_id()
        token = logs.request_id.set(rid.decode("latin-1"))
        try:
            if not is_session_request(method, req.target):
                return render(await self.relay_local(req, rid), req, rid)
            reply = await self._forward(req, scan, rid)
            if isinstance(reply, Streaming):
                self.count(method.decode("latin-1"), reply.status, time.perf_counter() - started)
                reply.request_id = rid
                return reply
            self.count(method.decode("latin-1"), reply.status, time.perf_counter() - started)
            return render(reply, req, rid)
        except Exception:
            log.exception("unhandled error", extra={"path": as_str(req.target)})
            return render(error_reply(500, code="internal", message="internal error"), req, rid)
        finally:
            logs.request_id.reset(token)

    async def _forward(self, req: Incoming, scan: HeaderScan, rid: bytes) -> Reply | Streaming:
        tenant, refusal = self.gate.admit(as_str(scan.authorization), as_str(scan.api_key), time.monotonic())
        if refusal is not None:
            if refusal.status == 429:
                self.metrics.rate_limited.inc()
            return error_reply(refusal.status, code=refusal.code, message=refusal.message, headers=refusal.headers)
        body = req.body[0] if len(req.body) == 1 else b"".join(req.body)
        out = prepare(req.method, req.target, scan, body, tenant=tenant, request_id=rid,
                      internal_lines=self.forwarder.internal_lines, partitions=self.settings.partitions)
        if isinstance(out, Reply):
            return out
        if req.method == b"GET" and STREAM_PATHS.match(b"GET", req.target.split(b"?", 1)[0]) is not None:
            # piped as it comes; a watch's changes from the stream its session's clients share
            # (router/streams.py)
            return await self.streams.open(out, shared_watch(req.target, tenant, rid, self.forwarder.internal_lines))
        return await self.forwarder.forward(out)


_SHARED_LINE = f"{WATCH_SHARED_HEADER}: 1\r\n".encode()


def shared_watch(target: bytes, tenant: str | None, rid: bytes,
                 internal_lines: bytes) -> tuple[tuple[str, bytes, bool], bytes] | None:
    """The key and the request head (without Host) of the stream a watch's changes may come
    from, shared by the router's clients of the session: the same path and ``changes_only``,
    no position. None when the query is not one the owner takes (the owner refuses it)."""
    path, _, query = target.partition(b"?")
    values = [pair.partition(b"=")[2] for pair in query.split(b"&") if pair.partition(b"=")[0] == b"changes_only"]
    if len(values) > 1 or (values and values[0] not in (b"0", b"1", b"true", b"false")):
        return None
    changes_only = bool(values) and values[0] in (b"1", b"true")
    head = b"".join((b"GET ", path, b"?changes_only=1" if changes_only else b"", b" HTTP/1.1\r\n",
                     b"X-Request-Id: ", rid, b"\r\n", _SHARED_LINE, internal_lines,
                     f"{TENANT_HEADER}: {tenant}\r\n".encode() if tenant else b""))
    return (tenant or "", path, changes_only), head
