"""Chaos workload: unique appends per session through the router, plus periodic reads.

Every session has a fixed durability (``log`` or ``memory``) and receives appends of
unique tokens ``"<sid>:<seq>"`` (seq = 1, 2, 3, ...), one request in flight per session,
so the order in which the client *attempted* them is the order they must appear in.
The total append rate is bounded (each session sends every ``sessions / rate`` seconds;
after a stall it resumes at once, without a catch-up burst).

Recorded per append: token, send time, outcome (HTTP status + time, or an error with
its message), the response headers ``X-Stickystate-Owner`` / ``-Epoch`` / ``-Retries``
and, for a 2xx, the session's list as the response showed it (a read at write time).

A reader task GETs random sessions (``read_rate`` per second, several in flight at
once so one stuck read does not stop the others) and records what each read saw; the
checker uses those for stale-read detection.

Sessions are created at durability ``log`` before any fault, so a ``memory`` session
never disappears as a whole; only its appends are at risk.

Times are ``time.time()`` (unix seconds) so they line up with the node logs' ``ts``.
"""

from __future__ import annotations

import asyncio
import random
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

LIST_FIELD = "items"
MAX_SEQ = 9_000  # stay below the node's max_list_len (10,000) for unbounded lists


def make_sid(run_id: str, i: int, durability: str) -> str:
    return f"cx{run_id}-{i:03d}-{'L' if durability == 'log' else 'M'}"


def token(sid: str, seq: int) -> str:
    return f"{sid}:{seq}"


def parse_items(sid: str, items: Any) -> tuple[array, list[Any]]:
    """The list of a session as seqs of its own tokens, and anything else found in it."""
    seqs = array("l")
    foreign: list[Any] = []
    if not isinstance(items, list):
        return seqs, ([items] if items is not None else [])
    prefix = sid + ":"
    for it in items:
        if isinstance(it, str) and it.startswith(prefix):
            tail = it[len(prefix):]
            if tail.isdigit():
                seqs.append(int(tail))
                continue
        foreign.append(it)
    return seqs, foreign


@dataclass(slots=True)
class Observation:
    """One request's result. ``kind``: append | read | final."""

    kind: str
    sid: str
    sent: float
    seq: int = 0  # appends: the token's seq
    done: float | None = None  # None: never finished (cancelled at the end)
    status: int = -1  # HTTP status; 0 = no HTTP answer (connection error, client timeout)
    error: str | None = None  # error code from the body, or the client-side exception
    message: str | None = None
    owner: str | None = None
    epoch: int | None = None
    retries: int = 0
    version: int | None = None
    seqs: array | None = None  # 2xx: the session's list as answered
    foreign: list[Any] | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "sid": self.sid, "sent": round(self.sent, 6)}
        if self.kind == "append":
            d["seq"] = self.seq
            d["token"] = token(self.sid, self.seq)
        d["done"] = None if self.done is None else round(self.done, 6)
        d["status"] = self.status
        for k in ("error", "message", "owner", "epoch", "version"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        if self.retries:
            d["retries"] = self.retries
        if self.seqs is not None:
            d["seqs"] = compress_seqs(self.seqs)
        if self.foreign:
            d["foreign"] = self.foreign[:20]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Observation:
        o = cls(d["kind"], d["sid"], d["sent"], seq=d.get("seq", 0), done=d.get("done"), status=d["status"],
                error=d.get("error"), message=d.get("message"), owner=d.get("owner"), epoch=d.get("epoch"),
                retries=d.get("retries", 0), version=d.get("version"))
        if "seqs" in d:
            o.seqs = expand_seqs(d["seqs"])
            o.foreign = d.get("foreign", [])
        return o


def expand_seqs(text: str) -> array:
    out = array("l")
    for part in filter(None, text.split(",")):
        a, sep, b = part.partition("-")
        if sep:
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(a))
    return out


def compress_seqs(seqs: Any) -> str:
    """[1,2,3,5,7,8] -> "1-3,5,7-8" (order kept, so out-of-order lists stay visible)."""
    out: list[str] = []
    start = prev = None
    for s in seqs:
        if start is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = s
    if start is not None:
        out.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(out)


@dataclass
class SessionSpec:
    sid: str
    durability: str
    created: bool = False
    next_seq: int = 1


@dataclass
class WorkloadConfig:
    sessions: int = 40
    log_fraction: float = 0.5
    rate: float = 80.0  # appends per second, all sessions together
    read_rate: float = 20.0  # reads per second
    max_reads_in_flight: int = 16
    request_timeout_s: float = 90.0  # > one router attempt (30 s), so order stays defined in practice
    drain_timeout_s: float = 95.0  # at the end, how long to wait for in-flight requests
    seed: int = 1
    run_id: str = "0"


@dataclass
class Workload:
    router_url: str
    cfg: WorkloadConfig
    # Several routers (``--routers``): each session's calls go to one of them; a call whose
    # router failed (connection refused or broken) moves that session to the next one and
    # is tried there at once, with the same Idempotency-Key, as the Python client does.
    routers: list[str] = field(default_factory=list)
    sessions: list[SessionSpec] = field(default_factory=list)
    appends: list[Observation] = field(default_factory=list)
    reads: list[Observation] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0
    setup_errors: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.cfg.seed)
        n = self.cfg.sessions
        n_log = round(n * self.cfg.log_fraction)
        for i in range(n):
            # spread the log sessions evenly over the indices (exactly n_log of them)
            durability = "log" if (i * n_log) // n != ((i + 1) * n_log) // n else "memory"
            self.sessions.append(SessionSpec(make_sid(self.cfg.run_id, i, durability), durability))
        self.durability_of = {s.sid: s.durability for s in self.sessions}
        if not self.routers:
            self.routers = [self.router_url]
        self._router_of = {s.sid: i % len(self.routers) for i, s in enumerate(self.sessions)}
        self.router_moves = 0
        self._http: aiohttp.ClientSession | None = None
        self._stop = asyncio.Event()
        self._read_tasks: set[asyncio.Task[None]] = set()
        self.in_flight: dict[str, Observation] = {}

    # -- HTTP ---------------------------------------------------------------------------
    async def _call(self, obs: Observation, method: str, path: str, body: Any = None,
                    headers: dict[str, str] | None = None) -> Any:
        parsed = await self._call_once(obs, method, path, body, headers)
        for _ in range(len(self.routers) - 1):
            if obs.status != 0 or obs.error != "client_error":
                break
            self._router_of[obs.sid] = (self._router_of.get(obs.sid, 0) + 1) % len(self.routers)
            self.router_moves += 1
            parsed = await self._call_once(obs, method, path, body, headers)
        return parsed

    async def _call_once(self, obs: Observation, method: str, path: str, body: Any = None,
                         headers: dict[str, str] | None = None) -> Any:
        assert self._http is not None
        base = self.routers[self._router_of.get(obs.sid, 0)]
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        data = orjson.dumps(body) if body is not None else None
        parsed: Any = None
        try:
            async with self._http.request(method, base + path, data=data, headers=hdrs,
                                          timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout_s)) as resp:
                payload = await resp.read()
                obs.done = time.time()
                obs.status = resp.status
                obs.owner = resp.headers.get("X-Stickystate-Owner")
                epoch = resp.headers.get("X-Stickystate-Epoch")
                obs.epoch = int(epoch) if epoch and epoch.lstrip("-").isdigit() else None
                retries = resp.headers.get("X-Stickystate-Retries")
                obs.retries = int(retries) if retries and retries.isdigit() else 0
                try:
                    parsed = orjson.loads(payload) if payload else None
                except orjson.JSONDecodeError:
                    parsed = None
                    obs.error = "bad_json_response"
                    obs.message = payload[:200].decode("utf-8", "replace")
        except asyncio.TimeoutError:
            obs.done = time.time()
            obs.status = 0
            obs.error = "client_timeout"
            obs.message = f"no answer in {self.cfg.request_timeout_s}s"
        except aiohttp.ClientError as exc:
            obs.done = time.time()
            obs.status = 0
            obs.error = "client_error"
            obs.message = repr(exc)[:300]
        if obs.status >= 300 and isinstance(parsed, dict):
            obs.error = str(parsed.get("error", obs.error))
            obs.message = str(parsed.get("message", ""))[:300]
        if obs.ok and isinstance(parsed, dict):
            ver = parsed.get("version")
            obs.version = ver if isinstance(ver, int) else None
            data = parsed.get("data")
            items = data.get(LIST_FIELD) if isinstance(data, dict) else None
            obs.seqs, obs.foreign = parse_items(obs.sid, items)
        return parsed

    # -- phases ---------------------------------------------------------------------------
    async def setup(self, http: aiohttp.ClientSession, timeout_s: float = 60.0) -> None:
        """Create every session at durability log (before any fault)."""
        self._http = http
        deadline = time.monotonic() + timeout_s

        async def create(s: SessionSpec) -> None:
            while time.monotonic() < deadline:
                obs = Observation("create", s.sid, time.time())
                await self._call(obs, "POST", "/v1/sessions",
                                 {"id": s.sid, "data": {"durability": s.durability, LIST_FIELD: []}},
                                 headers={"Durability": "log"})
                if obs.status in (200, 201, 409):
                    s.created = True
                    return
                self.setup_errors.append(obs.to_json())
                await asyncio.sleep(0.5)

        await asyncio.gather(*(create(s) for s in self.sessions))
        missing = [s.sid for s in self.sessions if not s.created]
        if missing:
            raise RuntimeError(f"could not create {len(missing)} sessions, e.g. {missing[:3]}: {self.setup_errors[-3:]}")

    def stop(self) -> None:
        self._stop.set()

    async def run(self, http: aiohttp.ClientSession) -> None:
        """Until ``stop()``: appends per session and random reads. Then drain in-flight requests."""
        self._http = http
        self.started_at = time.time()
        tasks = [asyncio.create_task(self._session_loop(s), name=f"append-{s.sid}") for s in self.sessions]
        tasks.append(asyncio.create_task(self._read_loop(), name="reads"))
        await self._stop.wait()
        done, pending = await asyncio.wait(tasks, timeout=self.cfg.drain_timeout_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._read_tasks:
            _, still = await asyncio.wait(self._read_tasks, timeout=max(1.0, self.cfg.drain_timeout_s / 4))
            for t in still:
                t.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        self.ended_at = time.time()

    async def _sleep_until(self, t: float) -> bool:
        """Sleep until unix time ``t``; False if stopped meanwhile."""
        delay = t - time.time()
        if delay > 0:
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
        return not self._stop.is_set()

    async def _session_loop(self, s: SessionSpec) -> None:
        interval = len(self.sessions) / self.cfg.rate
        next_t = time.time() + self.rng.uniform(0, interval)
        while s.next_seq <= MAX_SEQ:
            if not await self._sleep_until(next_t):
                return
            seq = s.next_seq
            s.next_seq += 1
            obs = Observation("append", s.sid, time.time(), seq=seq)
            self.appends.append(obs)
            self.in_flight[s.sid] = obs
            try:
                headers = {"Durability": s.durability}
                if len(self.routers) > 1:  # tried on another router if its router fails: applied once
                    headers["Idempotency-Key"] = f"chaos-{token(s.sid, seq)}"
                await self._call(obs, "POST", f"/v1/sessions/{s.sid}/lists/{LIST_FIELD}",
                                 {"items": [token(s.sid, seq)]}, headers=headers)
            finally:
                # cancelled at the end: the outcome stays unknown (done=None)
                self.in_flight.pop(s.sid, None)
            next_t = max(next_t + interval, time.time())

    async def _read_loop(self) -> None:
        if self.cfg.read_rate <= 0:
            return
        interval = 1.0 / self.cfg.read_rate
        sem = asyncio.Semaphore(self.cfg.max_reads_in_flight)
        next_t = time.time()
        while await self._sleep_until(next_t):
            s = self.rng.choice(self.sessions)
            await sem.acquire()
            task = asyncio.create_task(self._read_one(s.sid, sem))
            self._read_tasks.add(task)
            task.add_done_callback(self._read_tasks.discard)
            next_t = max(next_t + interval, time.time())

    async def _read_one(self, sid: str, sem: asyncio.Semaphore) -> None:
        obs = Observation("read", sid, time.time())
        self.reads.append(obs)
        try:
            await self._call(obs, "GET", f"/v1/sessions/{sid}")
        finally:
            sem.release()

    async def read_all(self, http: aiohttp.ClientSession, kind: str = "final") -> dict[str, Observation]:
        """Read every session once (the final state), a few at a time."""
        self._http = http
        sem = asyncio.Semaphore(8)
        out: dict[str, Observation] = {}

        async def one(sid: str) -> None:
            async with sem:
                for attempt in range(5):
                    obs = Observation(kind, sid, time.time())
                    await self._call(obs, "GET", f"/v1/sessions/{sid}")
                    out[sid] = obs
                    if obs.ok or obs.status == 404:
                        return
                    await asyncio.sleep(0.5 * (attempt + 1))

        await asyncio.gather(*(one(s.sid) for s in self.sessions))
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "sessions_log": sum(s.durability == "log" for s in self.sessions),
            "sessions_memory": sum(s.durability == "memory" for s in self.sessions),
            "appends_attempted": len(self.appends),
            "reads_attempted": len(self.reads),
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "rate": self.cfg.rate,
            "read_rate": self.cfg.read_rate,
            "routers": len(self.routers),
            "router_moves": self.router_moves,  # calls moved to another router after theirs failed
        }
