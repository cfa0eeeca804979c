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

    @property
    def version(self) -> int:
        return self.events[-1][1] if self.events else 0


class Watchers:
    def __init__(self, base: str | list[str], sids: list[str]) -> None:
        self.bases = [base] if isinstance(base, str) else list(base)  # several routers: round robin
        self.base = self.bases[0]
        self.logs = {sid: WatchLog(sid) for sid in sids}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, http: aiohttp.ClientSession) -> None:
        self._tasks = [asyncio.create_task(self._watch(http, w), name=f"watch-{w.sid}") for w in self.logs.values()]

    async def caught_up(self, final: dict[str, Observation], timeout_s: float) -> bool:
        """Wait until every watcher has seen its session's final version."""
        deadline = time.monotonic() + timeout_s
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
        turn = sum(map(ord, w.sid))  # spread the watchers over the routers
        while not self._stop.is_set():
            headers = {"Last-Event-ID": w.last_id} if w.last_id else {}
            base = self.bases[turn % len(self.bases)]
            turn += 1
            try:
                async with http.get(f"{base}/v1/sessions/{w.sid}/watch?changes_only=1", headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as resp:
                    if resp.status != 200:
                        w.refused[resp.status] += 1
                        await resp.read()
                    else:
                        w.streams += 1
                        await self._read(resp, w)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.2)  # reconnect pacing

    async def _read(self, resp: aiohttp.ClientResponse, w: WatchLog) -> None:
        kind, eid, data = "message", "", []
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
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
    }
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
