"""The node's fast front (node/fastpath.py) against the aiohttp app it stands in front of.

Differential: two nodes in this process, the same settings but one with ``fast_path``
and one without (aiohttp serving its port, as before the fast front), get the same
requests as raw bytes on their own connections: hypothesis-generated session traffic
plus the edge cases (internal secret, tenants, request ids, every error code, the
idempotency and conditional headers, Durability, Prefer, body limits, chunked bodies,
pipelining, keep-alive, malformed requests, relayed paths). Their answers must agree:
status, the JSON body (times and generated ids aside), the headers that mean
something, whether the connection stays open; and at the end their request metrics.

No Kafka: replication off (the fast front never touches replication; history is a
relayed path either way).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson
import pytest
import uvloop
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stickystate.errors import Unavailable
from stickystate.node.fastpath import match
from stickystate.node.server import running
from stickystate.node.settings import NodeSettings
from stickystate.node.validate import Limits
from stickystate.replicator.settings import ReplicatorSettings
from stickystate import logs
from tests.helpers import wait_for

SECRET = "s" * 24
PARTITIONS = 4
MAX_BODY = 4096
AUTH = b"X-Stickystate-Internal: " + SECRET.encode() + b"\r\n"
# API keys of clients that call the nodes directly (node/access.py); tenant "tc" only
# ever sends the requests of the rate-limit test (a burst of RATE_BURST, then 429)
KEY_A, KEY_B, KEY_C = "ka" * 10, "kb" * 10, "kc" * 10
RATE_BURST = 12
# Headers whose values must agree (Date, Content-Length and the framing are the transport's).
COMPARED = ("etag", "x-stickystate-shard", "x-stickystate-owner", "x-stickystate-epoch", "preference-applied",
            "idempotent-replayed", "retry-after", "allow", "content-type", "www-authenticate")
TIMES = ("expires_at", "created_at", "updated_at")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_headers: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


class _Reader:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[Answer] = []
        self._h: list[tuple[str, str]] = []
        self._b: list[bytes] = []

    def on_message_begin(self) -> None:
        self._h, self._b = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._h.append((name.decode().lower(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self._b.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200:  # 100 Continue: interim, not an answer
            self.done.append(Answer(status, dict(self._h), b"".join(self._b), self._h))


def exchange(port: int, data: bytes, answers: int = 1, *, check_close: bool = False) -> tuple[list[Answer], bool]:
    """Send ``data`` on a new connection; read ``answers`` answers (fewer if the server
    closes first). Returns them and whether the server closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(5)
    reader = _Reader()
    closed = False
    try:
        sock.sendall(data)
        while len(reader.done) < answers:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            try:
                reader.parser.feed_data(chunk)
            except httptools.HttpParserError:
                break
        if check_close and not closed:
            sock.settimeout(0.3)
            try:
                closed = sock.recv(65536) == b""
            except (TimeoutError, ConnectionResetError):
                closed = False
    finally:
        sock.close()
    return reader.done, closed


# -- two nodes in a background event loop ---------------------------------------------------


class Nodes:
    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.stores: dict[str, Any] = {}
        self.loop = uvloop.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30), "nodes did not start"

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        rep = ReplicatorSettings(partitions=PARTITIONS)
        base = dict(port=0, replication=False, auth="keys", internal_secret=SECRET, replicator=rep,
                    api_keys=((KEY_A, "ta"), (KEY_B, "tb"), (KEY_C, "tc")), rate_limit_rps=0.01,
                    rate_limit_burst=RATE_BURST,
                    limits=Limits(max_body_bytes=MAX_BODY, max_state_bytes=8192, max_list_len=20, max_depth=8))
        async with running(NodeSettings(fast_path=True, **base)) as fast, \
                running(NodeSettings(fast_path=False, **base)) as slow:
            for name, node in (("fast", fast), ("aiohttp", slow)):
                self.ports[name] = node.port
                self.stores[name] = node.store
                _inject_faults(node.store)
            self._ready.set()
            await self._stop.wait()


def _inject_faults(store: Any) -> None:
    """Ids that make the store fail, the same way on both nodes (errors no test can
    provoke on a healthy node without Kafka: 503, and an unexpected exception)."""
    read = store.read

    async def faulty_read(sid: str) -> Any:
        if sid.endswith("boom-503"):
            raise Unavailable("shard is being rebuilt", retry_after_s=2, code="recovering")
        if sid.endswith("boom-500"):
            raise RuntimeError("injected")
        return await read(sid)

    store.read = faulty_read


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    n = Nodes()
    n.start()
    # both own shards 0-2; shard 3 is n2's (421 with its owner), as the router would say
    owners = {str(s): "n1" for s in range(PARTITIONS - 1)} | {str(PARTITIONS - 1): "n2"}
    assign = orjson.dumps({"generation": 1, "owners": owners})
    for port in n.ports.values():
        (a,), _ = exchange(port, b"POST /internal/assign HTTP/1.1\r\nHost: n\r\n" + AUTH
                           + b"Content-Length: %d\r\n\r\n%s" % (len(assign), assign))
        assert a.status == 200, a.body
    for name, store in n.stores.items():
        wait_for(lambda: not store.recovering, timeout_s=30, what=f"{name} to acquire its shards")
        assert store.serving == set(range(PARTITIONS - 1)), name
    yield n
    n.stop()


# -- comparing -------------------------------------------------------------------------------


def _normal(doc: Any, generated_id: bool) -> Any:
    if isinstance(doc, dict):
        out = {k: ("<t>" if k in TIMES and isinstance(v, float) else _normal(v, generated_id)) for k, v in doc.items()}
        if generated_id and "id" in out:
            out["id"] = "<generated>"
        return out
    if isinstance(doc, list):
        return [_normal(v, generated_id) for v in doc]
    return doc


def view(a: Answer, *, generated_id: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"status": a.status, **{h: a.headers.get(h) for h in COMPARED}}
    out["body"] = _normal(a.json(), generated_id) if a.headers.get("content-type", "").startswith(
        "application/json") else a.body
    # (whether the connection closes is compared where it matters, on the socket: an
    # HTTP/1.0 answer says "Connection: close" here, and nothing from aiohttp)
    assert "server" not in a.headers  # no version disclosure
    rid = a.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", rid) or rid.startswith("rid-")
    out["request_id"] = rid if rid.startswith("rid-") else "<generated>"  # the client's, echoed
    return out


def both(nodes: Nodes, data: bytes, answers: int = 1, *, check_close: bool = False,
         generated_id: bool = False) -> list[dict[str, Any]]:
    """Send ``data`` to both nodes; assert the answers agree; return the fast node's."""
    got = {}
    for name, port in nodes.ports.items():
        answers_, closed = exchange(port, data, answers, check_close=check_close)
        got[name] = ([view(a, generated_id=generated_id) for a in answers_], closed if check_close else None)
    assert got["fast"] == got["aiohttp"], data[:300]
    assert len(got["fast"][0]) == answers or check_close, (got, data[:300])
    return got["fast"][0]


def request(method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, *,
            auth: bool = True, chunked: bool = False, version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: node"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    out = "\r\n".join(lines).encode() + b"\r\n" + (AUTH if auth else b"")
    if chunked:
        assert body is not None
        half = len(body) // 2
        parts = [body[:half], body[half:]]
        out += b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p)
        return out + b"0\r\n\r\n"
    if body is not None:
        out += b"Content-Length: %d\r\n" % len(body)
    return out + b"\r\n" + (body or b"")


def _head_answer(port: int, data: bytes) -> dict[str, Any]:
    """An answer to HEAD (no body whatever Content-Length says), read until the server closes."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(5)
    sock.sendall(data)
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    sock.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines))
    # Content-Length: of the body a GET would get (its times' digits vary)
    return {"status": int(status_line.split()[1]), "rest": rest, "length": int(headers["content-length"]) > 0,
            **{h: headers.get(h) for h in COMPARED}}


def sid_in_shard(shard: int, prefix: str) -> str:
    from stickystate.protocol import shard_of

    return next(f"{prefix}-{i}" for i in range(10_000) if shard_of(f"{prefix}-{i}", PARTITIONS) == shard)


# -- which requests the fast front takes ------------------------------------------------------


@pytest.mark.parametrize("method,target,expected", [
    (b"POST", b"/v1/sessions/a/lists/m", ("append", {"sid": "a", "field": "m"}, "")),
    (b"GET", b"/v1/sessions/a.b:c-d_e", ("get", {"sid": "a.b:c-d_e"}, "")),
    (b"PUT", b"/v1/sessions/a/keys/k?ttl_s=5", ("set_key", {"sid": "a", "key": "k"}, "ttl_s=5")),
    (b"POST", b"/v1/sessions", ("create", {}, "")),
    (b"GET", b"/v1/sessions/a/meta", ("meta", {"sid": "a"}, "")),
    (b"GET", b"/v1/sessions/a/history", None),  # reads Kafka: the aiohttp app
    (b"HEAD", b"/v1/sessions/a", None),
    (b"PUT", b"/v1/sessions/a/meta", None),  # 405 from the app
    (b"GET", b"/v1/sessions/a%3Ab", None),  # percent-escapes: the app decodes
    (b"GET", b"/v1/sessions/..", None),  # dot segments: the app normalises
    (b"GET", b"/v1/sessions/a/", None),
    (b"GET", b"/v1/sessions/a?", None),
    (b"GET", b"/v1/sessions/a?x=%20", None),
    (b"GET", b"/v1/sessions/a?x=a+b", None),
    (b"GET", b"/livez", None),
    (b"POST", b"/internal/assign", None),
])
def test_fast_routes(method: bytes, target: bytes, expected: Any) -> None:
    assert match(method, target) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abAZ09._:-~%/?=&+#;!{}", min_size=0, max_size=24),
       st.sampled_from(["", "/meta", "/history", "/lists/m", "/keys/k", "/x/y"]),
       st.sampled_from(["", "?ttl_s=5", "?ttl_s=5&ttl_s=6", "?ttl_s", "?a=1&ttl_s=2", "?=&", "?ttl_s=%35"]))
def test_what_the_fast_front_takes_means_the_same_to_aiohttp(node_app: web.Application, seg: str, tail: str,
                                                             query: str) -> None:
    """For every target the fast front answers itself, aiohttp's router would pick the
    same handler with the same path parameters, query and path_qs (the idempotency
    fingerprint): the two fronts read one request the same way."""
    from aiohttp.test_utils import make_mocked_request

    target = f"/v1/sessions/{seg}{tail}{query}" if seg or tail else f"/v1/sessions{query}"
    app = node_app
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        got = match(method.encode(), target.encode())
        if got is None:
            continue
        handler, params, qs = got
        req = make_mocked_request(method, target, app=app)
        info = asyncio.run(app.router.resolve(req))
        assert info.http_exception is None and info.handler.__name__ == handler, target
        assert dict(info) == params and req.path_qs == target
        from stickystate.http.request import FastRequest
        from stickystate.http.connection import Incoming

        inc = Incoming()
        inc.method, inc.target = method.encode(), target.encode()
        fast = FastRequest(inc, params, qs, MAX_BODY)
        assert fast.path_qs == req.path_qs
        assert fast.query.get("ttl_s") == req.query.get("ttl_s"), target


@pytest.fixture(scope="module")
def node_app() -> web.Application:
    """The node's aiohttp app (never started): its router resolves requests."""
    from stickystate.node.http import build_app

    return build_app(NodeSettings(auth="open"))


# -- the same answers, request by request -------------------------------------------------------


def test_session_lifecycle_and_headers(nodes: Nodes) -> None:
    s = sid_in_shard(0, "life")
    body = orjson.dumps({"id": s, "data": {"u": 1}, "ttl_s": 60})
    both(nodes, request("POST", "/v1/sessions", body, {"X-Request-Id": "rid-1"}))
    both(nodes, request("POST", "/v1/sessions", body))  # 409 exists
    both(nodes, request("GET", f"/v1/sessions/{s}"))
    both(nodes, request("GET", f"/v1/sessions/{s}/meta"))
    append = orjson.dumps({"items": [{"m": 1}], "max_len": 3})
    (a,) = both(nodes, request("POST", f"/v1/sessions/{s}/lists/msgs", append, {"Prefer": "return=minimal"}))
    assert a["status"] == 200 and a["x-stickystate-shard"] is None and a["preference-applied"] == "return=minimal"
    assert set(a["body"]) == {"version", "expires_at"}
    both(nodes, request("POST", f"/v1/sessions/{s}/lists/msgs", append, {"Prefer": 'x, RETURN="Minimal"'}))
    both(nodes, request("PATCH", f"/v1/sessions/{s}", b'{"mood":"ok","u":null}', {"If-Match": '"4"'}))
    both(nodes, request("PATCH", f"/v1/sessions/{s}", b'{"mood":"no"}', {"If-Match": '"1"'}))  # 412
    both(nodes, request("PATCH", f"/v1/sessions/{s}", b'{"mood":"no"}', {"If-Match": 'nope'}))  # 400
    both(nodes, request("PUT", f"/v1/sessions/{s}/keys/otp?ttl_s=30", b"123"))
    both(nodes, request("PUT", f"/v1/sessions/{s}/keys/otp?ttl_s=-1", b"123"))  # bad_ttl
    both(nodes, request("PUT", f"/v1/sessions/{s}/keys/otp?ttl_s=1%30", b"123"))  # relayed: the app decodes
    both(nodes, request("DELETE", f"/v1/sessions/{s}/keys/otp"))
    both(nodes, request("DELETE", f"/v1/sessions/{s}/keys/otp"))  # 404
    both(nodes, request("PUT", f"/v1/sessions/{s}", b'{"b":2}', {"Durability": "log"}))
    both(nodes, request("PUT", f"/v1/sessions/{s}", b'{"b":2}', {"Durability": "maybe"}))  # 400
    both(nodes, request("PUT", f"/v1/sessions/{s}-new?ttl_s=9", b'{"b":2}'))  # 201 created
    both(nodes, request("GET", f"/v1/sessions/{s}/history"))  # 400: no log here (relayed)
    heads = {name: _head_answer(port, request("HEAD", f"/v1/sessions/{s}", None, {"Connection": "close"}))
             for name, port in nodes.ports.items()}
    assert heads["fast"] == heads["aiohttp"] and heads["fast"]["status"] == 200
    both(nodes, request("DELETE", f"/v1/sessions/{s}"))  # 204
    both(nodes, request("GET", f"/v1/sessions/{s}"))  # 404


def test_idempotency(nodes: Nodes) -> None:
    s = sid_in_shard(1, "idem")
    both(nodes, request("POST", "/v1/sessions", orjson.dumps({"id": s})))
    append = orjson.dumps({"items": ["once"]})
    for _ in range(2):  # the second is a replay
        (a,) = both(nodes, request("POST", f"/v1/sessions/{s}/lists/l", append, {"Idempotency-Key": "k-1"}))
    assert a["idempotent-replayed"] == "true"
    both(nodes, request("POST", f"/v1/sessions/{s}/lists/l", append, {"Idempotency-Key": "k-1",
                                                                      "Prefer": "return=minimal"}))
    both(nodes, request("POST", f"/v1/sessions/{s}/lists/l", b'{"items":[2]}', {"Idempotency-Key": "k-1"}))  # 409
    both(nodes, request("POST", f"/v1/sessions/{s}/lists/l", append, {"Idempotency-Key": ""}))  # 400
    # a write with a query string: the fingerprint covers it (path_qs), on both fronts alike
    both(nodes, request("PUT", f"/v1/sessions/{s}/keys/k?ttl_s=5", b"1", {"Idempotency-Key": "k-2"}))
    (a,) = both(nodes, request("PUT", f"/v1/sessions/{s}/keys/k?ttl_s=5", b"1", {"Idempotency-Key": "k-2"}))
    assert a["idempotent-replayed"] == "true"
    (a,) = both(nodes, request("PUT", f"/v1/sessions/{s}/keys/k?ttl_s=6", b"1", {"Idempotency-Key": "k-2"}))
    assert a["status"] == 409


def test_auth_tenants_request_ids(nodes: Nodes) -> None:
    s = sid_in_shard(2, "auth")
    for path in (f"/v1/sessions/{s}", "/v1/cluster", "/internal/status", f"/v1/sessions/{s}/history"):
        (a,) = both(nodes, request("GET", path, auth=False))
        assert a["status"] == 401 and a["body"]["error"] == "unauthorized"
    both(nodes, request("POST", f"/v1/sessions/{s}/lists/m", b'{"items":[1]}', {"X-Stickystate-Internal": "x" * 24},
                        auth=False))
    for path in ("/livez", "/readyz"):
        both(nodes, request("GET", path, auth=False))
    body = orjson.dumps({"id": "same", "data": {"t": "a"}})
    both(nodes, request("POST", "/v1/sessions", body, {"X-Stickystate-Tenant": "ta"}))
    (a,) = both(nodes, request("POST", "/v1/sessions", body, {"X-Stickystate-Tenant": "tb", "Prefer": "return=minimal"}))
    assert a["body"]["id"] == "same"  # the namespace never shows
    (a,) = both(nodes, request("GET", "/v1/sessions/same", None, {"X-Stickystate-Tenant": "ta"}))
    assert a["body"]["id"] == "same" and a["body"]["data"] == {"t": "a"}
    both(nodes, request("GET", "/v1/sessions/ta:same", None, {"X-Stickystate-Tenant": "tb"}))  # 404
    both(nodes, request("GET", "/v1/sessions/same"))  # no tenant: 404
    both(nodes, request("POST", "/v1/sessions", b"{}", {"X-Stickystate-Session-Id": f"{s}-gen"}))
    # a generated id (its shard is chance: try until it is one both nodes own)
    created, misses = {}, {}
    for name, port in nodes.ports.items():
        for misses[name] in range(40):
            (a,), _ = exchange(port, request("POST", "/v1/sessions", b"", {"Prefer": "return=minimal"}))
            if a.status == 201:
                assert len(a.json()["id"]) >= 22
                created[name] = view(a, generated_id=True)
                break
            assert a.status == 421
    assert created["fast"] == created["aiohttp"] and created["fast"]["preference-applied"] == "return=minimal"
    for name, port in nodes.ports.items():  # as many 421s on both, for test_metrics_counted_alike
        for _ in range(max(misses.values()) - misses[name]):
            (a,), _ = exchange(port, request("POST", "/v1/sessions", orjson.dumps({"id": sid_in_shard(3, "o")})))
            assert a.status == 421
    (a,) = both(nodes, request("GET", f"/v1/sessions/{s}", None, {"X-Request-Id": "rid-first", "x-request-id": "rid-2"}))
    assert a["request_id"] == "rid-first"
    (a,) = both(nodes, request("GET", f"/v1/sessions/{s}", None, {"X-Request-Id": ""}))
    assert a["request_id"] == "<generated>"


def test_api_keys_tenants_on_both_fronts(nodes: Nodes) -> None:
    """A client with an API key, straight to a node: the key names the tenant (the same
    namespace the router's X-Stickystate-Tenant gives), a client cannot assert a tenant
    or an id, another tenant's key does not reach the session, and /internal/* and the
    relayed paths check the same way."""
    s = sid_in_shard(0, "keyed")
    bearer_a, bearer_b = {"Authorization": f"Bearer {KEY_A}"}, {"X-Api-Key": KEY_B}
    (a,) = both(nodes, request("POST", "/v1/sessions", orjson.dumps({"id": s, "data": {"t": "a"}}), bearer_a,
                               auth=False))
    assert a["status"] == 201 and a["body"]["id"] == s
    # what the router would have sent for tenant ta: the same session
    (a,) = both(nodes, request("GET", f"/v1/sessions/{s}", None, {"X-Stickystate-Tenant": "ta"}))
    assert a["status"] == 200 and a["body"]["data"] == {"t": "a"}
    (a,) = both(nodes, request("GET", f"/v1/sessions/{s}", None, bearer_a, auth=False))
    assert a["status"] == 200 and a["body"]["id"] == s
    for method, path, body in (("GET", f"/v1/sessions/{s}", None), ("GET", f"/v1/sessions/ta:{s}", None),
                               ("PATCH", f"/v1/sessions/{s}", b'{"t":"b"}'), ("DELETE", f"/v1/sessions/{s}", None)):
        (a,) = both(nodes, request(method, path, body, bearer_b, auth=False))
        assert a["status"] == 404, (method, path)
    (a,) = both(nodes, request("GET", f"/v1/sessions/{s}", None, {**bearer_b, "X-Stickystate-Tenant": "ta"},
                               auth=False))
    assert a["status"] == 400 and a["body"]["error"] == "bad_header"
    (a,) = both(nodes, request("POST", "/v1/sessions", b"{}", {**bearer_a, "X-Stickystate-Session-Id": s},
                               auth=False))
    assert a["status"] == 400 and a["body"]["error"] == "bad_header"
    # nor the router's watch headers (a shared stream is not counted against the watcher limits)
    for name in ("X-Stickystate-Watch-Shared", "X-Stickystate-Watch-Muted"):
        (a,) = both(nodes, request("GET", f"/v1/sessions/{s}/watch", None, {**bearer_a, name: "1"}, auth=False))
        assert a["status"] == 400 and a["body"]["error"] == "bad_header", name
    for headers in ({}, {"Authorization": "Bearer " + "x" * 20}, {"X-Api-Key": KEY_A[:-1]},
                    {**bearer_a, "X-Stickystate-Internal": "x" * 24}):
        (a,) = both(nodes, request("GET", f"/v1/sessions/{s}", None, headers, auth=False))
        assert a["status"] == 401 and a["www-authenticate"] == "Bearer", headers
    for path in ("/internal/status", "/v2/nothing"):
        (a,) = both(nodes, request("GET", path, None, bearer_a, auth=False))
        assert a["status"] == 401, path
    (a,) = both(nodes, request("GET", f"/v1/sessions/{s}/history", None, bearer_a, auth=False))
    assert a["status"] == 400 and a["body"]["error"] == "bad_operation"  # past the key check: no log here
    (a,) = both(nodes, request("GET", f"/v1/sessions/{s}", None, bearer_a, auth=False))
    assert a["body"]["data"] == {"t": "a"}  # tenant B changed nothing


def test_rate_limit_of_a_direct_client(nodes: Nodes) -> None:
    statuses = []
    for _ in range(RATE_BURST + 1):
        (a,) = both(nodes, request("GET", "/v1/sessions/nothing-here", None, {"X-Api-Key": KEY_C}, auth=False))
        statuses.append(a["status"])
    assert statuses == [404] * RATE_BURST + [429]
    assert a["body"]["error"] == "rate_limited" and int(a["retry-after"]) >= 1
    # the router's requests (internal secret) are not charged to the tenant
    (a,) = both(nodes, request("GET", "/v1/sessions/nothing-here", None, {"X-Stickystate-Tenant": "tc"}))
    assert a["status"] == 404


def test_errors(nodes: Nodes) -> None:
    s = sid_in_shard(0, "err")
    both(nodes, request("POST", "/v1/sessions", orjson.dumps({"id": s})))
    for case in (
        request("GET", "/v1/sessions/" + "x" * 129),  # bad_id
        request("POST", "/v1/sessions", b'{"id":"bad id"}'),
        request("POST", "/v1/sessions", b'{"id":5}'),
        request("POST", "/v1/sessions", b'{"nope":1}'),
        request("POST", "/v1/sessions", b"[1]"),
        request("POST", f"/v1/sessions/{s}/lists/m", b"{"),  # bad_json
        request("POST", f"/v1/sessions/{s}/lists/m", b""),
        request("POST", f"/v1/sessions/{s}/lists/m", b'{"items":1}'),
        request("POST", f"/v1/sessions/{s}/lists/m", b'{"items":[],"max_len":0}'),
        request("POST", f"/v1/sessions/{s}/lists/m", b'{"items":[],"max_len":21}'),  # 413 max_list_len
        request("POST", f"/v1/sessions/{s}/lists/m", b'{"items":' + b"[" * 10 + b"]" * 10 + b"}"),  # max_depth
        request("POST", f"/v1/sessions/{s}/lists/m", b'{"items":[' + b'"x",' * 30 + b'"x"]}'),  # max_list_len
        request("PUT", f"/v1/sessions/{s}", orjson.dumps({"big": "x" * 9000})),  # 413 body (aiohttp's limit)
        request("PUT", f"/v1/sessions/{s}", orjson.dumps({"big": "x" * (MAX_BODY - 10)})),  # exactly the limit
        request("PUT", f"/v1/sessions/{s}", orjson.dumps({"big": "x" * (MAX_BODY - 11)})),  # one under
        request("PUT", f"/v1/sessions/{s}/keys/" + "k" * 257, b"1"),  # bad_key
        request("PUT", f"/v1/sessions/{s}/keys/k", b"1", {"Idempotency-Key": "x" * 129}),
        request("GET", f"/v1/sessions/{sid_in_shard(3, 'other')}"),  # 421 + X-Stickystate-Owner: n2
        request("POST", f"/v1/sessions/{sid_in_shard(3, 'other')}/lists/m", b'{"items":[1]}'),
        request("GET", "/v1/sessions/x-boom-503"),  # 503 + Retry-After
        request("GET", "/v1/sessions/x-boom-500"),  # 500 internal
        request("PUT", f"/v1/sessions/{s}/meta", b"{}"),  # 405 + Allow
        request("GET", "/v2/nothing"),  # 404
        request("DELETE", "/v1/sessions"),  # 405
        request("GET", "/v1/sessions/a%20b"),  # bad_id after decoding
        request("GET", "/v1/sessions/a%3Ab"),  # "a:b": not found
        request("GET", f"/v1/sessions/{s}", b"ignored body of a GET"),
    ):
        both(nodes, case)
    (a,) = both(nodes, request("GET", f"/v1/sessions/{sid_in_shard(3, 'other')}"))
    assert a["status"] == 421 and a["x-stickystate-owner"] == "n2"
    (a,) = both(nodes, request("GET", "/v1/sessions/x-boom-503"))
    assert a["status"] == 503 and a["retry-after"] == "2"


def test_log_lines_carry_the_request_id(nodes: Nodes) -> None:
    seen: list[tuple[str, str | None]] = []

    class Grab(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen.append((record.getMessage(), logs.request_id.get()))
            return True

    grab = Grab()
    logger = logging.getLogger("stickystate.node")
    logger.addFilter(grab)
    try:
        for name, port in nodes.ports.items():
            (a,), _ = exchange(port, request("GET", "/v1/sessions/x-boom-500", None, {"X-Request-Id": f"rid-{name}"}))
            assert a.status == 500 and a.headers["x-request-id"] == f"rid-{name}"
    finally:
        logger.removeFilter(grab)
    assert ("unhandled error", "rid-fast") in seen and ("unhandled error", "rid-aiohttp") in seen


def test_framing_pipelining_keepalive(nodes: Nodes) -> None:
    s = sid_in_shard(1, "frame")
    both(nodes, request("POST", "/v1/sessions", orjson.dumps({"id": s})))
    append = orjson.dumps({"items": ["c" * 100], "max_len": 5})
    both(nodes, request("POST", f"/v1/sessions/{s}/lists/c", append, chunked=True))
    both(nodes, request("POST", f"/v1/sessions/{s}/lists/c", orjson.dumps({"big": "x" * 5000}), chunked=True))  # 413
    # pipelined: a relayed request between two fast ones, answered in order
    pipelined = (request("POST", f"/v1/sessions/{s}/lists/c", append, {"X-Request-Id": "rid-p1"})
                 + request("GET", "/v2/nothing", None, {"X-Request-Id": "rid-p2"})
                 + request("GET", f"/v1/sessions/{s}", None, {"X-Request-Id": "rid-p3"}))
    answers = both(nodes, pipelined, 3, check_close=True)
    assert [a["status"] for a in answers] == [200, 404, 200]
    # Connection: close, and HTTP/1.0 (no keep-alive unless asked)
    for case, closes in ((request("GET", f"/v1/sessions/{s}", None, {"Connection": "close"}), True),
                         (request("GET", f"/v1/sessions/{s}"), False),
                         (request("GET", f"/v1/sessions/{s}", version="1.0"), True),
                         (request("GET", "/v2/nothing", version="1.0"), True),
                         (request("GET", f"/v1/sessions/{s}", None, {"Connection": "keep-alive"}, version="1.0"), False)):
        closed = {exchange(port, case, check_close=True)[1] for port in nodes.ports.values()}
        assert closed == {closes}, case
        both(nodes, case)
    # Expect: 100-continue (the interim answer is not compared)
    both(nodes, request("POST", f"/v1/sessions/{s}/lists/c", append, {"Expect": "100-continue"}))


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET /v1/sessions/x HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /v1/sessions/x HTTP/1.1\r\nHost: n\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /v1/sessions/x?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: n\r\n\r\n",
    b"POST /v1/sessions/x/lists/m HTTP/1.1\r\nHost: n\r\nContent-Length: nope\r\n\r\n",
    b"POST /v1/sessions/x/lists/m HTTP/1.1\r\nHost: n\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_requests_are_a_400_and_the_connection_closes(nodes: Nodes, data: bytes) -> None:
    """aiohttp answers these in text/plain with its parser's wording; the fast front with
    JSON (``bad_request``, as the router's relay). Status and closing must agree."""
    for port in nodes.ports.values():
        answers, closed = exchange(port, data, check_close=True)
        assert [a.status for a in answers] == [400] and closed, (port, answers)


def request_metrics(port: int) -> dict[str, float]:
    """stickystate_requests_total and ..._request_duration_seconds_count samples: line -> value."""
    (a,), _ = exchange(port, request("GET", "/metrics", auth=False))
    assert a.status == 200
    out = {}
    for line in a.body.decode().splitlines():
        if line.startswith(("stickystate_requests_total", "stickystate_request_duration_seconds_count")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_counted_alike(nodes: Nodes) -> None:
    """Both fronts count requests the same way: the same series grow by the same amounts
    for the same traffic. (Whatever other tests sent before: every one of them went to
    both nodes alike, so the totals agree too.)"""
    before = {name: request_metrics(port) for name, port in nodes.ports.items()}
    s = sid_in_shard(2, "metrics")
    append = orjson.dumps({"items": [1]})
    both(nodes, request("POST", "/v1/sessions", orjson.dumps({"id": s})))  # 201
    both(nodes, request("POST", "/v1/sessions", orjson.dumps({"id": s})))  # 409
    for _ in range(3):
        both(nodes, request("POST", f"/v1/sessions/{s}/lists/m", append))  # 200
    both(nodes, request("GET", f"/v1/sessions/{s}"))  # 200
    both(nodes, request("GET", f"/v1/sessions/{s}-absent"))  # 404
    both(nodes, request("GET", f"/v1/sessions/{sid_in_shard(3, 'metrics-other')}"))  # 421
    both(nodes, request("GET", "/v1/sessions/x-boom-503"))  # 503
    after = {name: request_metrics(port) for name, port in nodes.ports.items()}
    grown = {name: {k: v - before[name].get(k, 0.0) for k, v in after[name].items() if v != before[name].get(k, 0.0)}
             for name in after}
    assert grown["fast"] == grown["aiohttp"]
    assert after["fast"] == after["aiohttp"]
    requests = {k: v for k, v in grown["fast"].items() if k.startswith("stickystate_requests_total")}
    assert sorted((re.search(r'op="(\w+)"', k).group(1), re.search(r'status="(\d+)"', k).group(1), v)  # type: ignore[union-attr]
                  for k, v in requests.items()) == [("append", "200", 3.0), ("create", "201", 1.0),
                                                    ("create", "409", 1.0), ("get", "200", 1.0), ("get", "404", 1.0),
                                                    ("get", "421", 1.0), ("get", "503", 1.0)]


# -- hypothesis: session traffic ----------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                     max_leaves=8)
# mostly valid requests on a few sessions (so they get past validation to the store),
# now and then an invalid id, name or header value
_ids = st.sampled_from([sid_in_shard(s, "h") for s in range(PARTITIONS - 1)] * 6
                       + ["bad%20id", "x" * 129, sid_in_shard(PARTITIONS - 1, "h-other")])
_names = st.sampled_from(["m", "k", "k.2"] * 4 + ["bad%20key", "a%3Ab"])
_headers = st.fixed_dictionaries({}, optional={
    "Prefer": st.sampled_from(["return=minimal", "return=representation", "respond-async"]),
    "If-Match": st.sampled_from(['"1"', '"2"', "*", "W/\"3\"", "zz"]),
    "Idempotency-Key": st.sampled_from(["i-1", "i-2", "i-3"]),
    "Durability": st.sampled_from(["memory", "log", "LOG", "memory", "never"]),
    "X-Stickystate-Tenant": st.sampled_from(["ta", "tb"]),
    "X-Request-Id": st.sampled_from(["rid-h1", "rid-h2"]),
})


@st.composite
def _op(draw: Any) -> bytes:
    sid, name, hdrs = draw(_ids), draw(_names), draw(_headers)
    if "If-Match" in hdrs and draw(st.integers(0, 2)):
        del hdrs["If-Match"]  # a precondition now and then: most writes should apply
    kind = draw(st.sampled_from(["create"] * 3 + ["get", "meta", "replace", "patch", "append", "append", "set_key",
                                                  "delete_key", "delete", "raw"]))
    body: Any
    if kind == "create":
        body = draw(st.one_of(st.just({"id": sid}), st.fixed_dictionaries({"id": st.just(sid), "data": _json}),
                              st.fixed_dictionaries({"id": st.just(sid), "ttl_s": st.sampled_from([900, 800, 0, "x"])})))
        method, path = "POST", "/v1/sessions"
    elif kind in ("get", "meta", "delete", "delete_key"):
        method = "GET" if kind in ("get", "meta") else "DELETE"
        path = {"get": f"/v1/sessions/{sid}", "meta": f"/v1/sessions/{sid}/meta", "delete": f"/v1/sessions/{sid}",
                "delete_key": f"/v1/sessions/{sid}/keys/{name}"}[kind]
        body = None
    elif kind in ("replace", "patch"):
        method, path, body = ("PUT" if kind == "replace" else "PATCH"), f"/v1/sessions/{sid}", draw(_json)
    elif kind == "append":
        method, path = "POST", f"/v1/sessions/{sid}/lists/{name}"
        body = draw(st.one_of(st.fixed_dictionaries({"items": st.lists(_json, max_size=3)},
                                                     optional={"max_len": st.integers(0, 3)}),
                              st.fixed_dictionaries({"items": st.lists(_json, max_size=3)}), _json))
    elif kind == "set_key":
        method, path, body = "PUT", f"/v1/sessions/{sid}/keys/{name}" + draw(st.sampled_from(["", "?ttl_s=900"])), draw(_json)
    else:
        method, path = draw(st.sampled_from([("POST", f"/v1/sessions/{sid}"), ("GET", f"/v1/sessions/{sid}/lists/m"),
                                             ("PATCH", "/v1/sessions")]))
        body = None
    raw = orjson.dumps(body) if body is not None else None
    return request(method, path, raw, hdrs, chunked=raw is not None and draw(st.booleans()))


def test_generated_traffic_is_answered_alike_and_reaches_the_store(nodes: Nodes) -> None:
    """Each example is one keep-alive connection carrying its requests pipelined; both
    fronts must answer alike. And the traffic must have tested something: it reached the
    store (successes, not-founds), not only the validation."""
    seen: Counter[tuple[int, str | None]] = Counter()

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_op(), min_size=1, max_size=4))
    def answered_alike(ops: list[bytes]) -> None:
        for a in both(nodes, b"".join(ops), len(ops)):
            seen[(a["status"], a["body"].get("error") if isinstance(a["body"], dict) else None)] += 1

    answered_alike()
    print(sorted(seen.items(), key=lambda kv: -kv[1]))
    assert {200, 201, 404, 400} <= {status for status, _ in seen}, seen
    assert sum(n for (status, _), n in seen.items() if status < 300) >= 50, seen
