"""Session expiry (TTL) on owned shards (asyncio, no aiohttp).

``Expiry`` owns a heap of (expires_at, sid) over the sessions of owned shards and the
task that reaps them: at its time a session whose ``expires_at`` has passed is expired
by an ``expire`` event, replicated like any change. A write that refreshes a session
only moves ``expires_at``; the reaper finds the entry early, and puts it back at the new
time. A session found expired by a write before the reaper got to it is expired there
(``expire_now``), so its event comes first.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Iterable

from stickystate.errors import StickyError
from stickystate.node.ops import Op, Session, apply
from stickystate.node.erasure import Erasure
from stickystate.node.ops import Session, apply
from stickystate.node.roles import ShardRoles
from stickystate.node.shard import DELETED, Shard
from stickystate.node.tasks import cancel_and_wait
from stickystate.node.verification import StallGuard
from stickystate.replicator.errors import ReplicationError
from stickystate.replicator.producer import Replicator


class Expiry:
    def __init__(self, roles: ShardRoles, stall: StallGuard, replicator: Replicator | None, me: str,
                 clock: Callable[[], float], erasure: Erasure | None = None) -> None:
        self.roles = roles
        self.stall = stall
        self.replicator = replicator  # None: replication is off
        self.me = me
        self.clock = clock
        self.erasure = erasure  # seals the event, erases the session's key (node/erasure.py)
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.expired_total = 0
        self.on_change: Callable[[int, Op, Session | None], None] | None = None  # the watch hub's (node/watch.py)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="expiry")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    def schedule(self, session: Session) -> None:
        """A new session: reap it at its expiry."""
        heapq.heappush(self._heap, (session["expires_at"], session["id"]))
        if self._heap[0][1] == session["id"]:
            self._wake.set()

    def schedule_all(self, sessions: Iterable[Session]) -> None:
        """A shard acquired: reap its sessions at their expiry."""
        for state in sessions:
            heapq.heappush(self._heap, (state["expires_at"], state["id"]))
        self._wake.set()

    def expire_now(self, shard: Shard, sid: str) -> bool:
        """Expire ``sid`` of an owned shard now; False if it is gone or replication refused the event."""
        state = shard.sessions.get(sid)
        if state is None:
            return False
        try:
            new, event = apply(state, {"op": "expire", "sid": sid}, self.clock())
            event["node"], event["epoch"] = self.me, shard.my_epoch
            if self.replicator is not None:
                assert self.erasure is not None
                self.replicator.enqueue(shard.id, sid.encode(), self.erasure.codec.encode_change(shard.id, event),
                                        meta=(sid, DELETED))
        except (ReplicationError, StickyError, LookupError):
            return False
        shard.commit(event, new)
        if self.on_change is not None:
            self.on_change(shard.id, event, new)
        if self.replicator is not None and self.erasure is not None:
            self.erasure.erase(shard, sid)
        self.expired_total += 1
        return True

    async def _loop(self) -> None:
        roles, heap = self.roles, self._heap
        while True:
            now = self.clock()
            while heap and heap[0][0] <= now and not roles.refusing and not self.stall.unverified:
                _, sid = heapq.heappop(heap)
                s = roles.shard_for(sid)
                if s not in roles.serving:
                    continue  # re-scheduled when the shard is (re)acquired
                shard = roles.shards[s]
                state = shard.sessions.get(sid)
                if state is None:
                    continue
                if state["expires_at"] > now:
                    heapq.heappush(heap, (state["expires_at"], sid))  # refreshed by a write
                elif not self.expire_now(shard, sid):
                    heapq.heappush(heap, (now + 1.0, sid))  # replication full: try again
            delay = 1.0 if not heap else max(0.0, min(1.0, heap[0][0] - now))
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
            # arrives once the event is set, and stop() would wait for this task forever.
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
