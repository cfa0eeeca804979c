"""One watch stream: opened in one synchronous step (subscribed to the hub, first frames
decided), then its Server-Sent Events until the session goes, the shard moves, or the
client leaves. node/watch.py says what the events and positions mean; the fronts
(node/fastpath.py, node/http.py) write the frames."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from stickystate.errors import StickyError
from stickystate.http.stream import StreamSink
from stickystate.protocol import MUTED_FRAME
from stickystate.node.ops import Op, Session, apply, live_keys, view
from stickystate.node.watch import Change, LogReader, Watcher, WatchHub, life_of, make_change


# -- frames --------------------------------------------------------------------------------
def frame(kind: str, position: str, body: dict[str, Any]) -> bytes:
    return b"".join((b"id: ", position.encode(), b"\nevent: ", kind.encode(), b"\ndata: ", orjson.dumps(body),
                     b"\n\n"))


class Watch:
    """One stream: open synchronously (``open``: subscribed, first frames decided), then
    ``frames`` until the session goes, the shard moves, or the client leaves."""

    def __init__(self, hub: WatchHub, shard: Any, sid: str, public_id: str, changes_only: bool,
                 clock: Callable[[], float], log_reader: LogReader | None, *, shared: bool = False,
                 mute_after_first: bool = False) -> None:
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
        self._sid_json: bytes | None = None  # b'{"sid":"<public id>"': the head of every change's event
        self.sink: StreamSink | None = None  # the client connection, if the front lets changes be written directly
        # a router's client served from a shared stream: after the first frames, ": muted" and
        # no more changes (the router sends them; router/streams.py)
        self.mute_after_first = mute_after_first
        self.shared = shared  # a router's shared stream (not counted in the limits)

    def open(self, position: tuple[int, int | None, int | None] | None) -> None:
        """Subscribe and decide the first frames; synchronous (no change can slip between)."""
        state = self.shard.sessions.get(self.sid)
        assert state is not None  # the handler checked it
        self.life = life_of(state)
        w, self.watcher = self.hub.subscribe(self.shard.id, self.sid, self.life, self.shared)
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
        ring = [c for c in w.ring if c[3] == self.life]  # (version, epoch, kind, life, ...): node/watch.py
        by_version = {c[0]: c for c in ring}
        held = epoch == self.epoch or (version in by_version and by_version[version][1] <= epoch)
        complete = version == current or (version + 1 in by_version and ring[-1][0] == current)
        if held and complete:
            self.hub.resumed["memory"] += 1
            self.sent = version
            for c in ring:
                if c[0] > version:
                    self.first.append(self._change_frame(c))
            return
        if self.log_reader is None:
            self.first.append(self._reset(state, "history_gone"))
            return
        self.from_log, self.check_epoch = version, (None if held else epoch)
        self.sent = version

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.direct = None
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
        """A reset with ``state``, the session as it is now: it covers whatever an overflow
        of the buffer dropped before it (a resume read from the log while changes poured in
        would otherwise be told twice in a row: history_gone, then overflow)."""
        if not counted:
            self.hub.count_reset(cause)
        if self.watcher is not None:
            self.watcher.overflowed = False
        return self._state_frame("reset", state, cause=cause)

    def _direct(self, c: Change) -> bool:
        """Written straight to the client by the write path (node/watch.py ``Watcher.push``):
        only while this stream waits with nothing to send, only a plain change of this
        lifetime, and only if the client's connection is below its high-water mark."""
        sink = self.sink
        assert sink is not None  # set only with a sink (``frames``)
        if sink.paused or c[2] != "change" or c[3] != self.life:
            return False
        if c[0] > self.sent:
            sink.send(self._change_frame(c))
        return True

    def _change_frame(self, c: Change) -> bytes:
        """The change's frame, spliced from its JSON (encoded once, node/watch.py
        ``make_change``), and shared with the other watchers of the session that see it
        alike (the hub keeps the frames of the change being pushed)."""
        version, _, kind, life, event, data = c
        self.sent = version
        hub = self.hub
        key = (self.epoch, self.public_id, self.changes_only)
        if hub.frames_of[0] is c:
            shared = hub.frames_of[1]
            done = shared.get(key)
            if done is not None:
                return done
        else:
            shared = {}
            hub.frames_of = (c, shared)
        if self._sid_json is None:
            self._sid_json = b'{"sid":' + orjson.dumps(self.public_id)
        parts = [b"id: ", self._position(version, life).encode(), b"\nevent: ", kind.encode(),
                 b'\ndata: {"epoch":%d,"version":%d,"prev_version":%d,"event":' % (self.epoch, version, version - 1),
                 self._sid_json, b"," if len(event) > 2 else b"", event[1:]]
        if data is not None and kind == "change" and not self.changes_only:
            parts += (b',"data":', data)
        parts.append(b"}\n\n")
        shared[key] = out = b"".join(parts)
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
            # The log read may queue behind others (node/watch.py SharedLogReads): the stream
            # keeps its keep-alives meanwhile, and ends at once if the shard moves.
            loop = asyncio.get_running_loop()
            reading = asyncio.ensure_future(self._from_log())
            quiet_since = loop.time()
            try:
                while True:
                    done, _ = await asyncio.wait({reading}, timeout=min(1.0, limits.heartbeat_s))
                    if done or watcher.ended is not None:
                        break
                    if loop.time() - quiet_since >= limits.heartbeat_s:
                        quiet_since = loop.time()
                        yield b": keep-alive\n\n"
            finally:
                if not reading.done():
                    reading.cancel()
            if reading.done() and not reading.cancelled():
                for f in reading.result():
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
                c = watcher.take()
                version, _, kind, life = c[:4]
                if version <= self.sent and life == self.life:
                    continue
                if life != self.life:
                    return  # another lifetime began (its delete ended this one's stream)
                yield self._change_frame(c)
                if kind != "change":
                    return
                continue
            if self.mute_after_first and not watcher.muted:
                # Everything up to now is sent (the first frames, the log's, the buffered
                # changes); from here on the router has the changes from its shared stream.
                watcher.muted = True
                yield MUTED_FRAME
                continue
            watcher.wake.clear()
            if self.sink is not None and not watcher.muted:  # nothing left to send: the write path may write to the client
                watcher.direct = self._direct
            try:
                async with asyncio.timeout(limits.heartbeat_s):
                    await watcher.wake.wait()
                idle = False
            except TimeoutError:
                idle = True
            finally:
                watcher.direct = None
            if idle:
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
            frames.append(self._change_frame(make_change(version, epoch, "change", event,
                                                         live_keys(st, event["at"]), self.life)))
            last = version
        buffered = self.watcher.buffer
        if buffered and buffered[0][0] > last + 1 and buffered[0][3] == self.life:
            return [self._reset(state, "history_gone")]  # the log stopped short of what is live
        if not buffered and last < state["version"]:
            return [self._reset(state, "history_gone")]
        self.hub.resumed["log"] += 1
        return frames
