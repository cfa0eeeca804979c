"""The HTTP protocol every part of stickystate speaks, written down once. Pure: no I/O,
no asyncio, no aiohttp.

What is here, and who reads it:

- header names (the router, the nodes, the Python client);
- the id and key rules with their messages (validation on the nodes, the router's
  early refusal, the client's own check);
- ``shard_of``: session id -> shard (= Kafka partition); placement pins it with
  golden vectors, and a placement-aware client computes it itself;
- ``RETRY_KEY_PREFIXES``: the Idempotency-Keys a router or client adds (the nodes keep only the
  outcome of writes under them);
- the JSON error body (``error_body``) and its content type;
- the latency buckets of both servers' request histograms;
- ``ROUTES``: the one route table. The node's aiohttp app registers its routes from it,
  the node's fast front answers the routes marked ``fast`` from it, and the router
  forwards the routes marked ``forwarded`` from it (tests/test_openapi.py checks the
  spec against it).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

# -- liveness echo ------------------------------------------------------------------
# A router's UDP ping to a node's echo thread is this many random bytes; the echo is the
# same bytes (node/liveness.py answers, router/liveness.py pings).
LIVENESS_PING_BYTES = 16

# -- headers ------------------------------------------------------------------------
REQUEST_ID_HEADER = "X-Request-Id"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
DURABILITY_HEADER = "Durability"
IF_MATCH_HEADER = "If-Match"
PREFER_HEADER = "Prefer"
# On answers about a session:
OWNER_HEADER = "X-Stickystate-Owner"  # the node that answered (and owns the shard); on a 421, the owner it knows
SHARD_HEADER = "X-Stickystate-Shard"
EPOCH_HEADER = "X-Stickystate-Epoch"
RETRIES_HEADER = "X-Stickystate-Retries"  # the router retried the request on another node
REPLAYED_HEADER = "Idempotent-Replayed"
PREFERENCE_APPLIED_HEADER = "Preference-Applied"
LAST_EVENT_ID_HEADER = "Last-Event-ID"  # SSE: where a watch resumes (node/watch.py)
# A router's watch of one client that it serves from a shared stream (router/streams.py):
# the node sends the client's first frames, then ": muted", then only keep-alives and its end.
WATCH_MUTED_HEADER = "X-Stickystate-Watch-Muted"
MUTED_FRAME = b": muted\n\n"
# The stream a router shares among its clients of a session: not counted against the
# watcher limits (each client's own muted stream is). Both only from a router (the secret).
WATCH_SHARED_HEADER = "X-Stickystate-Watch-Shared"
IF_NONE_MATCH_HEADER = "If-None-Match"  # long-poll: the version the client holds
# Only the router (holding the internal secret) may set these on a request to a node:
SESSION_ID_HEADER = "X-Stickystate-Session-Id"  # the id the router generated for a create
TENANT_HEADER = "X-Stickystate-Tenant"  # the authenticated tenant: namespaces every session id
# What a client may not send a node (400 bad_header): only a router, with the internal secret
ROUTER_ONLY_HEADERS = (SESSION_ID_HEADER, TENANT_HEADER, WATCH_MUTED_HEADER, WATCH_SHARED_HEADER)
INTERNAL_HEADER = "X-Stickystate-Internal"  # the cluster's internal secret
# Client credentials (the router, and the nodes for clients that talk to them directly):
AUTHORIZATION_HEADER = "Authorization"
API_KEY_HEADER = "X-Api-Key"

# Hop-by-hop and framing headers: never relayed as they came (each hop frames its own).
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailers", "Trailer",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Date", "Server", "Expect"))

# -- ids, keys, shards ------------------------------------------------------------------
SESSION_ID_PATTERN = "[A-Za-z0-9._:-]{1,128}"
SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)
SESSION_ID_MESSAGE = "session id must be 1-128 characters of [A-Za-z0-9._:-]"
KEY_PATTERN = "[A-Za-z0-9._:-]{1,256}"  # keys of a session's data, and list fields
KEY_RE = re.compile(KEY_PATTERN)


# Idempotency-Key: visible ASCII (no spaces, no control or non-ASCII characters), so that
# it means the same to every HTTP stack between the client and the node.
IDEMPOTENCY_KEY_PATTERN = "[!-~]{1,128}"
IDEMPOTENCY_KEY_RE = re.compile(IDEMPOTENCY_KEY_PATTERN)
IDEMPOTENCY_KEY_MESSAGE = "Idempotency-Key must be 1-128 visible ASCII characters (no spaces)"


def key_message(what: str = "key") -> str:
    return f"{what} must be 1-256 characters of [A-Za-z0-9._:-]"


def shard_of(session_id: str, partitions: int) -> int:
    """CRC-32 (IEEE, zlib) of the UTF-8 id, mod P. The shard IS the Kafka partition of
    the session's events. Never Python's ``hash()``: it is salted per process."""
    return zlib.crc32(session_id.encode()) % partitions


# Idempotency-Keys that a router or the Python client add to writes that came without
# one, only so that their own retry after a failover applies once: nobody asks for "the
# first answer" of those, so a node keeps only their outcome (status, log offset), not
# the state after the write (a record holding every write's state made the nodes' full
# GC passes walk millions of objects). A replay of one answers with the session as it is.
ROUTER_KEY_PREFIX = "router-"
CLIENT_KEY_PREFIX = "auto-"
RETRY_KEY_PREFIXES = (ROUTER_KEY_PREFIX, CLIENT_KEY_PREFIX)

# -- errors -----------------------------------------------------------------------------
JSON_CONTENT_TYPE = "application/json"


def error_body(code: str, message: str, **extra: Any) -> bytes:
    """The JSON body of every error answer, from any front: ``{"error", "message", ...}``."""
    return orjson.dumps({"error": code, "message": message, **extra})


# -- metrics -----------------------------------------------------------------------------
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# -- routes --------------------------------------------------------------------------------
NODE = "node"
ROUTER = "router"


@dataclass(frozen=True)
class Route:
    """One operation: method, path template (aiohttp syntax), and the handler's name,
    which is also the ``op`` label of the node's request metrics.

    ``served_by``: which servers have it. ``forwarded``: a session operation, answered by
    the shard's owner, to which the router forwards it. ``fast``: the node's httptools
    front answers it itself (node/fastpath.py), else it relays it to the node's aiohttp
    app. ``open``: no credentials needed. ``metered``: counted in the request metrics.
    ``stream``: the answer is a stream (``text/event-stream``), not a whole body: every
    front writes it as it comes (stickystate/http/stream.py) and the router pipes it
    instead of buffering it (router/streams.py).
    """

    method: str
    path: str
    op: str
    served_by: frozenset[str] = field(default=frozenset({NODE}))
    forwarded: bool = False
    fast: bool = False
    open: bool = False
    metered: bool = True
    stream: bool = False


def _session(method: str, path: str, op: str, fast: bool = True, stream: bool = False) -> Route:
    return Route(method, path, op, frozenset({NODE, ROUTER}), forwarded=True, fast=fast, stream=stream)


ROUTES: tuple[Route, ...] = (
    _session("POST", "/v1/sessions", "create"),
    _session("GET", "/v1/sessions/{sid}", "get"),
    _session("PUT", "/v1/sessions/{sid}", "replace"),
    _session("PATCH", "/v1/sessions/{sid}", "patch"),
    _session("DELETE", "/v1/sessions/{sid}", "delete"),
    _session("GET", "/v1/sessions/{sid}/meta", "meta"),
    # reads Kafka (a scan of the partition): not on the fast front
    _session("GET", "/v1/sessions/{sid}/history", "history", fast=False),
    # a change feed (SSE): answered by the fast front (the aiohttp app with --fast-path off)
    _session("GET", "/v1/sessions/{sid}/watch", "watch", stream=True),
    _session("POST", "/v1/sessions/{sid}/lists/{field}", "append"),
    _session("PUT", "/v1/sessions/{sid}/keys/{key}", "set_key"),
    _session("DELETE", "/v1/sessions/{sid}/keys/{key}", "delete_key"),
    Route("GET", "/v1/cluster", "cluster", frozenset({ROUTER})),
    Route("POST", "/internal/assign", "assign"),
    Route("GET", "/internal/status", "status", metered=False),
    Route("GET", "/metrics", "metrics", frozenset({NODE, ROUTER}), open=True, metered=False),
    Route("GET", "/livez", "livez", frozenset({NODE, ROUTER}), open=True, metered=False),
    Route("GET", "/readyz", "readyz", frozenset({NODE, ROUTER}), open=True, metered=False),
)

OPEN_PATHS = frozenset(r.path for r in ROUTES if r.open)
# The session routes' path templates: a node serves these to clients holding an API key too.
SESSION_PATHS = frozenset(r.path for r in ROUTES if r.forwarded)
UNMETERED = frozenset(r.op for r in ROUTES if not r.metered)
STREAM_OPS = frozenset(r.op for r in ROUTES if r.stream)


def routes_of(server: str) -> tuple[Route, ...]:
    return tuple(r for r in ROUTES if server in r.served_by)


# Path parameters of the session routes, as the fast front matches them: only characters
# that need no URL decoding or normalisation (so a path means there exactly what it means
# to aiohttp); "." and ".." are refused by the matcher.
_FAST_SEGMENT = "([A-Za-z0-9._:-]+)"
# Any one segment, as the router matches a session route before the node validates the id.
_ANY_SEGMENT = "([^/]+)"
_PARAM = re.compile(r"\{(\w+)\}")


def path_regex(template: str, segment: str) -> re.Pattern[bytes]:
    """A template as a regex over the raw path bytes, one group per parameter."""
    parts = _PARAM.split(template)
    out = []
    for i, part in enumerate(parts):
        out.append(segment if i % 2 else re.escape(part))
    return re.compile("".join(out).encode())


def params_of(template: str) -> tuple[str, ...]:
    return tuple(_PARAM.findall(template))


class RouteMatcher:
    """Matches a request's method and raw path against a set of routes: ``match`` returns
    the route and its path parameters, or None (``refuse_dots``: also for a parameter that
    is ``.`` or ``..``, which a URL normaliser would take for a path step; ``head_as_get``:
    HEAD matches the GET route, as aiohttp's ``add_get`` does)."""

    def __init__(self, routes: tuple[Route, ...], segment: str, *, refuse_dots: bool, head_as_get: bool) -> None:
        self.refuse_dots = refuse_dots
        self.head_as_get = head_as_get
        self._by_path: list[tuple[re.Pattern[bytes], tuple[str, ...], dict[bytes, Route]]] = []
        for route in routes:
            regex = path_regex(route.path, segment)
            for pattern, _, methods in self._by_path:
                if pattern.pattern == regex.pattern:
                    methods[route.method.encode()] = route
                    break
            else:
                self._by_path.append((regex, params_of(route.path), {route.method.encode(): route}))

    def match(self, method: bytes, path: bytes) -> tuple[Route, dict[str, str]] | None:
        for pattern, names, methods in self._by_path:
            m = pattern.fullmatch(path)
            if m is not None:
                route = methods.get(method)
                if route is None and method == b"HEAD" and self.head_as_get:
                    route = methods.get(b"GET")
                if route is None:
                    return None
                values = m.groups()
                if self.refuse_dots and (b"." in values or b".." in values):
                    return None
                return route, {name: value.decode("utf-8", "surrogateescape") for name, value in zip(names, values)}
        return None



FAST_ROUTES = RouteMatcher(tuple(r for r in ROUTES if r.fast), _FAST_SEGMENT, refuse_dots=True, head_as_get=False)
# The streamed routes, as the router matches them (it pipes their answers).
STREAM_PATHS = RouteMatcher(tuple(r for r in ROUTES if r.stream), _ANY_SEGMENT, refuse_dots=False,
                            head_as_get=False)
# The router checks ids itself (and refuses "." and ".." with a 400 of its own).
FORWARDED_ROUTES = RouteMatcher(tuple(r for r in ROUTES if r.forwarded), _ANY_SEGMENT, refuse_dots=False,
                                head_as_get=True)
