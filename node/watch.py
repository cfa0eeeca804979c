"""Watching a session: its changes in version order, as Server-Sent Events, resumable
(asyncio, no aiohttp; the fronts write the frames, node/handlers.py opens the watch).

``WatchHub`` is the node's registry of watched sessions. The write path calls
``changed`` once per change (node/writes.py, node/expiry.py: one dict lookup for a
session nobody watches); ownership calls ``shard_lost`` when the node stops owning a
shard, which ends its streams (the client resumes on the new owner, through the router or
straight there). Per watched session the hub keeps a ring of its last changes (resume from
memory); a session whose last watcher left keeps its ring for a while (``LINGER_S``,
at most ``MAX_IDLE`` such sessions) so a reconnecting client resumes from memory too.

The stream (``Watch.frames``): ``retry:`` (with jitter), then ``state`` (the session), or
for a resume the changes after the client's position, or ``reset`` (the full state) when
they cannot be given exactly; then one ``change`` per change, ``deleted``/``expired`` and
the end. A comment line every ``heartbeat_s``.

Positions (SSE ``id:``) are ``<version>:<epoch>:<life>``: the version, the epoch of
the owner that sent it (it held that version then), and the session's lifetime
(``created_at`` in microseconds: a deleted and re-created id starts again at version 1).
A resume is exact iff this owner holds the same content at that version: same
lifetime, version not newer than the current one, and the event that wrote it has an
epoch not above the sender's (an owner of epoch E held every version written under
epochs <= E that the log kept; a version written after E by a later owner means E's
was lost, e.g. a ``memory`` write lost in a crash). Otherwise ``reset``, with its cause.
A bare version (``after_version=n`` or ``Last-Event-ID: n``) is taken as of this owner's
epoch and the current lifetime.

Where the changes after a position come from: the ring, else the log (the ``/history``
read of the shard's partition, replayed with the same ``apply`` as any replica to give
each version's data), else (retention removed them, the lifetime's start is gone) a
``reset``. The watcher is subscribed before the log is read, so nothing falls between.

A watcher never slows the owner: ``changed`` only appends to each watcher's bounded
buffer; on overflow the buffer is emptied and the watcher gets a ``reset`` with the
state as it is when it catches up.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from stickystate.errors import StickyError, TooManyRequests, Unavailable
from stickystate.node.ops import Op, Session, apply, live_keys, view

_POSITION = re.compile(r"[0-9]{1,19}(:[0-9]{1,19}:[0-9]{1,19})?")  # as docs/openapi.yaml (ASCII digits only)
LINGER_S = 120.0  # a session's ring is kept this long after its last watcher left
MAX_IDLE = 1000  # at most this many such sessions (least recently watched dropped first)
RESET_CAUSES = ("lifetime", "unknown_version", "epoch", "history_gone", "overflow")
LogReader = Callable[[int, str], Awaitable[list[dict[str, Any]]]]


@dataclass(frozen=True)
class WatchLimits:
    per_session: int = 100
    per_node: int = 10_000
    buffer_events: int = 1000
    ring_events: int = 128
    heartbeat_s: float = 15.0
    retry_ms: int = 2000

    def __post_init__(self) -> None:
        if min(self.per_session, self.per_node, self.buffer_events, self.ring_events, self.retry_ms) < 1:
            raise ValueError("watch limits must be >= 1")
        if self.heartbeat_s <= 0:
            raise ValueError("watch_heartbeat_s must be > 0")


def life_of(state: Session) -> int:
    return int(round(state["created_at"] * 1_000_000))


@dataclass
class Change:
    """One change of a watched session, as the write path produced it."""

    version: int
    epoch: int  # of the event that wrote it
    kind: str  # change | deleted | expired
    event: Op
    data: dict[str, Any] | None  # the data after it (None: deleted or expired)
    life: int
    frames: dict[tuple[bool, int], bytes] = field(default_factory=dict)  # (changes_only, sender epoch) -> frame


def parse_position(raw: str) -> tuple[int, int | None, int | None] | None:
    """``<version>[:<epoch>:<life>]`` -> (version, epoch, life); None if malformed."""
    if _POSITION.fullmatch(raw.strip()) is None:
        return None
    parts = raw.strip().split(":")
    if len(parts) == 1:
        return int(parts[0]), None, None
    return int(parts[0]), int(parts[1]), int(parts[2])


class Watcher:
    """One stream's bounded buffer of changes."""

    __slots__ = ("limit", "buffer", "overflowed", "ended", "wake", "hub")

    def __init__(self, hub: WatchHub, limit: int) -> None:
        self.hub = hub
        self.limit = limit
        self.buffer: deque[Change] = deque()
        self.overflowed = False
        self.ended: str | None = None
        self.wake = asyncio.Event()

    def push(self, change: Change) -> None:
        if self.overflowed:
            return
        if len(self.buffer) >= self.limit:
            self.buffer.clear()  # the owner does not wait: this watcher gets a reset instead
            self.overflowed = True
            self.hub.count_reset("overflow")  # counted now: the reset itself is sent when the watcher reads again
        else:
            self.buffer.append(change)
            if len(self.buffer) > self.hub.buffer_peak:
                self.hub.buffer_peak = len(self.buffer)
        self.wake.set()

    def end(self, cause: str) -> None:
        self.ended = cause
        self.wake.set()


@dataclass
class Watched:
    shard: int
    ring: deque[Change]
    watchers: set[Watcher] = field(default_factory=set)
    idle_since: float = 0.0
    life: int = 0  # of the session as last seen (a delete's change carries it)


class WatchHub:
    def __init__(self, limits: WatchLimits) -> None:
        self.limits = limits
        self.sessions: dict[str, Watched] = {}
        self.idle: OrderedDict[str, float] = OrderedDict()
        self.pollers: dict[str, list[asyncio.Future[None]]] = {}  # long-polls waiting for a change
        self.watchers = 0
        self.buffer_peak = 0  # the most changes any watcher's buffer held (never above buffer_events)
        self.resets: dict[str, int] = dict.fromkeys(RESET_CAUSES, 0)
        self.resumed: dict[str, int] = {"memory": 0, "log": 0}  # exact resumes, by where the changes came from
        self.opened_total = 0
        self.refused_total = 0

    # -- the write path's hook ------------------------------------------------------------
    def changed(self, shard: int, event: Op, new: Session | None) -> None:
        sid = event["sid"]
        polls = self.pollers.pop(sid, None)
        if polls is not None:
            for fut in polls:
                if not fut.done():
                    fut.set_result(None)
        w = self.sessions.get(sid)
        if w is None:
            return
        op = event["op"]
        kind = "change" if new is not None else ("expired" if op == "expire" else "deleted")
        life = life_of(new) if new is not None else w.life
        w.life = life
        change = Change(event["ver"], event["epoch"], kind, event,
                        None if new is None else live_keys(new, event["at"]), life)
        ring = w.ring
        if ring and (ring[-1].life != life or ring[-1].version != change.version - 1):
            ring.clear()  # a new lifetime (or a gap): the ring holds one contiguous run
        if new is None:
            ring.clear()
        else:
            ring.append(change)
        for watcher in w.watchers:
            watcher.push(change)

    def shard_lost(self, shard: int) -> None:
        """No longer the owner: its streams end (clients resume on the new owner)."""
        for sid in [sid for sid, w in self.sessions.items() if w.shard == shard]:
            w = self.sessions.pop(sid)
            self.idle.pop(sid, None)
            for watcher in w.watchers:
                watcher.end("shard_moved")
        # (long-polls find the shard gone when their wait ends: a 421, which the router retries)

    def close_all(self, cause: str = "node_stopping") -> None:
        for w in self.sessions.values():
            for watcher in w.watchers:
                watcher.end(cause)
        self.sessions.clear()
        self.idle.clear()
        for polls in self.pollers.values():
            for fut in polls:
                if not fut.done():
                    fut.set_result(None)
        self.pollers.clear()

    # -- long-poll -----------------------------------------------------------------------
    def next_change(self, sid: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pollers.setdefault(sid, []).append(fut)
        return fut

    def forget_poll(self, sid: str, fut: asyncio.Future[None]) -> None:
        polls = self.pollers.get(sid)
        if polls is not None:
            if fut in polls:
                polls.remove(fut)
            if not polls:
                del self.pollers[sid]

    # -- watchers ------------------------------------------------------------------------
    def subscribe(self, shard: int, sid: str, life: int) -> tuple[Watched, Watcher]:
        limits = self.limits
        w = self.sessions.get(sid)
        if w is not None and len(w.watchers) >= limits.per_session:
            self.refused_total += 1
            raise TooManyRequests(f"this session has {limits.per_session} watchers already (watch_max_per_session)",
                                  retry_after_s=5, code="too_many_watchers")
        if self.watchers >= limits.per_node:
            self.refused_total += 1
            raise Unavailable(f"this node has {limits.per_node} watchers already (watch_max_per_node)",
                              retry_after_s=5, code="too_many_watchers")
        if w is None:
            w = self.sessions[sid] = Watched(shard, deque(maxlen=limits.ring_events))
        w.life = life
        self.idle.pop(sid, None)
        watcher = Watcher(self, limits.buffer_events)
        w.watchers.add(watcher)
        self.watchers += 1
        self.opened_total += 1
        return w, watcher

    def unsubscribe(self, sid: str, watcher: Watcher) -> None:
        self.watchers -= 1
        w = self.sessions.get(sid)
        if w is None or watcher not in w.watchers:
            return
        w.watchers.discard(watcher)
        if not w.watchers:
            now = time.monotonic()
            w.idle_since = now
            self.idle[sid] = now
            while self.idle:
                oldest, since = next(iter(self.idle.items()))
                if len(self.idle) <= MAX_IDLE and now - since < LINGER_S:
                    break
                self.idle.popitem(last=False)
                gone = self.sessions.get(oldest)
                if gone is not None and not gone.watchers:
                    del self.sessions[oldest]

    def count_reset(self, cause: str) -> None:
        self.resets[cause] = self.resets.get(cause, 0) + 1

    def status(self) -> dict[str, Any]:
        return {"watchers": self.watchers, "sessions": len(self.sessions), "buffer_peak": self.buffer_peak,
                "buffer_limit": self.limits.buffer_events, "resets": dict(self.resets),
                "resumed": dict(self.resumed),
                "opened_total": self.opened_total, "refused_total": self.refused_total}


# -- frames --------------------------------------------------------------------------------
def frame(kind: str, position: str, body: dict[str, Any]) -> bytes:
    return b"".join((b"id: ", position.encode(), b"\nevent: ", kind.encode(), b"\ndata: ", orjson.dumps(body),
                     b"\n\n"))


class Watch:
    """One stream: open synchronously (``open``: subscribed, first frames decided), then
    ``frames`` until the session goes, the shard moves, or the client leaves."""

    def __init__(self, hub: WatchHub, shard: Any, sid: str, public_id: str, changes_only: bool,
                 clock: Callable[[], float], log_reader: LogReader | None) -> None:
        self.hub = hub
        self.shard = shard  # node/shard.py Shard (owned): current state for resets
        self.sid = sid
        self.public_id = public_id
        self.changes_only = changes_only
        self.clock = clock
        self.log_reader = log_reader
        self.epoch: int = shard.my_epoch
        self.watcher: Watcher | None = None
        self.sent = 0  # last version sent
        self.life = 0
        self.first: list[bytes] = []
        self.headers: dict[str, str] = {}  # of the answer (set by the handler)
        self.from_log: int | None = None  # resume: the position to read the log from
        self.check_epoch: int | None = None  # resume: the sender's epoch the writer of from_log must not exceed

    def open(self, position: tuple[int, int | None, int | None] | None) -> None:
        """Subscribe and decide the first frames; synchronous (no change can slip between)."""
        state = self.shard.sessions.get(self.sid)
        assert state is not None  # the handler checked it
        self.life = life_of(state)
        w, self.watcher = self.hub.subscribe(self.shard.id, self.sid, self.life)
        current = state["version"]
        if position is None:
            self.first.append(self._state_frame("state", state))
            return
        version, epoch, life = position
        epoch = self.epoch if epoch is None else epoch
        life = self.life if life is None else life
        cause = None
        if life != self.life:
            cause = "lifetime"
        elif version > current:
            cause = "unknown_version"
        elif epoch > self.epoch:
            cause = "epoch"
        if cause is not None:
            self.first.append(self._reset(state, cause))
            return
        ring = [c for c in w.ring if c.life == self.life]
        by_version = {c.version: c for c in ring}
        held = epoch == self.epoch or (version in by_version and by_version[version].epoch <= epoch)
        complete = version == current or (version + 1 in by_version and ring[-1].version == current)
        if held and complete:
            self.hub.resumed["memory"] += 1
            self.sent = version
            for c in ring:
                if c.version > version:
                    self.first.append(self._change_frame(c))
            return
        if self.log_reader is None:
            self.first.append(self._reset(state, "history_gone"))
            return
        self.from_log, self.check_epoch = version, (None if held else epoch)
        self.sent = version

    def close(self) -> None:
        if self.watcher is not None:
            self.hub.unsubscribe(self.sid, self.watcher)
            self.watcher = None

    # -- frames -------------------------------------------------------------------------
    def _position(self, version: int, life: int | None = None) -> str:
        return f"{version}:{self.epoch}:{self.life if life is None else life}"

    def _state_frame(self, kind: str, state: Session, **extra: Any) -> bytes:
        self.sent = state["version"]
        session = view(state, self.clock())
        session["id"] = self.public_id
        return frame(kind, self._position(state["version"]),
                     {"epoch": self.epoch, "version": state["version"], "session": session, **extra})

    def _reset(self, state: Session, cause: str, counted: bool = False) -> bytes:
        if not counted:
            self.hub.count_reset(cause)
        return self._state_frame("reset", state, cause=cause)

    def _change_frame(self, c: Change) -> bytes:
        self.sent = c.version
        key = (self.changes_only, self.epoch)
        out = c.frames.get(key)
        if out is None:
            event = {k: v for k, v in c.event.items() if k != "idem"}
            event["sid"] = self.public_id
            body: dict[str, Any] = {"epoch": self.epoch, "version": c.version, "prev_version": c.version - 1,
                                    "event": event}
            if c.kind == "change" and not self.changes_only:
                body["data"] = c.data
            out = c.frames[key] = frame(c.kind, self._position(c.version, c.life), body)
        return out

    async def frames(self) -> AsyncIterator[bytes]:
        watcher = self.watcher
        assert watcher is not None
        limits = self.hub.limits
        retry = int(limits.retry_ms * random.uniform(0.5, 1.5))
        yield b"retry: %d\n\n" % retry
        for f in self.first:
            yield f
        self.first = []
        if self.from_log is not None:
            for f in await self._from_log():
                yield f
        while True:
            if watcher.ended is not None:
                yield b": end " + watcher.ended.encode() + b"\n\n"
                return
            if watcher.overflowed:
                watcher.overflowed = False
                state = self.shard.sessions.get(self.sid)
                if state is None or life_of(state) != self.life:
                    return  # gone meanwhile: its delete was in the dropped buffer; a resume answers 404
                yield self._reset(state, "overflow", counted=True)
                continue
            if watcher.buffer:
                c = watcher.buffer.popleft()
                if c.version <= self.sent and c.life == self.life:
                    continue
                if c.life != self.life:
                    return  # another lifetime began (its delete ended this one's stream)
                yield self._change_frame(c)
                if c.kind != "change":
                    return
                continue
            watcher.wake.clear()
            try:
                async with asyncio.timeout(limits.heartbeat_s):
                    await watcher.wake.wait()
            except TimeoutError:
                yield b": keep-alive\n\n"

    async def _from_log(self) -> list[bytes]:
        """The changes after ``from_log`` read from the log, or a reset."""
        assert self.log_reader is not None and self.from_log is not None
        after, check = self.from_log, self.check_epoch
        self.from_log = None
        try:
            events = await self.log_reader(self.shard.id, self.sid)
        except (StickyError, asyncio.TimeoutError, OSError):
            events = []
        state = self.shard.sessions.get(self.sid)
        if state is None or self.watcher is None or self.watcher.ended is not None:
            return []
        # the current lifetime: events after the last delete/expire, from its first version
        start = 0
        for i, event in enumerate(events):
            if event["op"] in ("delete", "expire"):
                start = i + 1
        lifetime = events[start:]
        if not lifetime or lifetime[0]["ver"] != 1 or int(round(lifetime[0]["at"] * 1_000_000)) != self.life:
            return [self._reset(state, "history_gone")]
        out: list[tuple[int, int, Op, Session]] = []
        current: Session | None = None
        writer: dict[int, int] = {}
        for event in lifetime:
            try:
                current, _ = apply(current, event, event["at"])
            except StickyError:
                return [self._reset(state, "history_gone")]
            assert current is not None
            writer[event["ver"]] = event["epoch"]
            if event["ver"] > after:
                out.append((event["ver"], event["epoch"], event, current))
        if after and (after not in writer or (check is not None and writer[after] > check)):
            return [self._reset(state, "epoch" if after in writer else "history_gone")]
        if not out and after < state["version"] and not self.watcher.buffer:
            return [self._reset(state, "history_gone")]
        frames = []
        last = after
        for version, epoch, event, st in out:
            if version != last + 1:
                return [self._reset(state, "history_gone")]
            frames.append(self._change_frame(Change(version, epoch, "change", event, live_keys(st, event["at"]),
                                                    self.life)))
            last = version
        buffered = self.watcher.buffer
        if buffered and buffered[0].version > last + 1 and buffered[0].life == self.life:
            return [self._reset(state, "history_gone")]  # the log stopped short of what is live
        if not buffered and last < state["version"]:
            return [self._reset(state, "history_gone")]
        self.hub.resumed["log"] += 1
        return frames
