"""Chaos watchers: every session of the workload is watched through the router while the
faults happen (``GET /v1/sessions/{id}/watch?changes_only=1``, resumed with
``Last-Event-ID`` after every end, as an SSE client does), and the checker compares what
the watchers were told with what the workload was told:

- watched changes lost: an acknowledged append whose token no watcher event carried
  (neither a ``change`` nor the data of a ``state``/``reset``); must be 0 for ``log``
  sessions (a ``memory`` append lost in a crash is lost for watchers too);
- duplicates: a ``change`` whose version is not above the one before it (no reset between);
- order violations: a ``change`` that skips versions (no reset between: a silent gap);
- resets by cause (``overflow``, ``unknown_version``, ``epoch``, ...).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from stickystate.chaos.workload import LIST_FIELD, Observation, parse_items


@dataclass
class WatchLog:
    sid: str
    events: list[tuple[str, int, float]] = field(default_factory=list)  # (kind, version, received at)
    seen: set[int] = field(default_factory=set)  # seqs of tokens any event carried
    resets: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    gaps: int = 0
    streams: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    last_id: str | None = None
    # diagnostics: where a watcher that fell behind is (reported for those not caught up)
    phase: str = "idle"  # connecting | streaming | pacing
    stream_node: str | None = None  # the owner header of the current (or last) stream
    stream_epoch: str | None = None
    stream_opened: float = 0.0
    last_line: float = 0.0  # anything read, keep-alive comments included
    keepalives: int = 0  # in the current stream
    ends: Counter[str] = field(default_factory=Counter)  # ": end <cause>" comments, and how streams ended
    died: str | None = None  # the exception that ended the watcher's task

    @property
    def version(self) -> int:
        return self.events[-1][1] if self.events else 0


class Watchers:
    def __init__(self, base: str | list[str], sids: list[str]) -> None:
        self.bases = [base] if isinstance(base, str) else list(base)  # several routers: round robin
        self.base = self.bases[0]
        self.final: dict[str, int] = {}  # the final versions caught_up waited for
        self.logs = {sid: WatchLog(sid) for sid in sids}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, http: aiohttp.ClientSession) -> None:
        self._tasks = [asyncio.create_task(self._watch(http, w), name=f"watch-{w.sid}") for w in self.logs.values()]

    async def caught_up(self, final: dict[str, Observation], timeout_s: float) -> bool:
        """Wait until every watcher has seen its session's final version."""
        deadline = time.monotonic() + timeout_s
        self.final = {sid: final[sid].version or 0 for sid in self.logs if sid in final}
        while time.monotonic() < deadline:
            if all(w.version >= (final[sid].version or 0) for sid, w in self.logs.items() if sid in final):
                return True
            await asyncio.sleep(0.2)
        return False

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _watch(self, http: aiohttp.ClientSession, w: WatchLog) -> None:
        try:
            await self._watch_loop(http, w)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            w.died = repr(exc)
            raise

    async def _watch_loop(self, http: aiohttp.ClientSession, w: WatchLog) -> None:
        turn = sum(map(ord, w.sid))  # spread the watchers over the routers
        while not self._stop.is_set():
            headers = {"Last-Event-ID": w.last_id} if w.last_id else {}
            base = self.bases[turn % len(self.bases)]
            turn += 1
            w.phase = "connecting"
            try:
                async with http.get(f"{base}/v1/sessions/{w.sid}/watch?changes_only=1", headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as resp:
                    if resp.status != 200:
                        w.refused[resp.status] += 1
                        await resp.read()
                    else:
                        w.streams += 1
                        w.phase, w.stream_opened, w.keepalives = "streaming", time.time(), 0
                        w.stream_node = resp.headers.get("X-Stickystate-Owner")
                        w.stream_epoch = resp.headers.get("X-Stickystate-Epoch")
                        await self._read(resp, w)
                        w.ends["eof"] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                w.ends[type(exc).__name__] += 1
            w.phase = "pacing"
            await asyncio.sleep(0.2)  # reconnect pacing

    async def _read(self, resp: aiohttp.ClientResponse, w: WatchLog) -> None:
        kind, eid, data = "message", "", []
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            w.last_line = time.time()
            if line.startswith(":"):
                if line.startswith(": keep-alive"):
                    w.keepalives += 1
                elif line.startswith(": end"):
                    w.ends[line[2:]] += 1
                continue
            if line:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    kind = value
                elif name == "id":
                    eid = value
                elif name == "data":
                    data.append(value)
                continue
            if data:
                self._event(w, kind, eid, orjson.loads("\n".join(data)))
            kind, data = "message", []

    @staticmethod
    def _event(w: WatchLog, kind: str, eid: str, body: dict[str, Any]) -> None:
        version = int(body["version"])
        if kind in ("state", "reset"):
            if kind == "reset":
                w.resets[str(body.get("cause"))] += 1
            seqs, _ = parse_items(w.sid, body["session"]["data"].get(LIST_FIELD))
            w.seen.update(seqs)
        elif kind == "change":
            last = w.version
            if version <= last:
                w.duplicates += 1
            elif version != last + 1:
                w.gaps += 1
            seqs, _ = parse_items(w.sid, body["event"].get("items"))
            w.seen.update(seqs)
        w.events.append((kind, version, time.time()))
        w.last_id = eid


def check(watchers: Watchers, sessions: dict[str, str], appends: list[Observation], caught_up: bool) -> dict[str, Any]:
    """The watch part of the chaos report; ``failures`` says what breaks a promise."""
    lost: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    for o in appends:
        if not o.ok:
            continue
        w = watchers.logs.get(o.sid)
        if w is not None and o.seq not in w.seen:
            lost[sessions[o.sid]] += 1
            if len(examples) < 10:
                examples.append({"sid": o.sid, "seq": o.seq, "durability": sessions[o.sid]})
    logs = watchers.logs.values()
    resets: Counter[str] = Counter()
    for w in logs:
        resets.update(w.resets)
    rep: dict[str, Any] = {
        "watchers": len(watchers.logs),
        "events": sum(len(w.events) for w in logs),
        "streams": sum(w.streams for w in logs),
        "refused": dict(sum((w.refused for w in logs), Counter())),
        "lost": {"log": lost["log"], "memory": lost["memory"], "examples": examples},
        "duplicates": sum(w.duplicates for w in logs),
        "order_violations": sum(w.gaps for w in logs),
        "resets": dict(resets),
        "caught_up": caught_up,
        "died": sum(1 for w in logs if w.died),
    }
    behind = [w for w in logs if w.died or w.version < watchers.final.get(w.sid, 0)]
    now = time.time()
    rep["behind"] = [{"sid": w.sid, "version": w.version, "final": watchers.final.get(w.sid),
                      "last_event_ago_s": round(now - w.events[-1][2], 1) if w.events else None,
                      "last_id": w.last_id, "streams": w.streams, "phase": w.phase, "stream_node": w.stream_node,
                      "stream_epoch": w.stream_epoch,
                      "stream_age_s": round(now - w.stream_opened, 1) if w.stream_opened else None,
                      "last_line_ago_s": round(now - w.last_line, 1) if w.last_line else None,
                      "keepalives": w.keepalives, "ends": dict(w.ends), "refused": dict(w.refused),
                      "died": w.died} for w in behind][:100]
    failures = []
    if lost["log"]:
        failures.append(f"watchers lost {lost['log']} acknowledged log appends")
    if rep["duplicates"]:
        failures.append(f"watchers got {rep['duplicates']} duplicate changes")
    if rep["order_violations"]:
        failures.append(f"watchers got {rep['order_violations']} changes after a silent gap")
    if not caught_up:
        failures.append("watchers did not catch up with the final reads")
    rep["failures"] = failures
    return rep


def summary_line(rep: dict[str, Any]) -> str:
    return (f"WATCH     {rep['watchers']} watchers, {rep['events']} events over {rep['streams']} streams; "
            f"lost acknowledged: log {rep['lost']['log']}, memory {rep['lost']['memory']}; "
            f"duplicates {rep['duplicates']}; order violations {rep['order_violations']}; "
            f"resets {rep['resets'] or 0}")
