"""Forwarding a session request to the owner of its shard, and failing over.

A request is routed by its session id (from the path; for ``POST /v1/sessions`` from
the body, or an id the router generates). Every write gets an ``Idempotency-Key`` if
the client sent none, so the router may retry any request on the next owner: a write
that reached the log before its node died is answered from the new owner's
idempotency record (rebuilt from the log), one that did not is applied once.

Transport-neutral: requests come in as bytes (method, target, header pairs, body) from
either front (router/relay.py, or the aiohttp app in router/app.py) and answers go back
as ``Reply`` objects; the wire to the nodes is stickystate/http/upstream.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import orjson

from stickystate.http.upstream import Abandoned, UpstreamError, UpstreamPool
from stickystate.http.wire import Header, Reply, error_reply
from stickystate.protocol import (FORWARDED_ROUTES, HOP_BY_HOP, INTERNAL_HEADER, REQUEST_ID_HEADER,
                                  ROUTER_KEY_PREFIX, SESSION_ID_HEADER, SESSION_ID_MESSAGE, SESSION_ID_RE,
                                  TENANT_HEADER, API_KEY_HEADER, AUTHORIZATION_HEADER, shard_of)
from stickystate.router.cluster import Cluster, NodeView
from stickystate.router.metrics import RouterMetrics
from stickystate.router.settings import RouterSettings

log = logging.getLogger("stickystate.router")

# Client headers never forwarded: credentials, and what only the router may assert.
STRIPPED = HOP_BY_HOP | {h.lower() for h in (SESSION_ID_HEADER, TENANT_HEADER, INTERNAL_HEADER, AUTHORIZATION_HEADER,
                                              API_KEY_HEADER)}
_STRIPPED_B = frozenset(h.encode() for h in STRIPPED | {REQUEST_ID_HEADER.lower()})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_WRITE_METHODS_B = frozenset(m.encode() for m in WRITE_METHODS)


# Idempotency-Keys the router adds must only be unique: a random per-process prefix and a
# counter, without a system call each. (Ids of sessions the router creates stay
# secrets.token_urlsafe: those must be unguessable.) The nodes keep only the outcome
# (status, log offset) of writes under keys with ROUTER_KEY_PREFIX, not the state after
# them: nobody but this router's retry asks for them.
_IDEMPOTENCY_PREFIX = ROUTER_KEY_PREFIX.encode() + secrets.token_urlsafe(9).encode() + b"-"
_idempotency_counter = itertools.count()


def is_session_request(method: bytes, target: bytes) -> bool:
    """What the router forwards: the session routes of the route table
    (``protocol.ROUTES``, ``forwarded``). The rest, wrong methods on those paths included
    (405), it answers itself, from the same table (router/app.py); except a session path
    with ``.`` or ``..`` segments, which ``prepare`` refuses (400) before anything else."""
    path = target.split(b"?", 1)[0]
    if FORWARDED_ROUTES.match(method, path) is not None:
        return True
    return path.startswith(b"/v1/sessions/") and _has_dot_segment(path.split(b"/")[3:])


def _has_dot_segment(segments: list[bytes]) -> bool:
    return any(seg in (b".", b"..") or (b"%" in seg and unquote_to_bytes(seg) in (b".", b".."))
               for seg in segments)


class HeaderScan:
    """One pass over a client request's headers: what to forward, and what the router reads."""

    __slots__ = ("lines", "authorization", "api_key", "request_id", "idempotency_key")

    def __init__(self, headers: Iterable[Header]) -> None:
        lines: list[bytes] = []
        self.authorization: bytes | None = None
        self.api_key: bytes | None = None
        self.request_id: bytes | None = None
        self.idempotency_key = False
        for name, value in headers:
            lname = name.lower()
            if lname in _STRIPPED_B:
                if lname == b"authorization":
                    self.authorization = self.authorization or value
                elif lname == b"x-api-key":
                    self.api_key = self.api_key or value
                elif lname == b"x-request-id":
                    self.request_id = self.request_id or value
                continue
            if lname == b"idempotency-key":
                self.idempotency_key = True
            lines.append(name + b": " + value + b"\r\n")
        self.lines = lines


def as_str(value: bytes | None) -> str | None:
    return value.decode("utf-8", "surrogateescape") if value is not None else None


class Outgoing:
    """A request ready for any node: head (without Host), tail (framing), body, shard."""

    __slots__ = ("head", "tail", "body", "shard", "head_request")

    def __init__(self, head: bytes, tail: bytes, body: bytes, shard: int, head_request: bool) -> None:
        self.head = head
        self.tail = tail
        self.body = body
        self.shard = shard
        self.head_request = head_request


def prepare(method: bytes, target: bytes, scan: HeaderScan, body: bytes, *, tenant: str | None, request_id: bytes,
            internal_lines: bytes, partitions: int) -> Outgoing | Reply:
    """The request as the owner will get it, or the router's refusal (bad path or id)."""
    path = target.split(b"?", 1)[0]
    segments = path.split(b"/")  # b"", b"v1", b"sessions", id, ...
    if _has_dot_segment(segments[3:]):
        # A node-side URL normaliser would turn /v1/sessions/../../internal/... into an
        # internal endpoint reached with the router's secret: never forward one.
        return error_reply(400, code="bad_request", message="path segments '.' and '..' are not allowed")
    extra = b""
    if len(segments) == 3:  # POST /v1/sessions
        sid = _id_from_create_body(body)
        if sid is None:
            sid = secrets.token_urlsafe(16)
            extra = f"{SESSION_ID_HEADER}: {sid}\r\n".encode()
    else:
        raw = segments[3]
        sid = (unquote_to_bytes(raw) if b"%" in raw else raw).decode("utf-8", "replace")
    if not SESSION_ID_RE.fullmatch(sid):
        return error_reply(400, code="bad_id", message=SESSION_ID_MESSAGE)
    if tenant:
        extra += f"{TENANT_HEADER}: {tenant}\r\n".encode()
    if method in _WRITE_METHODS_B and not scan.idempotency_key:
        extra += b"Idempotency-Key: %s%x\r\n" % (_IDEMPOTENCY_PREFIX, next(_idempotency_counter))
    head = b"".join((method, b" ", target, b" HTTP/1.1\r\n", *scan.lines,
                     b"X-Request-Id: ", request_id, b"\r\n", internal_lines, extra))
    if body or method not in (b"GET", b"HEAD"):
        tail = b"Content-Length: %d\r\n\r\n" % len(body)
    else:
        tail = b"\r\n"
    shard = shard_of(f"{tenant}:{sid}" if tenant else sid, partitions)
    return Outgoing(head, tail, body, shard, method == b"HEAD")


def _id_from_create_body(body: bytes) -> str | None:
    if not body.strip():
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    sid = doc.get("id") if isinstance(doc, dict) else None
    return sid if isinstance(sid, str) else None


class Attempts:
    """The tries of one request (the forwarder's and the stream forwarder's): which node to
    send it to next, with backoff between tries, and when to give up (a 503 to send)."""

    def __init__(self, settings: RouterSettings, cluster: Cluster, metrics: RouterMetrics, shard: int) -> None:
        self.settings = settings
        self.cluster = cluster
        self.metrics = metrics
        self.shard = shard
        self.attempt = -1
        self.last_error = "no attempt"

    async def next(self) -> NodeView | Reply:
        cluster = self.cluster
        while True:
            self.attempt += 1
            if self.attempt >= self.settings.max_attempts:
                return error_reply(503, code="unavailable",
                                   message=f"gave up after {self.settings.max_attempts} attempts: {self.last_error}",
                                   headers=(("Retry-After", "1"),))
            if self.attempt:
                self.metrics.retries.inc()
                await asyncio.sleep(min(0.05 * 2 ** (self.attempt - 1), 1.0))
            try:
                await cluster.settled()
            except asyncio.TimeoutError:
                return error_reply(503, code="rebalancing", message="cluster placement did not settle in time",
                                   headers=(("Retry-After", "1"),))
            node = cluster.owner(self.shard)
            if node is None:
                return error_reply(503, code="no_nodes", message="no healthy node", headers=(("Retry-After", "1"),))
            if node.down.done():
                self.last_error = f"node {node.id} is down"
                await cluster.reroute_wait()
                continue
            return node

    async def unreachable(self, node: NodeView, detail: str) -> None:
        """The connection to ``node`` failed."""
        self.last_error = f"node {node.id}: {detail}"
        self.cluster.mark_dead(node, detail)
        await self.cluster.reroute_wait()

    async def misrouted(self, node: NodeView) -> None:
        """``node`` answered 421: it does not serve the shard (now)."""
        self.last_error = f"node {node.id} does not serve shard {self.shard}"
        if not node.down.done():
            self.cluster.resync(node)
        await self.cluster.reroute_wait()


class Forwarder:
    """Sends a prepared request to its shard's owner; retries on the next owner when the
    node fails, is declared dead meanwhile, or answers 421 (it does not serve the shard)."""

    def __init__(self, settings: RouterSettings, cluster: Cluster, metrics: RouterMetrics) -> None:
        self.settings = settings
        self.cluster = cluster
        self.metrics = metrics
        self.internal_lines = b"".join(f"{k}: {v}\r\n".encode() for k, v in cluster.internal_headers.items())
        self._pools: dict[str, UpstreamPool] = {}
        self._host_lines: dict[str, bytes] = {}

    def _pool(self, node: NodeView) -> UpstreamPool:
        pool = self._pools.get(node.id)
        if pool is None:
            url = urlsplit(node.url)
            host, port = url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)
            tls = ssl.create_default_context() if url.scheme == "https" else None
            loop = asyncio.get_running_loop()

            def open_connection(factory: Any) -> Any:
                return loop.create_connection(factory, host, port, ssl=tls)

            pool = self._pools[node.id] = UpstreamPool(node.id, open_connection)
            self._host_lines[node.id] = f"Host: {url.netloc}\r\n".encode()
        return pool

    async def forward(self, out: Outgoing) -> Reply:
        tries = Attempts(self.settings, self.cluster, self.metrics, out.shard)
        while True:
            node = await tries.next()
            if isinstance(node, Reply):
                return node
            pool = self._pool(node)
            # Race the request against the node being declared dead (missed health checks:
            # a paused node holds the request until it resumes). Every request is retry-safe
            # here: reads, and writes carry an Idempotency-Key; a paused owner's late write
            # is fenced by the new owner's claim.
            try:
                reply = await pool.exchange((out.head, self._host_lines[node.id], out.tail, out.body),
                                            head_request=out.head_request,
                                            timeout_s=self.settings.request_timeout_s, abandon=node.down)
            except Abandoned:
                tries.last_error = f"node {node.id} declared dead while answering"
                continue
            except UpstreamError as exc:
                await tries.unreachable(node, exc.detail)
                continue
            if reply.status == 421:
                await tries.misrouted(node)
                continue
            if tries.attempt:
                reply.headers.append((b"X-Stickystate-Retries", str(tries.attempt).encode()))
            return reply

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
