"""Watching a session: its changes in version order, as Server-Sent Events, resumable
(asyncio, no aiohttp; the fronts write the frames, node/handlers.py opens the watch).

``WatchHub`` is the node's registry of watched sessions. The write path calls
``changed`` once per change (node/writes.py, node/expiry.py: one dict lookup for a
session nobody watches); ownership calls ``shard_lost`` when the node stops owning a
shard, which ends its streams (the client resumes on the new owner, through the router or
straight there). Per watched session the hub keeps a ring of its last changes (resume from
memory); a session whose last watcher left keeps its ring for a while (``LINGER_S``,
at most ``MAX_IDLE`` such sessions) so a reconnecting client resumes from memory too.

The stream (node/watch_stream.py ``Watch.frames``): ``retry:`` (with jitter), then ``state`` (the session), or
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
The resumes of one shard waiting for the log share one scan of its partition
(``SharedLogReads``), and a stream waiting for it still sends its keep-alive comments.

A watcher never slows the owner: ``changed`` writes a change straight to a watcher's
client only when the stream is waiting with nothing to send and the client's connection
takes it (below its high-water mark: a write that cannot block); otherwise it appends to
the watcher's bounded buffer, and the stream's task sends it. On overflow the buffer is
emptied and the watcher gets a ``reset`` with the state as it is when it catches up. The
frame of a change is built once for all the watchers of a session that see it alike.

A router serves its clients of a session from one stream (router/streams.py): that one is
``shared`` (not counted in the limits), and each client's own stream is ``muted`` after its
first frames (no more changes pushed to it; it stays counted and ends with the shard).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from stickystate.errors import TooManyRequests, Unavailable
from stickystate.node.ops import Op, Session, live_keys

_POSITION = re.compile(r"[0-9]{1,19}(:[0-9]{1,19}:[0-9]{1,19})?")  # as docs/openapi.yaml (ASCII digits only)
LINGER_S = 120.0  # a session's ring is kept this long after its last watcher left
MAX_IDLE = 1000  # at most this many such sessions (least recently watched dropped first)
RESET_CAUSES = ("lifetime", "unknown_version", "epoch", "history_gone", "overflow")
LogReader = Callable[[int, str], Awaitable[list[dict[str, Any]]]]  # (shard, sid) -> the session's trail
BatchLogReader = Callable[[int, list[str]], Awaitable[dict[str, list[dict[str, Any]]]]]  # one scan, many sessions


@dataclass(frozen=True)
class WatchLimits:
    per_session: int = 100
    per_node: int = 10_000
    buffer_events: int = 1000
    buffer_bytes: int = 4 * 1024 * 1024
    ring_events: int = 128
    ring_bytes: int = 256 * 1024
    heartbeat_s: float = 15.0
    retry_ms: int = 2000

    def __post_init__(self) -> None:
        if min(self.per_session, self.per_node, self.buffer_events, self.buffer_bytes, self.ring_events,
               self.ring_bytes, self.retry_ms) < 1:
            raise ValueError("watch limits must be >= 1")
        if self.heartbeat_s <= 0:
            raise ValueError("watch_heartbeat_s must be > 0")


def life_of(state: Session) -> int:
    return int(round(state["created_at"] * 1_000_000))


# One change of a watched session, as the write path produced it: (version, epoch of the
# event that wrote it, kind, lifetime, event JSON, data JSON). A plain tuple of atomic values,
# encoded once on the write path: the cyclic GC stops tracking it at its first pass, so a
# node whose rings hold tens of thousands of changes keeps a small GC heap (as slotted
# objects with their dicts they made every full pass walk them: 100-400 ms stalls every few
# seconds under load, seen by the router as a dead node). ``kind`` is change, deleted or
# expired; the event JSON leaves out ``sid`` (the stream puts the public id in) and ``idem``;
# the data JSON is the data after the change (None: deleted or expired). A ring is bounded by
# count and by bytes (``ring_bytes``: a 50-message window is ~15 KB a change), so a resume
# further back than that reads the log.
Change = tuple[int, int, str, int, bytes, bytes | None]
_HIDDEN = ("sid", "idem")


def make_change(version: int, epoch: int, kind: str, event: Op, data: dict[str, Any] | None,
                life: int) -> Change:
    shown = {k: v for k, v in event.items() if k not in _HIDDEN}
    return (version, epoch, kind, life, orjson.dumps(shown), None if data is None else orjson.dumps(data))


def _size(change: Change) -> int:
    data = change[5]
    return len(change[4]) + (0 if data is None else len(data))


def parse_position(raw: str) -> tuple[int, int | None, int | None] | None:
    """``<version>[:<epoch>:<life>]`` -> (version, epoch, life); None if malformed."""
    if _POSITION.fullmatch(raw.strip()) is None:
        return None
    parts = raw.strip().split(":")
    if len(parts) == 1:
        return int(parts[0]), None, None
    return int(parts[0]), int(parts[1]), int(parts[2])


class Watcher:
    """One stream's buffer of changes, bounded by count and bytes (the changes are shared
    with the ring and every other watcher of the session: the bytes are what this buffer
    alone may keep alive)."""

    __slots__ = ("limit", "limit_bytes", "buffer", "bytes", "overflowed", "ended", "wake", "hub", "direct", "muted",
                 "shared")

    def __init__(self, hub: WatchHub, limit: int, limit_bytes: int, shared: bool = False) -> None:
        self.hub = hub
        self.shared = shared  # a router's stream for its clients of the session: not counted in the limits
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.buffer: deque[Change] = deque()
        self.bytes = 0
        self.overflowed = False
        self.ended: str | None = None
        self.wake = asyncio.Event()
        # Set by the stream while it waits with nothing left to send (node/watch_stream.py
        # ``Watch._direct``): a change is then written to the client from here, without
        # waking the stream's task; False when it cannot be (client behind, not a plain
        # change), and the change is buffered as usual.
        self.direct: Callable[[Change], bool] | None = None
        # A router's client past its first frames (node/watch_stream.py): the router sends it
        # the changes from a stream it shares with the session's other watchers; this one
        # is kept open (and counted) for the client's start, its keep-alives and its end.
        self.muted = False

    def push(self, change: Change) -> None:
        if self.overflowed or self.muted:
            return
        buffer = self.buffer
        direct = self.direct
        if direct is not None and not buffer and direct(change):
            return
        held = len(buffer)
        size = _size(change)
        if held and (held >= self.limit or self.bytes + size > self.limit_bytes):
            buffer.clear()  # the owner does not wait: this watcher gets a reset instead
            self.bytes = 0
            self.overflowed = True
            self.hub.count_reset("overflow")  # counted now: the reset itself is sent when the watcher reads again
        else:
            buffer.append(change)
            self.bytes += size
            hub = self.hub
            if held >= hub.buffer_peak:
                hub.buffer_peak = held + 1
            if held:
                return  # not empty before: the stream was woken already
        self.wake.set()

    def take(self) -> Change:
        change = self.buffer.popleft()
        self.bytes -= _size(change)
        return change

    def end(self, cause: str) -> None:
        self.ended = cause
        self.wake.set()


@dataclass
class Watched:
    shard: int
    ring: deque[Change]  # at most ring_events changes and ring_bytes of JSON (the newest always kept)
    ring_bytes: int = 0
    watchers: set[Watcher] = field(default_factory=set)
    idle_since: float = 0.0
    life: int = 0  # of the session as last seen (a delete's change carries it)


class WatchHub:
    def __init__(self, limits: WatchLimits) -> None:
        self.limits = limits
        self.sessions: dict[str, Watched] = {}
        self.idle: OrderedDict[str, float] = OrderedDict()
        self.pollers: dict[str, list[asyncio.Future[None]]] = {}  # long-polls waiting for a change
        self.watchers = 0  # counted against the limits: every stream but the routers' shared ones
        self.shared = 0  # routers' shared streams (node/watch_stream.py)
        self.buffer_peak = 0  # the most changes any watcher's buffer held (never above buffer_events)
        self.resets: dict[str, int] = dict.fromkeys(RESET_CAUSES, 0)
        self.resumed: dict[str, int] = {"memory": 0, "log": 0}  # exact resumes, by where the changes came from
        self.opened_total = 0
        self.refused_total = 0
        self.log_reads: SharedLogReads | None = None  # the handlers', for the status
        # The frames of the change being pushed, by (epoch, public id, changes_only): the
        # watchers of a session share them (node/watch_stream.py ``Watch._change_frame``).
        self.frames_of: tuple[Change | None, dict[tuple[int, str, bool], bytes]] = (None, {})

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
        change = make_change(event["ver"], event["epoch"], kind, event,
                             None if new is None else live_keys(new, event["at"]), life)
        ring = w.ring
        if new is None or (ring and (ring[-1][3] != life or ring[-1][0] != change[0] - 1)):
            ring.clear()  # gone, or a new lifetime (or a gap): the ring holds one contiguous run
            w.ring_bytes = 0
        if new is not None:
            ring.append(change)
            w.ring_bytes += _size(change)
            limits = self.limits
            while len(ring) > 1 and (len(ring) > limits.ring_events or w.ring_bytes > limits.ring_bytes):
                w.ring_bytes -= _size(ring.popleft())
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
    def subscribe(self, shard: int, sid: str, life: int, shared: bool = False) -> tuple[Watched, Watcher]:
        """A new watcher of ``sid``. ``shared``: a router's stream that it serves its clients
        of the session from, each of them with a muted stream of its own that is counted;
        the shared one is not, in either limit."""
        limits = self.limits
        w = self.sessions.get(sid)
        if not shared and w is not None and len(w.watchers) - self._shared_of(w) >= limits.per_session:
            self.refused_total += 1
            raise TooManyRequests(f"this session has {limits.per_session} watchers already (watch_max_per_session)",
                                  retry_after_s=5, code="too_many_watchers")
        if not shared and self.watchers >= limits.per_node:
            self.refused_total += 1
            raise Unavailable(f"this node has {limits.per_node} watchers already (watch_max_per_node)",
                              retry_after_s=5, code="too_many_watchers")
        if w is None:
            w = self.sessions[sid] = Watched(shard, deque())
        w.life = life
        self.idle.pop(sid, None)
        watcher = Watcher(self, limits.buffer_events, limits.buffer_bytes, shared)
        w.watchers.add(watcher)
        if shared:
            self.shared += 1
        else:
            self.watchers += 1
        self.opened_total += 1
        return w, watcher

    @staticmethod
    def _shared_of(w: Watched) -> int:
        return sum(1 for watcher in w.watchers if watcher.shared)

    def unsubscribe(self, sid: str, watcher: Watcher) -> None:
        if watcher.shared:
            self.shared -= 1
        else:
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
        muted = sum(1 for w in self.sessions.values() for watcher in w.watchers if watcher.muted)
        return {"watchers": self.watchers, "shared": self.shared, "muted": muted,
                "sessions": len(self.sessions), "buffer_peak": self.buffer_peak,
                "log_reads": self.log_reads.reads if self.log_reads else 0,
                "log_reads_shared": self.log_reads.shared if self.log_reads else 0,
                "buffer_limit": self.limits.buffer_events, "resets": dict(self.resets),
                "resumed": dict(self.resumed),
                "opened_total": self.opened_total, "refused_total": self.refused_total}


class SharedLogReads:
    """Resumes that need the log: one scan at a time per node, and one scan per SHARD for
    every resume of its sessions waiting: all the resumes of a shard (of one session or of
    many) that arrive before its next scan begins share that scan, each getting its own
    session's trail. A resume joins a scan only until it begins (before it flushes the
    shard's queue and takes the partition's end), so every joined watcher was subscribed
    before the read began and misses nothing between the read's end and its buffer.

    After a failover every watcher of the shards taken over resumes here (the new owner's
    rings start empty). One scan per session (as before) made that O(watchers x partition)
    per failover, one after the other: under repeated failovers the queue outgrew the time
    between them and resumes waited for minutes (chaos, sigstop: streams open, no event,
    never catching up). Per shard it is O(shards x partition)."""

    def __init__(self, read: BatchLogReader) -> None:
        self.read = read
        self._pending: dict[int, dict[str, asyncio.Future[list[dict[str, Any]]]]] = {}  # shard -> its next scan
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self.reads = 0  # scans
        self.shared = 0  # resumes that joined a scan another resume asked for

    async def __call__(self, s: int, sid: str) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        batch = self._pending.get(s)
        if batch is None:
            batch = self._pending[s] = {}
            task = loop.create_task(self._run(s, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self.shared += 1
        fut = batch.get(sid)
        if fut is None:
            fut = batch[sid] = loop.create_future()
            fut.add_done_callback(_retrieved)
        return await asyncio.shield(fut)

    async def _run(self, s: int, batch: dict[str, asyncio.Future[list[dict[str, Any]]]]) -> None:
        try:
            async with self._lock:
                self._forget(s, batch)  # from here on, a new resume waits for the next scan
                self.reads += 1
                result = await self.read(s, sorted(batch))
        except asyncio.CancelledError:
            self._forget(s, batch)
            for fut in batch.values():
                fut.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every resume that shares the scan
            self._forget(s, batch)
            for fut in batch.values():
                if not fut.done():
                    fut.set_exception(exc)
            return
        for sid, fut in batch.items():
            if not fut.done():
                fut.set_result(result.get(sid, []))

    def _forget(self, s: int, batch: dict[str, asyncio.Future[list[dict[str, Any]]]]) -> None:
        if self._pending.get(s) is batch:
            del self._pending[s]


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # its waiters may all have gone: not an unretrieved exception
