"""The router's HTTP/1.1 relay (router/relay.py) at the edges of the protocol.

Two halves. Against a real cluster (Kafka, node processes, the router process):
pipelined and chunked writes, keep-alive reuse, malformed heads, a client leaving
mid-request, an owner dying while it holds a request. Against an in-process router
in front of a tiny fake node: only what is about HTTP framing and headers (what the
node receives byte for byte, a node closing mid-answer, HEAD, 100-continue, limits),
where a real node would not let us see or provoke it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httptools
import orjson
import pytest
from aiohttp import web

from stickystate.router.forward import HeaderScan, Outgoing, is_session_request, prepare
from stickystate.protocol import shard_of
from stickystate.http.connection import Incoming
from stickystate.http.wire import render
from stickystate.router.server import serve
from stickystate.router.settings import RouterSettings
from stickystate.http.upstream import Reply
from stickystate.local_cluster import LocalCluster, free_port
from tests.helpers import end_offset, unread_bytes, wait_until


# -- a raw HTTP/1.1 client -----------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return orjson.loads(self.body)


class RawConnection:
    """One TCP connection: write any bytes, read answers one by one (httptools splits them)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.answers: list[Answer] = []
        self._parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        self._body = b""
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.answers.append(Answer(self._parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = {}, b""

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read(self, n: int = 1, timeout_s: float = 30.0) -> list[Answer]:
        """The next n answers (fewer if the server closes first)."""
        async def fill() -> None:
            while len(self.answers) < n:
                chunk = await self.reader.read(65536)
                if not chunk:
                    self.closed = True
                    return
                self._parser.feed_data(chunk)
        await asyncio.wait_for(fill(), timeout_s)
        out, self.answers = self.answers[:n], self.answers[n:]
        return out

    async def read_raw_until_closed(self, timeout_s: float = 30.0) -> bytes:
        data = b""
        while chunk := await asyncio.wait_for(self.reader.read(65536), timeout_s):
            data += chunk
        self.closed = True
        return data

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0): unmistakably gone, not half-closed."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def request(method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def chunked(method: str, path: str, pieces: list[bytes], headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Transfer-Encoding: chunked"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    out = ("\r\n".join(lines) + "\r\n\r\n").encode()
    for p in pieces:
        out += b"%x\r\n%s\r\n" % (len(p), p)
    return out + b"0\r\n\r\n"


def sid() -> str:
    return "rl-" + uuid.uuid4().hex[:10]


# == against a real cluster =========================================================================


@pytest.mark.kafka
async def test_pipelined_writes_are_applied_and_answered_in_order(cluster: LocalCluster) -> None:
    s = sid()
    conn = await RawConnection.open(cluster.router_port)
    try:
        burst = request("POST", "/v1/sessions", orjson.dumps({"id": s}))
        for i in range(20):
            burst += request("POST", f"/v1/sessions/{s}/lists/m", orjson.dumps({"items": [i]}),
                             {"X-Request-Id": f"req-{i}"})
        burst += request("GET", f"/v1/sessions/{s}")
        conn.send(burst)  # 22 requests in one write
        answers = await conn.read(22)
    finally:
        await conn.close()
    assert [a.status for a in answers] == [201] + [200] * 21
    assert [a.json()["version"] for a in answers] == list(range(1, 22)) + [21]
    assert [a.headers["x-request-id"] for a in answers[1:21]] == [f"req-{i}" for i in range(20)]
    assert answers[-1].json()["data"]["m"] == list(range(20))


@pytest.mark.kafka
async def test_chunked_bodies_are_forwarded_whole(cluster: LocalCluster) -> None:
    s = sid()
    doc = orjson.dumps({"id": s, "data": {"text": "x" * 3000}})
    conn = await RawConnection.open(cluster.router_port)
    try:
        conn.send(chunked("POST", "/v1/sessions", [doc[i:i + 700] for i in range(0, len(doc), 700)]))
        (created,) = await conn.read()
        conn.send(chunked("PATCH", f"/v1/sessions/{s}", [b'{"more"', b': [1, 2', b", 3]}"]))
        (patched,) = await conn.read()
        # Trailer fields after the last chunk are read (and passed on as headers).
        conn.send(chunked("PATCH", f"/v1/sessions/{s}", [b'{"more": [4]}'])[:-2] + b"X-Trailer: t\r\n\r\n")
        (trailed,) = await conn.read()
        # A chunked create without an id: the router makes one, as for any empty body.
        conn.send(chunked("POST", "/v1/sessions", []))
        (generated,) = await conn.read()
    finally:
        await conn.close()
    assert created.status == 201 and created.json()["data"] == {"text": "x" * 3000}
    assert patched.status == 200 and patched.json()["data"] == {"text": "x" * 3000, "more": [1, 2, 3]}
    assert trailed.status == 200 and trailed.json()["data"]["more"] == [4]
    assert generated.status == 201 and len(generated.json()["id"]) >= 22


@pytest.mark.kafka
async def test_keep_alive_serves_many_requests_on_one_connection(cluster: LocalCluster) -> None:
    s = sid()
    conn = await RawConnection.open(cluster.router_port)
    try:
        conn.send(request("POST", "/v1/sessions", orjson.dumps({"id": s})))
        assert (await conn.read())[0].status == 201
        for i in range(30):  # one at a time, each after the previous answer
            conn.send(request("PUT", f"/v1/sessions/{s}/keys/k", str(i).encode()))
            (a,) = await conn.read()
            assert a.status == 200 and a.json()["data"]["k"] == i
            assert "connection" not in a.headers
        # The router's own endpoints on the same connection, then Connection: close.
        conn.send(request("GET", "/v1/cluster") + request("GET", f"/v1/sessions/{s}", headers={"Connection": "close"}))
        view, last = await conn.read(2)
        assert view.status == 200 and {n["id"] for n in view.json()["nodes"]} == set(cluster.node_ids())
        assert last.status == 200 and last.headers["connection"] == "close"
        assert (await conn.read()) == [] and conn.closed
    finally:
        await conn.close()


@pytest.mark.kafka
async def test_http_1_0_closes_unless_asked_to_keep_alive(cluster: LocalCluster) -> None:
    conn = await RawConnection.open(cluster.router_port)
    conn.send(b"GET /livez HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    (a,) = await conn.read()
    assert a.status == 200 and a.headers["connection"] == "keep-alive"
    conn.send(b"GET /v1/sessions/" + sid().encode() + b" HTTP/1.0\r\n\r\n")
    data = await conn.read_raw_until_closed()
    assert data.startswith(b"HTTP/1.1 404 ") and b"\r\nConnection: close\r\n" in data
    await conn.close()


@pytest.mark.kafka
async def test_malformed_head_gets_a_json_400_after_the_answers_before_it_and_a_close(
        cluster: LocalCluster) -> None:
    s = sid()
    conn = await RawConnection.open(cluster.router_port)
    conn.send(request("POST", "/v1/sessions", orjson.dumps({"id": s})) + b"NOT HTTP AT ALL\r\n\r\n"
              + request("DELETE", f"/v1/sessions/{s}"))
    first, second = await conn.read(2)
    assert (await conn.read(1)) == [] and conn.closed  # the DELETE after the garbage is not run
    await conn.close()
    assert first.status == 201
    assert second.status == 400 and second.json()["error"] == "bad_request"
    assert second.headers["content-type"].startswith("application/json") and second.headers["x-request-id"]
    conn = await RawConnection.open(cluster.router_port)
    conn.send(request("GET", f"/v1/sessions/{s}"))
    (a,) = await conn.read()
    await conn.close()
    assert a.status == 200 and a.json()["version"] == 1


@pytest.mark.kafka
async def test_a_client_leaving_mid_request_forwards_nothing(cluster: LocalCluster) -> None:
    s = sid()
    conn = await RawConnection.open(cluster.router_port)
    conn.send(request("POST", "/v1/sessions", orjson.dumps({"id": s}), {"Durability": "log"}))
    assert (await conn.read())[0].status == 201
    partition = shard_of(s, cluster.partitions)
    before = await end_offset(cluster.kafka_bootstrap, cluster.topic, partition)
    body = orjson.dumps({"items": ["never"]})
    conn.send(request("POST", f"/v1/sessions/{s}/lists/m", body)[:-5])  # the head and most of the body
    # (These two pauses shape the case, they wait for nothing: the router reads the partial
    # request before the client goes, rather than data and EOF at once. Either way, nothing
    # may be forwarded.)
    await asyncio.sleep(0.2)
    await conn.close()
    half_head = await RawConnection.open(cluster.router_port)
    half_head.send(b"PATCH /v1/sessions/" + s.encode() + b" HTTP/1.1\r\nHost: t\r\nContent-Le")
    await asyncio.sleep(0.2)
    await half_head.close()
    conn = await RawConnection.open(cluster.router_port)
    # GET /history first flushes the owner's queue: a change wrongly forwarded before it is
    # in the log (and in the history) by the time it answers.
    conn.send(request("GET", f"/v1/sessions/{s}/history") + request("GET", f"/v1/sessions/{s}"))
    history, a = await conn.read(2)
    await conn.close()
    assert history.status == 200 and [e["op"] for e in history.json()["events"]] == ["create"]
    assert a.status == 200 and a.json()["version"] == 1 and "m" not in a.json()["data"]
    assert await end_offset(cluster.kafka_bootstrap, cluster.topic, partition) == before


@pytest.mark.kafka
async def test_dot_segments_never_reach_a_node(cluster: LocalCluster) -> None:
    """With yarl-style normalisation downstream, /v1/sessions/../../internal/status would
    reach a node's internal endpoint carrying the router's internal secret."""
    conn = await RawConnection.open(cluster.router_port)
    for path in ("/v1/sessions/../../internal/status", "/v1/sessions/%2e%2e/%2E%2E/internal/assign",
                 "/v1/sessions/x/./meta"):
        conn.send(request("GET", path))
        (a,) = await conn.read()
        assert a.status == 400 and a.json()["error"] == "bad_request", path
    await conn.close()


@pytest.mark.kafka
async def test_owner_dying_while_it_holds_a_request_is_failed_over(
        start_cluster: Callable[..., LocalCluster]) -> None:
    """SIGSTOP the owner, send it a write through the router, SIGKILL it: the router's
    connection breaks mid-request and the write is retried on the new owner, once."""
    c = start_cluster(router_env={"STICKYSTATE_HEALTH_FAILURES_TO_DEAD": "1000"})  # only the broken connection tells
    s = sid()
    conn = await RawConnection.open(c.router_port)
    conn.send(request("POST", "/v1/sessions", orjson.dumps({"id": s}), {"Durability": "log"}))
    (created,) = await conn.read()
    owner = created.headers["x-stickystate-owner"]
    owner_port = int(c.node_url(owner).rsplit(":", 1)[1])
    c.signal_node(owner, signal.SIGSTOP)
    unread = unread_bytes(owner_port)  # the router's health checks pile up there too, a few hundred bytes
    item = "once-" + "x" * 20_000  # big enough to tell from them
    conn.send(request("POST", f"/v1/sessions/{s}/lists/m", orjson.dumps({"items": [item]}),
                      {"Durability": "log", "Idempotency-Key": "turn-1"}))
    await wait_until(lambda: unread_bytes(owner_port) >= unread + len(item), timeout_s=30,
                     what="the write to reach the paused owner's socket")
    c.kill_node(owner)
    (a,) = await conn.read(timeout_s=60)
    conn.send(request("GET", f"/v1/sessions/{s}"))
    (after,) = await conn.read()
    await conn.close()
    assert a.status == 200, a.body
    assert a.headers["x-stickystate-owner"] != owner and int(a.headers["x-stickystate-retries"]) >= 1
    assert after.json()["data"]["m"] == [item] and after.json()["version"] == 2


# == framing, against a fake node =====================================================================

SECRET = "internal-secret-for-relay-tests"
KEY = "relay-test-key-0123456789"


class FakeNode:
    """Answers the router's health checks and assignments, and echoes session requests
    (what it received, exactly). Session ids with a meaning: ``die`` (closes halfway
    through its answer, and fails its health checks until ``alive`` is set again),
    ``slow-<ms>`` (answers after that long)."""

    def __init__(self) -> None:
        self.generation = -1
        self.port = free_port()
        self.peers: set[int] = set()
        self.seen: list[dict] = []
        self.finished: list[str] = []  # targets answered in full, in order
        self.transports: dict[int, asyncio.BaseTransport] = {}  # router's port -> our end of its connection
        self.alive = True

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/internal/status", self.status)
        app.router.add_post("/internal/assign", self.assign)
        app.router.add_route("*", "/v1/sessions", self.echo)
        app.router.add_route("*", "/v1/sessions/{sid}", self.echo)
        app.router.add_route("*", "/v1/sessions/{sid}/{rest:.*}", self.echo)
        return app

    async def status(self, request: web.Request) -> web.Response:
        if not self.alive:
            return web.json_response({"error": "dead"}, status=503)
        return web.json_response({"generation": self.generation, "draining": False})

    async def assign(self, request: web.Request) -> web.Response:
        self.generation = (await request.json())["generation"]
        return web.json_response({})

    async def echo(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername")[1]  # type: ignore[union-attr]
        self.peers.add(peer)
        self.transports[peer] = request.transport  # type: ignore[assignment]
        seen = {"method": request.method, "target": request.raw_path, "headers": list(request.headers.items()),
                "body": body.decode("latin-1"), "peer": peer}
        self.seen.append(seen)
        sid = request.match_info.get("sid", "")
        if sid == "die":
            self.alive = False
            resp = web.StreamResponse(status=200)
            resp.content_length = 1000
            await resp.prepare(request)
            await resp.write(b'{"partial": ')
            request.transport.abort()  # type: ignore[union-attr]
            return resp
        if sid.startswith("slow-"):
            await asyncio.sleep(int(sid[5:]) / 1000)  # a slow node, not synchronisation
        self.finished.append(request.raw_path)
        return web.json_response(seen, headers={"X-Stickystate-Owner": "n1", "Connection": "keep-alive"})


@dataclass
class FakeSetup:
    node: FakeNode
    router_port: int


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeSetup]:
    node = FakeNode()
    runner = web.AppRunner(node.app(), keepalive_timeout=1.0, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", node.port).start()
    port = free_port()
    settings = RouterSettings(port=port, nodes=(("n1", f"http://127.0.0.1:{node.port}"),), partitions=4, auth="keys",
                              api_keys=((KEY, "acme"),), internal_secret=SECRET, rate_limit_rps=0,
                              max_request_bytes=64 * 1024, max_attempts=2)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    for _ in range(100):
        try:
            c = await RawConnection.open(port)
            await c.close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    yield FakeSetup(node, port)
    stop.set()
    await task
    await runner.cleanup()


AUTH = {"Authorization": f"Bearer {KEY}"}


async def one(fake: FakeSetup, data: bytes, n: int = 1) -> list[Answer]:
    conn = await RawConnection.open(fake.router_port)
    try:
        conn.send(data)
        return await conn.read(n)
    finally:
        await conn.close()


async def test_what_the_node_receives(fake: FakeSetup) -> None:
    (a,) = await one(fake, request("PATCH", "/v1/sessions/s1%3Ax?ttl_s=5", b'{"a":1}', {
        **AUTH, "X-Api-Key": "other", "X-Stickystate-Tenant": "evil", "X-Stickystate-Internal": "forged",
        "X-Stickystate-Session-Id": "forged", "X-Request-Id": "rid-1", "Keep-Alive": "timeout=5", "X-Custom": "kept"}))
    seen = a.json()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["method"] == "PATCH" and seen["target"] == "/v1/sessions/s1%3Ax?ttl_s=5"  # as the client sent it
    assert seen["body"] == '{"a":1}' and headers["content-length"] == "7"
    assert headers["x-stickystate-internal"] == SECRET and headers["x-stickystate-tenant"] == "acme"
    assert "authorization" not in headers and "x-api-key" not in headers and "keep-alive" not in headers
    assert "x-stickystate-session-id" not in headers
    assert headers["x-request-id"] == "rid-1" and headers["x-custom"] == "kept"
    assert headers["idempotency-key"].startswith("router-")  # every write carries one
    assert a.headers["x-request-id"] == "rid-1"
    (r,) = await one(fake, request("GET", "/v1/sessions/s1", headers={**AUTH, "Idempotency-Key": "mine"}))
    assert {k.lower(): v for k, v in r.json()["headers"]}["idempotency-key"] == "mine"
    (c,) = await one(fake, request("POST", "/v1/sessions", b"", AUTH))
    headers = {k.lower(): v for k, v in c.json()["headers"]}
    assert len(headers["x-stickystate-session-id"]) >= 22  # the router made the id


async def test_api_keys_and_request_ids_at_the_relay(fake: FakeSetup) -> None:
    a, b, c = await one(fake, request("GET", "/v1/sessions/s1") + request("GET", "/v1/sessions/s1", headers={
        "X-Api-Key": "wrong-key-0123456789"}) + request("GET", "/v1/sessions/s1", headers={"X-Api-Key": KEY}), 3)
    assert a.status == b.status == 401 and a.json()["error"] == "unauthorized"
    assert a.headers["www-authenticate"] == "Bearer" and len(a.headers["x-request-id"]) == 16
    assert c.status == 200


async def test_a_node_closing_mid_answer_is_a_json_503_and_the_client_connection_survives(fake: FakeSetup) -> None:
    """The only node breaks off its answer (and fails its health checks from then on): the
    router declares it dead, has no node left for the retry, and says so in a JSON 503 on
    a connection that stays usable; once the node is healthy again, requests go through."""
    conn = await RawConnection.open(fake.router_port)
    try:
        conn.send(request("GET", "/v1/sessions/die", headers=AUTH))
        (a,) = await conn.read()
        assert (a.status, a.json()["error"], a.json()["message"]) == (503, "no_nodes", "no healthy node"), a.body
        assert b"partial" not in a.body and a.headers["retry-after"] == "1"
        fake.node.alive = True
        answers: list[int] = []

        async def answered() -> bool:
            conn.send(request("GET", "/v1/sessions/ok", headers=AUTH))
            (b,) = await conn.read()
            answers.append(b.status)
            return b.status == 200

        await wait_until(answered, timeout_s=20, interval_s=0.1, what="the node to be healthy again")
        assert set(answers[:-1]) <= {503}, answers  # until then: the same JSON 503, on the same connection
    finally:
        fake.node.alive = True
        await conn.close()


async def test_pipelined_answers_keep_request_order_when_later_ones_are_faster(fake: FakeSetup) -> None:
    burst = b"".join(request("GET", f"/v1/sessions/slow-{ms}", headers={**AUTH, "X-Request-Id": f"r{i}"})
                     for i, ms in enumerate([300, 0, 150, 0, 50]))
    answers = await one(fake, burst, 5)
    assert [a.headers["x-request-id"] for a in answers] == ["r0", "r1", "r2", "r3", "r4"]
    assert [a.json()["target"] for a in answers] == [f"/v1/sessions/slow-{ms}" for ms in [300, 0, 150, 0, 50]]


async def test_upstream_connections_are_reused(fake: FakeSetup) -> None:
    before = set(fake.node.peers)
    conns = [await RawConnection.open(fake.router_port) for _ in range(4)]
    for _ in range(10):
        for c in conns:
            c.send(request("GET", "/v1/sessions/reuse", headers=AUTH))
        for c in conns:
            assert (await c.read())[0].status == 200
    for c in conns:
        await c.close()
    assert len(fake.node.peers - before) <= 4  # 40 requests, at most one upstream connection per client one


async def test_an_idle_connection_the_node_closed_is_not_a_failover(fake: FakeSetup) -> None:
    async def failovers() -> float:
        (m,) = await one(fake, request("GET", "/metrics"))
        line = next(ln for ln in m.body.decode().splitlines() if ln.startswith("stickystate_router_failovers_total"))
        return float(line.split()[-1])

    before = await failovers()
    for _ in range(3):
        (a,) = await one(fake, request("GET", "/v1/sessions/idle", headers=AUTH))
        assert a.status == 200 and "x-stickystate-retries" not in a.headers
        upstream = fake.node.transports[a.json()["peer"]]
        await wait_until(upstream.is_closing, timeout_s=10,  # the fake node closes keep-alive connections idle 1 s
                         what="the node to close the idle connection")
    assert await failovers() == before


async def test_head_answers_have_no_body(fake: FakeSetup) -> None:
    conn = await RawConnection.open(fake.router_port)
    conn.send(request("HEAD", "/v1/sessions/h", headers=AUTH) + request("GET", "/livez", headers={"Connection": "close"}))
    data = await conn.read_raw_until_closed()
    await conn.close()
    head, rest = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: " in head
    assert rest.startswith(b"HTTP/1.1 200 ")  # the next answer follows the head directly


async def test_expect_100_continue(fake: FakeSetup) -> None:
    body = b'{"items": [1]}'
    conn = await RawConnection.open(fake.router_port)
    try:
        conn.send(request("POST", "/v1/sessions/e/lists/m", None, {
            **AUTH, "Expect": "100-continue", "Content-Length": str(len(body))}))
        interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.send(body)
        (a,) = await conn.read()
        assert a.status == 200 and a.json()["body"] == body.decode()
        assert "expect" not in {k.lower() for k, _ in a.json()["headers"]}
        # Too large: refused at once, no 100.
        conn.send(request("PUT", "/v1/sessions/e", None, {**AUTH, "Expect": "100-continue",
                                                           "Content-Length": str(10**9)}))
        (big,) = await conn.read()
        assert big.status == 413 and big.json()["error"] == "too_large" and big.headers["connection"] == "close"
    finally:
        await conn.close()


async def test_body_over_the_limit_is_a_413_and_a_close(fake: FakeSetup) -> None:
    big = b"x" * (64 * 1024 + 1)
    conn = await RawConnection.open(fake.router_port)
    conn.send(chunked("PUT", "/v1/sessions/big", [big[:40000], big[40000:]], AUTH))
    (a,) = await conn.read()
    await conn.close()
    assert a.status == 413 and a.json() == {**a.json(), "error": "too_large", "limit": "max_body_bytes"}
    assert not any(s["target"] == "/v1/sessions/big" for s in fake.node.seen)


async def test_heads_that_are_not_http_or_too_large_are_400s(fake: FakeSetup) -> None:
    for data in (b"GET /v1/sessions/x HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
                 b"GET /v1/sessions/x HTTP/1.1\r\n\r\n",  # 1.1 without Host
                 b"GET /v1/sessions/x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
                 b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):  # a TLS ClientHello
        conn = await RawConnection.open(fake.router_port)
        conn.send(data)
        (a,) = await conn.read()
        assert a.status == 400 and a.json()["error"] == "bad_request" and a.headers["connection"] == "close", data[:40]
        assert (await conn.read()) == [] and conn.closed
        await conn.close()


async def test_a_client_leaving_while_its_request_is_forwarded(fake: FakeSetup) -> None:
    conn = await RawConnection.open(fake.router_port)
    conn.send(request("GET", "/v1/sessions/slow-300", headers=AUTH) + request("GET", "/v1/sessions/after", headers=AUTH))
    await wait_until(lambda: any(s["target"] == "/v1/sessions/slow-300" for s in fake.node.seen), timeout_s=10,
                     interval_s=0.01, what="the node to hold the first request (it answers after 300 ms)")
    conn.reset()  # gone (RST) before the answers
    # The router gets the first answer; a queued "after" would be forwarded right then.
    await wait_until(lambda: "/v1/sessions/slow-300" in fake.node.finished, timeout_s=10,
                     what="the node to answer the first request")
    (a,) = await one(fake, request("GET", "/v1/sessions/next", headers=AUTH))  # one more round through the router
    assert a.status == 200
    assert not any(s["target"] == "/v1/sessions/after" for s in fake.node.seen)  # queued, never forwarded


async def test_a_half_closed_client_still_gets_its_answers(fake: FakeSetup) -> None:
    conn = await RawConnection.open(fake.router_port)
    conn.send(request("GET", "/v1/sessions/slow-100", headers=AUTH) + request("GET", "/v1/sessions/hc", headers=AUTH))
    conn.writer.write_eof()  # "nothing more from me", as `nc -N` or some HTTP/1.0 clients do
    first, second = await conn.read(2)
    assert (first.status, second.status) == (200, 200) and second.headers["connection"] == "close"
    assert (await conn.read()) == [] and conn.closed
    await conn.close()


# == pure: routing decision, request preparation, answer framing ===============================


@pytest.mark.parametrize("method,target,forwarded", [
    (b"POST", b"/v1/sessions", True), (b"POST", b"/v1/sessions?x=1", True), (b"GET", b"/v1/sessions", False),
    (b"GET", b"/v1/sessions/abc", True), (b"DELETE", b"/v1/sessions/abc/keys/k?x", True),
    (b"GET", b"/v1/sessions/", False), (b"GET", b"/v1/sessions//x", False), (b"GET", b"/v1/sessionsx", False),
    (b"GET", b"/v1/cluster", False), (b"GET", b"/livez", False), (b"GET", b"http://h/v1/sessions/a", False),
])
def test_which_requests_the_relay_forwards(method: bytes, target: bytes, forwarded: bool) -> None:
    assert is_session_request(method, target) is forwarded


def _prep(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"",
          tenant: str | None = None) -> Outgoing | Reply:
    return prepare(method, target, HeaderScan(headers), body, tenant=tenant, request_id=b"rid",
                   internal_lines=b"X-Stickystate-Internal: s\r\n", partitions=8)


def test_prepare_rewrites_headers_and_routes_by_the_tenant_s_id() -> None:
    out = _prep(b"PUT", b"/v1/sessions/a%2Db/keys/k", [(b"Host", b"x"), (b"Authorization", b"Bearer k"),
                                                     (b"X-Stickystate-Tenant", b"evil"), (b"If-Match", b'"1"')],
                b"5", tenant="acme")
    assert isinstance(out, Outgoing)
    head = out.head.decode()
    assert head.startswith("PUT /v1/sessions/a%2Db/keys/k HTTP/1.1\r\n")
    assert 'If-Match: "1"\r\n' in head and "X-Stickystate-Tenant: acme\r\n" in head and "evil" not in head
    assert "Authorization" not in head and "Host" not in head and "X-Request-Id: rid\r\n" in head
    assert "Idempotency-Key: router-" in head and out.tail == b"Content-Length: 1\r\n\r\n"
    assert out.shard == shard_of("acme:a-b", 8)  # the decoded id, namespaced
    get = _prep(b"GET", b"/v1/sessions/a", [(b"Idempotency-Key", b"mine")])
    assert isinstance(get, Outgoing) and get.tail == b"\r\n" and get.head.count(b"Idempotency-Key") == 1


def test_prepare_refuses_bad_ids_and_dot_segments() -> None:
    for target in (b"/v1/sessions/has%20space", b"/v1/sessions/" + b"x" * 129, b"/v1/sessions/%C3%A9"):
        out = _prep(b"GET", target, [])
        assert isinstance(out, Reply) and out.status == 400 and orjson.loads(out.body)["error"] == "bad_id"
    for target in (b"/v1/sessions/..", b"/v1/sessions/a/../../internal/assign", b"/v1/sessions/a/%2E"):
        out = _prep(b"POST", target, [])
        assert isinstance(out, Reply) and orjson.loads(out.body)["error"] == "bad_request", target
    created = _prep(b"POST", b"/v1/sessions", [], b'{"id": "from-body"}')
    assert isinstance(created, Outgoing) and created.shard == shard_of("from-body", 8)
    assert b"X-Stickystate-Session-Id" not in created.head
    generated = _prep(b"POST", b"/v1/sessions", [], b"not json")
    assert isinstance(generated, Outgoing) and b"X-Stickystate-Session-Id: " in generated.head


def _framed(reply: Reply, method: bytes = b"GET", keep_alive: bool = True, http10: bool = False) -> bytes:
    req = Incoming()
    req.method, req.keep_alive, req.http10 = method, keep_alive, http10
    return b"".join(render(reply, req, b"rid"))


def test_render_frames_answers_for_this_hop() -> None:
    node = Reply(200, b"OK", [(b"Content-Type", b"application/json"), (b"Content-Length", b"999"),
                              (b"Connection", b"close"), (b"Transfer-Encoding", b"chunked"),
                              (b"X-Request-Id", b"node-rid"), (b"ETag", b'"3"')], b'{"a":1}')
    out = _framed(node)
    assert out == (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: "3"\r\nX-Request-Id: rid\r\n'
                   b'Content-Length: 7\r\n\r\n{"a":1}')
    assert _framed(node, b"HEAD").endswith(b"Content-Length: 999\r\n\r\n")  # the GET's length, no body
    assert _framed(Reply(204, b"No Content", [], b""), keep_alive=False).endswith(b"Connection: close\r\n\r\n")
    assert b"Content-Length" not in _framed(Reply(204, b"No Content", [], b""))
    assert b"Connection: keep-alive\r\n" in _framed(node, http10=True)
