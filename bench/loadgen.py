"""Open-loop load generator: worker processes with raw HTTP/1.1 keep-alive connections.

Each worker (a separate process, uvloop) owns a fixed share of the sessions and sends
its share of the target rate on a *schedule*: request ``i`` of a step is due at
``start + i / rate`` (or at Poisson arrival times). It is sent at that time whatever
happened to earlier requests, on an idle connection or a new one (up to ``max_conns``
per target; past that it waits in a queue). Latency is measured from the *intended*
send time to the last byte of the response, so time spent waiting for a connection
or behind a slow server counts (no coordinated omission).

Every scheduled request is counted as sent; it ends as ``ok`` (2xx), an error
(``http_<status>``, ``conn_lost``, ``connect``) or ``timeout`` (no answer by the end
of the drain period), so ``sent == ok + errors`` holds by construction and is
checked. Bytes are counted at the socket: the request as written (request line,
headers, body) and the response as read (status line, headers, body).

With ``client: true`` in its config (the ``direct`` system) a worker sends its requests
through the product's ``stickystate.client.AsyncClient`` instead (placement, keep-alive
pools, retries, idempotency keys: what a user's code runs), on the same schedule and with
the same checks; only the bytes are not counted there (the client owns its sockets). Its
CPU per request next to the raw path's (``direct-raw``) is the client's own cost.

The parent talks to a worker over a multiprocessing pipe: ``seed``, ``step``,
``stop``. Each step returns counts, bytes, encoded HdrHistograms (microseconds) and
the worker's own CPU time, so the report can show the generator was not the
bottleneck.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from array import array
from collections import deque
from typing import Any

import orjson

READ, TURN, SEED = 0, 1, 2
OP_NAMES = ("read", "turn", "seed")

LOREM = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
         b"labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris "
         b"nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit "
         b"esse cillum dolore eu fugiat nulla pariatur. Excepteur sint occaecat cupidatat non proident. ") * 8

HIST_MAX_US = 120_000_000  # 2 minutes


LOREM_TEXT = LOREM.decode()


def message_doc(n: int, size: int) -> dict[str, Any]:
    """``message`` as the object a client program would hand to ``AsyncClient.append``."""
    head = len(b'{"role":"user","n":%d,"text":"' % n) + 2
    return {"role": "user", "n": n, "text": LOREM_TEXT[:max(8, size - head)]}


def message(n: int, size: int) -> bytes:
    """A chat message of about ``size`` bytes as JSON: {"role","n","text"}."""
    head = b'{"role":"user","n":%d,"text":"' % n
    tail = b'"}'
    pad = max(8, size - len(head) - len(tail))
    return head + LOREM[:pad] + tail


class Req:
    __slots__ = ("op", "sess", "n", "intended", "data", "check", "expect", "pool", "fut")

    def __init__(self, op: int, sess: int, n: int, intended: float, data: bytes, check: bool,
                 expect: int = 0) -> None:
        self.op = op
        self.sess = sess
        self.n = n
        self.intended = intended
        self.data = data
        self.check = check
        # what a checked answer must exceed or reach: for a read, the newest message
        # acknowledged to this session when the read was sent; for a minimal turn, the
        # highest version answered to this session before the turn was sent
        self.expect = expect
        self.pool: Pool | None = None
        self.fut: asyncio.Future[None] | None = None


class Conn(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.tr: asyncio.Transport | None = None
        self.buf = bytearray()
        self.req: Req | None = None
        self.hend = -1
        self.need = 0
        self.status = 0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]

    def send(self, req: Req) -> None:
        self.req = req
        assert self.tr is not None
        self.tr.write(req.data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.hend < 0:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            self.hend = i + 4
            self.status = int(buf[9:12])
            head = bytes(buf[:i]).lower()
            j = head.find(b"\r\ncontent-length:")
            if j >= 0:
                k = head.find(b"\r", j + 17)
                cl = int(head[j + 17:k if k >= 0 else len(head)])
            elif b"\r\ntransfer-encoding:" in head:
                # not produced by any server here (aiohttp sends Content-Length for a
                # bytes body); refuse rather than mis-frame the next response
                req, self.req = self.req, None
                if req is not None:
                    self.pool.worker.fail(req, "unsupported_framing")
                if self.tr is not None:
                    self.tr.abort()
                return
            else:
                cl = 0
            self.close_after = b"\r\nconnection: close" in head
            self.need = self.hend + cl
        if len(buf) < self.need:
            return
        req = self.req
        self.req = None
        nbytes = self.need
        body = bytes(buf[self.hend:self.need]) if req is not None and req.check else b""
        del buf[:self.need]
        self.hend = -1
        if req is not None:
            self.pool.worker.complete(req, self.status, nbytes, body)
        if self.close_after and self.tr is not None:
            self.tr.close()
        else:
            self.pool.release(self)

    def connection_lost(self, exc: Exception | None) -> None:
        req = self.req
        self.req = None
        self.pool.lost(self)
        if req is not None:
            self.pool.worker.fail(req, "conn_lost")


class Pool:
    """Keep-alive connections to one host:port; one request in flight per connection."""

    def __init__(self, worker: Worker, host: str, port: int, max_conns: int) -> None:
        self.worker = worker
        self.host = host
        self.port = port
        self.max_conns = max_conns
        self.idle: list[Conn] = []
        self.conns: set[Conn] = set()
        self.opening = 0
        self.waiting: deque[Req] = deque()
        self.peak = 0

    def submit(self, req: Req) -> None:
        req.pool = self
        if self.idle:
            self.idle.pop().send(req)
            return
        self.waiting.append(req)
        if len(self.conns) + self.opening < self.max_conns:
            self.opening += 1
            asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
        except OSError:
            self.opening -= 1
            if self.waiting and not self.conns and not self.opening:
                while self.waiting:
                    self.worker.fail(self.waiting.popleft(), "connect")
            elif self.waiting:
                self.worker.fail(self.waiting.popleft(), "connect")
            return
        self.opening -= 1
        self.conns.add(conn)
        self.peak = max(self.peak, len(self.conns))
        self.release(conn)

    def release(self, conn: Conn) -> None:
        if conn not in self.conns:
            return
        if self.waiting:
            conn.send(self.waiting.popleft())
        else:
            self.idle.append(conn)

    def lost(self, conn: Conn) -> None:
        self.conns.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    async def prewarm(self, n: int) -> None:
        want = min(n, self.max_conns) - len(self.conns) - self.opening
        if want <= 0:
            return
        loop = asyncio.get_running_loop()

        async def one() -> None:
            try:
                _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
            except OSError:
                return
            self.conns.add(conn)
            self.peak = max(self.peak, len(self.conns))
            self.release(conn)

        await asyncio.gather(*(one() for _ in range(want)))

    def abort_all(self) -> list[Req]:
        """End of drain: every request still queued or in flight is a timeout."""
        out = list(self.waiting)
        self.waiting.clear()
        for conn in list(self.conns):
            if conn.req is not None:
                out.append(conn.req)
                conn.req = None
                if conn.tr is not None:
                    conn.tr.abort()
        return out


class ClientLane:
    """The worker's requests through ``AsyncClient`` (the ``direct`` system): one task per
    request; a request still in flight at the end of the drain is a timeout."""

    def __init__(self, worker: Worker, cfg: dict[str, Any]) -> None:
        from stickystate.client import AsyncClient, RetryPolicy

        self.worker = worker
        self.client = AsyncClient(cfg["router_url"], durability=cfg.get("durability"),
                                  minimal=cfg.get("turn_response", "minimal") == "minimal",
                                  max_connections_per_host=cfg["max_conns"],
                                  retry=RetryPolicy(request_timeout_s=30.0, total_timeout_s=60.0))
        self.inflight: dict[asyncio.Task[None], Req] = {}
        self.conns = 0

    async def setup(self) -> None:
        await self.client.cluster()

    def submit(self, req: Req) -> None:
        task = asyncio.get_running_loop().create_task(self._run(req))
        self.inflight[task] = req
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.pop(task, None)

    async def _run(self, req: Req) -> None:
        from stickystate.client import ApiError, StickyStateError

        w = self.worker
        sid = w.sessions[req.sess][0]
        client = self.client
        try:
            if req.op == SEED:
                msgs = [message_doc(i, w.msg_bytes) for i in range(w.window)]
                doc = await client.create(sid, {"messages": msgs}, ttl_s=w.cfg.get("ttl_s", 3600), minimal=False)
            elif req.op == TURN:
                doc = await client.append(sid, "messages", [message_doc(req.n, w.msg_bytes)], max_len=w.window)
            else:
                doc = await client.get(sid)
        except ApiError as exc:
            w.complete(req, exc.status, 0, b"")
        except StickyStateError:
            w.fail(req, "client_error")
        else:
            w.complete(req, 200, 0, b"", doc)

    def abort_all(self) -> list[Req]:
        out = list(self.inflight.values())
        for task in list(self.inflight):
            task.cancel()
        self.inflight.clear()
        return out

    async def close(self) -> None:
        await self.client.close()


class StepStats:
    def __init__(self, start: float, duration: float) -> None:
        self.start = start
        self.end = start + duration
        self.sent = [0, 0, 0]
        self.ok = [0, 0, 0]
        self.req_bytes = [0, 0, 0]
        self.resp_bytes = [0, 0, 0]
        self.lat = [array("q"), array("q"), array("q")]
        self.errors: dict[str, int] = {}
        self.in_window = 0
        self.outstanding = 0
        self.max_outstanding = 0
        self.lag = array("q")
        self.checks_ok = 0
        self.checks_fail = 0
        self.check_examples: list[str] = []


class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.kind: str = cfg["kind"]  # sticky | redis | client
        self.window: int = cfg["window"]
        self.msg_bytes: int = cfg["msg_bytes"]
        self.check_every: int = cfg.get("check_every", 50)
        self.rng = random.Random(cfg.get("seed", 1) * 1000 + cfg["wid"])
        self.sessions: list[tuple[str, int]] = list(cfg["sessions"])
        self.rng.shuffle(self.sessions)
        self.sid_bytes = [s.encode() for s, _ in self.sessions]
        self.targets: list[tuple[str, int]] = [tuple(t) for t in cfg["targets"]]  # type: ignore[misc]
        self.hosts = [b"%s:%d" % (h.encode(), p) for h, p in self.targets]
        extra = b""
        if cfg.get("durability"):
            extra += b"Durability: %s\r\n" % cfg["durability"].encode()
        self.extra_headers = extra
        # A turn asks for a minimal answer (RFC 7240 Prefer: return=minimal): every system
        # here keeps or is handed the state, so the client need not get the window back.
        self.minimal: bool = cfg.get("turn_response", "minimal") == "minimal"
        self.turn_headers = extra + (b"Prefer: return=minimal\r\n" if self.minimal else b"")
        self.history: list[deque[bytes]] = []
        n_sessions = len(self.sessions)
        self.turns_sent = [0] * n_sessions  # per session, to bound the version a turn may return
        self.seen_version = [1] * n_sessions  # per session, the highest version a checked answer showed
        self.acked_n = [self.window - 1] * n_sessions  # per session, the newest message acknowledged
        self.cursor = 0
        self.counter = (cfg["wid"] + 1) * 1_000_000_000
        self.pools: list[Pool] = []
        self.lane: ClientLane | None = None  # the direct system: requests through AsyncClient
        self.stats: StepStats | None = None
        self.done_event: asyncio.Event | None = None
        self.sending = False
        self.n_checked = 0

    # -- request construction ------------------------------------------------------
    def _request(self, method: bytes, path: bytes, target: int, body: bytes | None, extra: bytes | None = None) -> bytes:
        extra = self.extra_headers if extra is None else extra
        if body is None:
            return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method, path, self.hosts[target], extra)
        return (b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
                % (method, path, self.hosts[target], len(body), extra)) + body

    def build(self, op: int, idx: int, intended: float) -> Req:
        if self.lane is not None:
            return self._build_for_client(op, idx, intended)
        sid = self.sid_bytes[idx]
        target = self.sessions[idx][1]
        n = self.counter
        self.counter += 1
        check = False
        if op == SEED:
            msgs = [message(i, self.msg_bytes) for i in range(self.window)]
            if self.kind == "client":
                raise AssertionError("client-side sessions are seeded locally")
            body = b'{"id":"%s","data":{"messages":[%s]},"ttl_s":%d}' % (sid, b",".join(msgs), self.cfg.get("ttl_s", 3600))
            data = self._request(b"POST", b"/v1/sessions", target, body)
            return Req(op, idx, n, intended, data, True)
        self.n_checked += 1
        if self.n_checked >= self.check_every:
            self.n_checked = 0
            check = True
        if op == TURN:
            self.turns_sent[idx] += 1
            expect = self.seen_version[idx]
        else:
            expect = self.acked_n[idx]
        if self.kind == "client":
            hist = self.history[idx]
            joined = b",".join(hist)
            if op == TURN:
                msg = message(n, self.msg_bytes)
                body = b'{"history":[%s],"items":[%s],"max_len":%d}' % (joined, msg, self.window)
                hist.append(msg)
                data = self._request(b"POST", b"/v1/turn", target, body, self.turn_headers)
            else:
                data = self._request(b"POST", b"/v1/read", target, b'{"history":[%s]}' % joined)
        elif op == TURN:
            msg = message(n, self.msg_bytes)
            body = b'{"items":[%s],"max_len":%d}' % (msg, self.window)
            data = self._request(b"POST", b"/v1/sessions/%s/lists/messages" % sid, target, body, self.turn_headers)
        else:
            data = self._request(b"GET", b"/v1/sessions/%s" % sid, target, None)
        return Req(op, idx, n, intended, data, check, expect)

    def _build_for_client(self, op: int, idx: int, intended: float) -> Req:
        """The same schedule and checks; the client makes the request itself."""
        n = self.counter
        self.counter += 1
        if op == SEED:
            return Req(op, idx, n, intended, b"", True)
        self.n_checked += 1
        check = self.n_checked >= self.check_every
        if check:
            self.n_checked = 0
        if op == TURN:
            self.turns_sent[idx] += 1
            expect = self.seen_version[idx]
        else:
            expect = self.acked_n[idx]
        return Req(op, idx, n, intended, b"", check, expect)

    def submit(self, req: Req) -> None:
        if self.lane is not None:
            self.lane.submit(req)
        else:
            self.pools[self.sessions[req.sess][1]].submit(req)

    def abort_all(self) -> list[Req]:
        out = self.lane.abort_all() if self.lane is not None else []
        for pool in self.pools:
            out += pool.abort_all()
        return out

    # -- completion -----------------------------------------------------------------
    def complete(self, req: Req, status: int, nbytes: int, body: bytes, doc: Any = None) -> None:
        if req.fut is not None and not req.fut.done():
            req.fut.set_result(None)
        st = self.stats
        if st is None:
            return
        now = time.monotonic()
        st.outstanding -= 1
        if 200 <= status < 300:
            op = req.op
            st.ok[op] += 1
            st.req_bytes[op] += len(req.data)
            st.resp_bytes[op] += nbytes
            st.lat[op].append(int((now - req.intended) * 1e6))
            if op == TURN and req.n > self.acked_n[req.sess]:
                self.acked_n[req.sess] = req.n
            if now <= st.end:
                st.in_window += 1
            if req.check:
                self._check(req, body, doc)
        else:
            key = f"http_{status}"
            st.errors[key] = st.errors.get(key, 0) + 1
            if len(st.check_examples) < 5 and body:
                st.check_examples.append(f"{key}: {body[:200]!r}")
        self._maybe_done()

    def fail(self, req: Req, why: str) -> None:
        if req.fut is not None and not req.fut.done():
            req.fut.set_result(None)
        st = self.stats
        if st is None:
            return
        st.outstanding -= 1
        st.errors[why] = st.errors.get(why, 0) + 1
        self._maybe_done()

    def _maybe_done(self) -> None:
        st = self.stats
        if st is not None and st.outstanding == 0 and not self.sending and self.done_event is not None:
            self.done_event.set()

    def _check(self, req: Req, body: bytes, parsed: Any = None) -> None:
        st = self.stats
        assert st is not None
        try:
            doc = orjson.loads(body) if parsed is None else parsed
            if req.op == SEED:
                ok = len(doc["data"]["messages"]) == self.window
            elif req.op == TURN and self.minimal:
                if self.kind == "client":
                    # the server was handed the history, appended and trimmed it
                    ok = doc["length"] == self.window
                else:
                    # the version is above every version answered before the turn was sent,
                    # and at most 1 + the turns sent to this session so far (only this worker
                    # writes it; turns sent while this one was in flight may have gone first)
                    v = doc["version"]
                    ok = req.expect < v <= 1 + self.turns_sent[req.sess] and "data" not in doc
                    self.seen_version[req.sess] = max(self.seen_version[req.sess], v)
            else:
                window = doc["history"] if self.kind == "client" else doc["data"]["messages"]
                ok = len(window) == self.window
                if ok and req.op == TURN:
                    # the newest message is ours (a concurrent turn on the same session could
                    # follow it, but sessions are visited round-robin, far apart)
                    ok = window[-1]["n"] == req.n
                elif ok and self.kind != "client":
                    # read-your-writes: the window holds every turn acknowledged before the read
                    # was sent (message numbers only grow)
                    ok = window[-1]["n"] >= req.expect
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
            ok = False
            body = f"{exc!r} {body[:100]!r}".encode()
        if ok:
            st.checks_ok += 1
        else:
            st.checks_fail += 1
            if len(st.check_examples) < 5:
                st.check_examples.append(f"check failed ({OP_NAMES[req.op]}): {body[:200]!r}")

    # -- commands ---------------------------------------------------------------------
    async def setup(self) -> dict[str, Any]:
        if self.cfg.get("client"):
            self.lane = ClientLane(self, self.cfg)
            await self.lane.setup()
        else:
            self.pools = [Pool(self, h, p, self.cfg["max_conns"]) for h, p in self.targets]
        if self.kind == "client":
            self.history = [deque((message(i, self.msg_bytes) for i in range(self.window)), maxlen=self.window)
                            for _ in self.sessions]
        return {"sessions": len(self.sessions)}

    async def seed(self, concurrency: int) -> dict[str, Any]:
        """Create every session with a full window (closed loop, ``concurrency`` in flight)."""
        if self.kind == "client":
            return {"sent": len(self.sessions), "ok": len(self.sessions), "errors": {}, "checks_fail": 0,
                    "examples": []}
        st = self.stats = StepStats(time.monotonic(), 1e9)
        for pool in self.pools:
            await pool.prewarm(concurrency)
        loop = asyncio.get_running_loop()
        todo = iter(range(len(self.sessions)))

        async def lane() -> None:
            for idx in todo:
                req = self.build(SEED, idx, time.monotonic())
                req.fut = loop.create_future()
                st.sent[SEED] += 1
                st.outstanding += 1
                self.submit(req)
                await req.fut

        try:
            await asyncio.wait_for(asyncio.gather(*(lane() for _ in range(concurrency))), 300)
        except asyncio.TimeoutError:
            for req in self.abort_all():
                self.fail(req, "timeout")
        self.stats = None
        return {"sent": st.sent[SEED], "ok": st.ok[SEED], "errors": st.errors, "checks_fail": st.checks_fail,
                "examples": st.check_examples}

    async def step(self, p: dict[str, Any]) -> dict[str, Any]:
        rate = float(p["rate"])
        duration = float(p["duration"])
        read_frac = float(p["read_frac"])
        n_total = max(1, int(round(rate * duration)))
        prewarm = int(p.get("prewarm", 16))
        for pool in self.pools:
            await pool.prewarm(prewarm)
        start = float(p["start_at"])
        # the schedule: intended send times, fixed before the step starts
        if p.get("arrivals") == "poisson":
            times = array("d")
            t = start
            for _ in range(n_total):
                t += self.rng.expovariate(rate)
                times.append(t)
        else:
            times = array("d", (start + i / rate for i in range(n_total)))
        ops = bytes(READ if self.rng.random() < read_frac else TURN for _ in range(n_total))
        st = self.stats = StepStats(start, duration)
        self.done_event = asyncio.Event()
        self.sending = True
        n_sessions = len(self.sessions)
        pools = self.pools
        lane = self.lane
        sessions = self.sessions
        gc.collect()
        gc.disable()
        cpu0 = time.process_time()
        delay = start - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        wall0 = time.monotonic()
        i = 0
        try:
            while i < n_total:
                now = time.monotonic()
                while i < n_total and times[i] <= now:
                    idx = self.cursor
                    self.cursor = (idx + 1) % n_sessions
                    op = ops[i]
                    req = self.build(op, idx, times[i])
                    st.sent[op] += 1
                    st.outstanding += 1
                    if st.outstanding > st.max_outstanding:
                        st.max_outstanding = st.outstanding
                    st.lag.append(int((time.monotonic() - times[i]) * 1e6))
                    if lane is not None:
                        lane.submit(req)
                    else:
                        pools[sessions[idx][1]].submit(req)
                    i += 1
                if i < n_total:
                    # uvloop timers have 1 ms resolution and fire at once below ~0.5 ms, which
                    # would spin a core: sleep at least 1 ms (the lateness is measured and
                    # counts in the latency, which runs from the intended send time)
                    await asyncio.sleep(max(0.001, times[i] - time.monotonic()))
            self.sending = False
            self._maybe_done()
            deadline = st.end + float(p["drain_s"])
            if st.outstanding:
                try:
                    await asyncio.wait_for(self.done_event.wait(), max(0.01, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
            for req in self.abort_all():
                self.fail(req, "timeout")
        finally:
            gc.enable()
            self.sending = False
        wall = time.monotonic() - wall0
        cpu = time.process_time() - cpu0
        self.stats = None
        return self._result(st, cpu, wall, duration)

    def _result(self, st: StepStats, cpu: float, wall: float, duration: float) -> dict[str, Any]:
        from hdrh.histogram import HdrHistogram

        ops_out = {}
        for op in (READ, TURN):
            h = HdrHistogram(1, HIST_MAX_US, 3)
            for v in st.lat[op]:
                h.record_value(min(max(v, 1), HIST_MAX_US))
            ops_out[OP_NAMES[op]] = {
                "sent": st.sent[op], "ok": st.ok[op], "req_bytes": st.req_bytes[op], "resp_bytes": st.resp_bytes[op],
                "hdr": h.encode().decode() if st.ok[op] else "",
            }
        lag = sorted(st.lag)
        return {
            "sent": sum(st.sent), "ok": sum(st.ok), "errors": st.errors, "in_window": st.in_window,
            "duration_s": duration, "wall_s": wall, "cpu_s": cpu,
            "max_outstanding": st.max_outstanding, "ops": ops_out,
            "dispatch_lag_ms": {"p50": lag[len(lag) // 2] / 1000 if lag else 0.0,
                                "p99": lag[int(len(lag) * 0.99)] / 1000 if lag else 0.0,
                                "max": lag[-1] / 1000 if lag else 0.0},
            "checks": {"ok": st.checks_ok, "fail": st.checks_fail, "examples": st.check_examples},
            "conns": sum(len(p.conns) for p in self.pools),
        }


def worker_main(conn: Any, cfg: dict[str, Any]) -> None:
    """Process entry: serve commands from the parent until ``stop``."""
    import uvloop

    async def serve() -> None:
        w = Worker(cfg)
        loop = asyncio.get_running_loop()
        while True:
            cmd, arg = await loop.run_in_executor(None, conn.recv)
            try:
                if cmd == "setup":
                    out = await w.setup()
                elif cmd == "seed":
                    out = await w.seed(int(arg))
                elif cmd == "step":
                    out = await w.step(arg)
                elif cmd == "stop":
                    if w.lane is not None:
                        await w.lane.close()
                    for pool in w.pools:
                        for c in list(pool.conns):
                            if c.tr is not None:
                                c.tr.close()
                    conn.send(("ok", {}))
                    return
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", out))
            except Exception as exc:  # report, keep serving: the parent decides
                import traceback

                conn.send(("error", f"{exc!r}\n{traceback.format_exc()}"))

    uvloop.run(serve())
