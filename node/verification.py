"""Owner verification: when an owner's writes count as verified, and when it reads its
own partitions to find out (asyncio, no aiohttp).

The owner does not read its own partitions back: Kafka's acknowledgements of our
records at the offsets directly after our claim prove nothing else is between
(node/acks.py). ``OwnerVerification`` owns what waits on that: the ``confirm()`` callers
waiting for an offset to be verified (per shard a heap of futures, answered False when
ownership ends first), and the reasons to read an owned partition after all: to settle
a hole (an acknowledged offset past records not seen), and the owner check
(``OWNER_CHECK_S``): the end offset of an owned partition moved past what we wrote, which
is how an owner that was replaced, and writes nothing, learns it is fenced. Its task:
the owner-check loop.

``StallGuard`` owns stall detection: a process that was paused (SIGSTOP, a long GC or a
blocked loop) may have been replaced meanwhile. It serves nothing until its follower
has read every owned partition to an end offset taken after the stall. Its tasks: the
ticker that notices a stall, and the verification it starts.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
import time
from typing import Any

from stickystate.errors import Unavailable
from stickystate.node.roles import ShardRoles
from stickystate.node.shard import Shard
from stickystate.node.tasks import cancel_and_wait
from stickystate.replicator.follower import Follower

log = logging.getLogger("stickystate.node")


class OwnerVerification:
    OWNER_CHECK_S = 1.0

    def __init__(self, roles: ShardRoles, follower: Follower) -> None:
        self.roles = roles
        self.follower = follower
        # confirm() callers waiting for shard.position to pass their offset, per shard a
        # heap of (offset, seq, future of "verified while owning")
        self._waiters: dict[int, list[tuple[int, int, asyncio.Future[bool]]]] = {}
        self._waiter_seq = itertools.count()
        self._prev_ends: dict[int, int] = {}  # owned shard -> its end offset at the last check
        self._task: asyncio.Task[None] | None = None
        self.owner_log_reads = {"hole": 0, "check": 0, "stall": 0}  # why owned partitions were read

    def start(self) -> None:
        self._task = asyncio.create_task(self._owner_check_loop(), name="owner-check")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    def on_acked(self, s: int, acked: list[tuple[int, Any]]) -> None:
        """The replicator's callback: Kafka acknowledged our records of partition ``s``."""
        shard = self.roles.owned(s)
        if shard is None:
            return
        shard.own_acked(acked, time.monotonic())
        if shard.acks.hole:
            self.read_log(shard, 0, "hole")
        self._wake(shard)

    def records_read(self, shard: Shard, now: float) -> None:
        """The follower applied records of an owned partition: verify what they settle."""
        shard.absorb(now)
        self._wake(shard)
        self.caught_up(shard)

    def read_log(self, shard: Shard, upto: int, reason: str) -> None:
        """Read an owned partition from ``shard.position`` (to ``upto`` at least)."""
        shard.acks.read_to = max(shard.acks.read_to, upto)
        if shard.id not in self.follower.following():
            self.follower.follow(shard.id, shard.position)
            self.owner_log_reads[reason] += 1

    def caught_up(self, shard: Shard) -> None:
        """An owned partition read far enough: stop following it."""
        acks = shard.acks
        if not acks.hole and shard.position >= acks.read_to and shard.id in self.follower.following():
            self.follower.unfollow(shard.id)
            acks.read_to = 0

    def _wake(self, shard: Shard) -> None:
        heap = self._waiters.get(shard.id)
        while heap and heap[0][0] < shard.position:
            fut = heapq.heappop(heap)[2]
            if not fut.done():
                fut.set_result(True)

    def release_waiters(self, s: int) -> None:
        """Ownership ended: waiters not verified by now are answered False."""
        for _, _, fut in self._waiters.pop(s, ()):
            if not fut.done():
                fut.set_result(False)

    async def until_verified(self, shard: Shard, offset: int, timeout_s: float) -> bool:
        """True once ``offset`` is verified while we own the shard; False if ownership ends first."""
        if shard.position > offset:
            return True
        if shard.acks.acking is None:
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters.setdefault(shard.id, []), (offset, next(self._waiter_seq), fut))
        return await asyncio.wait_for(fut, timeout_s)

    def forget(self, s: int) -> None:
        """Ownership of ``s`` ended: no end offset of it to compare against."""
        self._prev_ends.pop(s, None)

    async def _owner_check_loop(self) -> None:
        """Read an owned partition whose end moved past what we wrote (acknowledged): a
        shard we do not write to would otherwise not notice a takeover claim."""
        roles = self.roles
        while True:
            await asyncio.sleep(self.OWNER_CHECK_S)
            owned = [s for s in sorted(roles.serving) if roles.owned(s) is not None]
            if not owned or roles.refusing:
                self._prev_ends.clear()
                continue
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow stop()'s cancellation
                async with asyncio.timeout(self.OWNER_CHECK_S * 5):
                    ends = await self.follower.end_offsets(owned)
            except Exception as exc:  # Kafka away: the acknowledgements stop too; next round
                log.debug("owner check failed", extra={"error": repr(exc)})
                continue
            prev, self._prev_ends = self._prev_ends, {}
            for s, end in ends.items():
                shard = roles.owned(s)
                if shard is None:
                    continue
                before = prev.get(s)
                if before is not None and shard.position < before:
                    self.read_log(shard, before, "check")
                self._prev_ends[s] = end


class StallGuard:
    STALL_S = 0.5
    TICK_S = 0.1

    def __init__(self, roles: ShardRoles, verification: OwnerVerification, follower: Follower,
                 hold_timeout_s: float) -> None:
        self.roles = roles
        self.verification = verification
        self.follower = follower
        self.hold_timeout_s = hold_timeout_s
        self._last_tick = time.monotonic()
        self._verifying: asyncio.Future[bool] | None = None
        self.unverified = False  # a stall, or a verification failed: verify before serving again
        self._next_verify_at = 0.0
        self._tick_task: asyncio.Task[None] | None = None
        self._verify_task: asyncio.Task[None] | None = None
        self.stalls_total = 0

    def start(self) -> None:
        self._tick_task = asyncio.create_task(self._ticker(), name="stall-ticker")

    async def stop(self) -> None:
        await cancel_and_wait([self._tick_task, self._verify_task])
        self._tick_task = self._verify_task = None

    def check(self) -> None:
        """Called every tick and by every request: a long gap since the last call is a stall."""
        now = time.monotonic()
        # A pause while serving nothing (start-up, before any shard is acquired) needs no
        # re-verification: acquiring a shard reads its partition past our claim anyway.
        stalled = now - self._last_tick > self.STALL_S and bool(self.roles.serving)
        self._last_tick = now
        if stalled:
            self.stalls_total += 1
            self.unverified = True
            log.warning("stall detected: re-verifying ownership from the log")
        if self.unverified and self._verifying is None and self.roles.serving and now >= self._next_verify_at:
            self._verifying = asyncio.get_running_loop().create_future()
            self._verify_task = asyncio.create_task(self._verify(self._verifying), name="verify-after-stall",
                                                    context=contextvars.Context())

    async def wait_verified(self) -> None:
        """While ``unverified``: wait for the running verification; Unavailable if it fails or takes too long."""
        verified = False
        if self._verifying is not None:
            try:
                verified = await asyncio.wait_for(asyncio.shield(self._verifying), self.hold_timeout_s)
            except asyncio.TimeoutError:
                pass
        if not verified:
            raise Unavailable("re-verifying shard ownership after a stall", retry_after_s=1, code="recovering")

    async def _ticker(self) -> None:
        self._last_tick = time.monotonic()  # the time start() took is not a stall
        while True:
            self.check()
            await asyncio.sleep(self.TICK_S)

    async def _verify(self, done: asyncio.Future[bool]) -> None:
        """Read every served partition up to an end offset taken now: any claim made
        while we were stalled is seen (and fences us) before we answer again."""
        ok = False
        try:
            shards = sorted(self.roles.serving)
            ends = await asyncio.wait_for(self.follower.end_offsets(shards), self.hold_timeout_s)
            for s, end in ends.items():
                shard = self.roles.owned(s)
                if shard is None or shard.position >= end:
                    continue
                self.verification.read_log(shard, end, "stall")
                await self.verification.until_verified(shard, end - 1, self.hold_timeout_s)  # False: fenced meanwhile
            ok = True
        except Exception as exc:  # Kafka unreachable: keep refusing; retry shortly
            log.warning("ownership verification failed", extra={"error": repr(exc)})
            self._next_verify_at = time.monotonic() + 0.5
        finally:
            self.unverified = not ok
            self._verifying = None
            if not done.done():
                done.set_result(ok)
