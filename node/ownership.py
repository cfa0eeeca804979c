"""Shard ownership: the router's assignment, acquiring and releasing shards, claims,
and what the log says about them (asyncio, no aiohttp).

Assignment (``assign``): shards we lose are released before it returns (their
replication queue flushed, waiters answered, kept as standby in the compact form or
dropped); shards we gain are acquired in the background, standbys bootstrapped
(node/bootstrap.py).

Acquiring (``_acquire``): load the shard's snapshots and follow the partition from
their checkpoint, read to the end offset taken at the start (the finish line), append
a claim with a higher epoch, read past it, then serve: from here on Kafka's
acknowledgements verify our writes (node/verification.py), the shard's sessions are
scheduled for expiry, and a full set of snapshots is written for the new epoch.

An acquisition is called off by the assignment that takes the shard away (its task
cancelled, the shard packed into the standby form). Cancelling is not enough: on Python
3.11 ``asyncio.wait_for`` returns instead of raising when the future it waits for
completed in the same loop iteration as the cancel (likely after a stall), and the
acquisition carries on. So it checks after every await that it is still the shard's
acquisition (``_still_wanted``); one that is not stops there (``Abandoned``) and touches
nothing: it must not unpack, claim or serve a shard the assignment took away (served,
its sessions would still be packed: every read a 404, its epoch's snapshots empty).

Log -> memory (``apply_records``): the follower's records are applied to their shard
(node/shard.py); a claim that fences us ends our ownership at once.

``Ownership`` owns the acquisition tasks, the assignment lock and the recovery reports
(/internal/status, /metrics); what is held in which role is ``ShardRoles``'.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from stickystate.node.bootstrap import Bootstraps
from stickystate.node.erasure import Erasure, KeyErased, KeyNotRead
from stickystate.node.expiry import Expiry
from stickystate.node.roles import ShardRoles
from stickystate.node.shard import Shard
from stickystate.node.snapshotting import Snapshotting
from stickystate.node.tasks import cancel_and_wait
from stickystate.node.verification import OwnerVerification
from stickystate.replicator import events
from stickystate.replicator.follower import Follower
from stickystate.replicator.producer import Replicator

log = logging.getLogger("stickystate.node")

KEY_WAIT_S = 15.0  # a record whose data key is not in the keys partition after this long is refused


class Abandoned(Exception):
    """The acquisition was called off (the shard reassigned) while it awaited."""


class Ownership:
    def __init__(self, roles: ShardRoles, me: str, clock: Callable[[], float], replicator: Replicator,
                 follower: Follower, bootstraps: Bootstraps, verification: OwnerVerification, expiry: Expiry,
                 snapshotting: Snapshotting, replication: bool, recovery_timeout_s: float,
                 kafka_deadline_s: float, erasure: Erasure) -> None:
        self.roles = roles
        self.erasure = erasure
        self.me = me
        self.clock = clock
        self.replicator = replicator
        self.follower = follower
        self.bootstraps = bootstraps
        self.verification = verification
        self.expiry = expiry
        self.snapshotting = snapshotting
        self.replication = replication
        self.recovery_timeout_s = recovery_timeout_s
        self.kafka_deadline_s = kafka_deadline_s
        self._acquire_tasks: dict[int, asyncio.Task[None]] = {}
        self._assign_lock = asyncio.Lock()
        self.on_lost: Callable[[int], None] | None = None  # our ownership of a shard ended (node/watch.py)
        self._key_waits: dict[int, tuple[int, float]] = {}  # shard -> (offset, since): waiting for its data key
        self.recoveries: deque[dict[str, Any]] = deque(maxlen=256)  # recent, for /internal/status
        self.recoveries_total = 0
        self.recovery_events_total = 0
        self.recovery_seconds_total = 0.0

    async def stop(self) -> None:
        await cancel_and_wait(list(self._acquire_tasks.values()))

    # -- assignment (told by the router) -------------------------------------------
    async def assign(self, generation: int, owners: dict[int, str], standbys: dict[int, list[str]]) -> dict[str, Any]:
        """Take the router's placement. Shards we lose are released (queue flushed)
        before this returns; shards we gain are acquired in the background."""
        roles = self.roles
        async with self._assign_lock:
            if generation < roles.generation:
                return {"generation": roles.generation, "stale": True}
            roles.generation = generation
            roles.owners = dict(owners)
            owned = {s for s, n in owners.items() if n == self.me}
            standby = {s for s, chain in standbys.items() if self.me in chain}
            roles.standby = standby
            lost = (roles.serving | set(roles.recovering)) - owned
            for s in lost:
                task = self._acquire_tasks.pop(s, None)
                if task is not None:
                    task.cancel()
                roles.recovering.pop(s, None)
                roles.serving.discard(s)
                self._forget(s)
                if s in roles.shards:
                    roles.shards[s].my_epoch = None
            if lost and self.replication:
                try:
                    await self.replicator.flush(lost, timeout_s=self.kafka_deadline_s * 2)
                except asyncio.TimeoutError:
                    log.error("release: replication not flushed in time", extra={"shards": sorted(lost)})
            for s in lost:
                shard = roles.shards.get(s)
                owned_it = False
                if shard is not None and shard.acks.acking is not None:
                    owned_it = True
                    shard.acks.reset()  # after the flush: every acknowledgement is in
                    self.verification.release_waiters(s)
                if s not in standby:
                    self._drop(s)
                elif shard is not None:
                    shard.pack_all()
                    if owned_it:
                        self.follower.follow(s, shard.position)  # a standby now: from where we verified
            for s in set(roles.shards) - owned - standby:
                if s not in roles.serving and s not in roles.recovering:
                    self._drop(s)
            # Owned shards first: their snapshot loads queue ahead of the standbys'.
            for s in sorted(owned - roles.serving - set(roles.recovering)):
                roles.recovering[s] = asyncio.Event()
                if self.replication and s not in roles.shards:
                    roles.shards[s] = Shard(s)
                    self.bootstraps.start(s)
                # A fresh context: the task outlives the assign request (no request id in its logs).
                self._acquire_tasks[s] = asyncio.create_task(self._acquire(s), name=f"acquire-{s}",
                                                             context=contextvars.Context())
            for s in sorted(standby - owned) if self.replication else ():
                if s not in roles.shards:
                    roles.shards[s] = Shard(s)
                    self.bootstraps.start(s)
            return {"generation": generation, "serving": sorted(roles.serving),
                    "recovering": sorted(roles.recovering), "released": sorted(lost)}

    def _drop(self, s: int) -> None:
        self.bootstraps.cancel(s)
        shard = self.roles.shards.pop(s, None)
        if shard is not None:
            shard.acks.reset()
        self.verification.release_waiters(s)
        self._forget(s, shard)
        if self.replication:
            self.follower.unfollow(s)
            self.erasure.drop(s)

    def _forget(self, s: int, shard: Shard | None = None) -> None:
        """Our ownership of ``s`` ended (or never started): nothing of it is due any more."""
        if self.on_lost is not None:
            self.on_lost(s)
        if shard is None:
            shard = self.roles.shards.get(s)
        if shard is not None:
            shard.marks.dirty.clear()
        self.snapshotting.forget(s)
        self.verification.forget(s)

    # -- acquiring ------------------------------------------------------------------
    def _still_wanted(self, s: int, task: asyncio.Task[Any] | None) -> None:
        """Abandoned unless ``task`` is still shard ``s``'s acquisition (see the module docstring)."""
        if task is None or self._acquire_tasks.get(s) is not task or s not in self.roles.recovering:
            raise Abandoned(f"shard {s}: acquisition called off while it awaited")

    async def _acquire(self, s: int) -> None:
        roles = self.roles
        me = asyncio.current_task()
        started = time.monotonic()
        applied_before = roles.shards[s].applied if s in roles.shards else 0
        read_before = roles.shards[s].read_records if s in roles.shards else 0
        try:
            for attempt in range(5):
                if await self._claim(s):
                    break
                log.warning("claim lost a race, retrying", extra={"shard": s, "attempt": attempt})
            else:
                raise RuntimeError(f"could not claim shard {s}")
            self._still_wanted(s, me)
        except asyncio.CancelledError:
            raise
        except Abandoned:
            # The assignment that called it off has released the shard already: nothing is ours to undo.
            log.warning("acquisition abandoned: the shard was reassigned meanwhile", extra={"shard": s})
            return
        except Exception:
            log.exception("acquire failed", extra={"shard": s})
            if self._acquire_tasks.get(s) is me:
                roles.recovering.pop(s, None)
                self._acquire_tasks.pop(s, None)
                # The router's next health round sees the shard not served and assigns again.
                roles.generation = -1
            return
        shard = roles.shards[s]
        if len(shard.packed):  # cannot happen (only a release packs, and it calls the acquisition off)
            log.error("acquired shard still in the standby form: unpacking", extra={"shard": s})
            shard.unpack_all()
        self.expiry.schedule_all(shard.sessions.values())
        shard.start_owning()
        if self.replication:
            # Our claim has been read: from here on Kafka's acknowledgements verify our
            # writes, and the partition is read only to settle holes (node/verification.py).
            assert shard.my_epoch is not None
            shard.acks.start(shard.my_epoch)
            self.verification.caught_up(shard)
            self.snapshotting.begin_epoch(shard)
        roles.serving.add(s)
        ev = roles.recovering.pop(s, None)
        self._acquire_tasks.pop(s, None)
        info = {"shard": s, "epoch": shard.epoch, "sessions": len(shard.sessions),
                "events_applied": shard.applied - applied_before,
                "tail_records": shard.read_records - read_before, **shard.loaded,
                "duration_s": round(time.monotonic() - started, 4)}
        self.recoveries.append(info)
        self.recoveries_total += 1
        self.recovery_events_total += info["events_applied"]
        self.recovery_seconds_total += info["duration_s"]
        log.info("shard acquired", extra=info)
        if ev is not None:
            ev.set()

    async def _catch_up(self, s: int, end: int, timeout_s: float) -> None:
        """Read shard ``s`` up to ``end``, logging progress every second while it runs."""
        deadline = time.monotonic() + timeout_s
        start = self.follower.position(s) or 0
        started = time.monotonic()
        while True:
            try:
                await self.follower.wait_position(s, end, min(1.0, max(0.01, deadline - time.monotonic())))
                return
            except asyncio.TimeoutError:
                if time.monotonic() >= deadline:
                    raise
                pos = self.follower.position(s) or 0
                done = (pos - start) / max(1, end - start)
                log.info("recovering shard", extra={"shard": s, "position": pos, "finish_line": end,
                                                    "progress": round(done, 3),
                                                    "elapsed_s": round(time.monotonic() - started, 2)})

    async def _claim(self, s: int) -> bool:
        if not self.replication:
            shard = self.roles.shards.setdefault(s, Shard(s))
            shard.epoch = shard.my_epoch = 1
            shard.owner = self.me
            return True
        timeout = self.recovery_timeout_s
        me = asyncio.current_task()
        shard = await self.bootstraps.ensure_following(s)
        self._still_wanted(s, me)
        end = (await self.follower.end_offsets([s]))[s]
        self._still_wanted(s, me)
        await self._catch_up(s, end, timeout)  # the finish line
        self._still_wanted(s, me)
        shard.unpack_all()  # from the compact standby form: from now on events apply to live objects
        epoch = shard.epoch + 1
        shard.my_epoch = epoch
        claim = events.claim(s, epoch, self.me, self.clock())
        offset = await self.replicator.send_and_wait(s, events.CLAIM_KEY, events.encode(claim), timeout)
        self._still_wanted(s, me)
        await self.follower.wait_position(s, offset + 1, timeout)
        self._still_wanted(s, me)
        if shard.owner == self.me and shard.epoch == epoch and shard.my_epoch == epoch:
            return True
        shard.my_epoch = None
        return False

    # -- log -> memory -----------------------------------------------------------------
    def apply_records(self, s: int, records: Sequence[Any]) -> None:
        """The follower's records of partition ``s``, in log order."""
        shard = self.roles.shards.get(s)
        if shard is None:
            return
        now = time.monotonic()
        decode = self.erasure.codec.decode_change
        for rec in records:
            try:
                event = decode(s, rec.key, rec.value)
            except KeyErased:
                self.erasure.skipped_erased_total += 1  # its session was erased: nothing to apply
                shard.skip_record(rec.offset, now)
                continue
            except KeyNotRead as exc:
                # Its data key is further in the keys partition than read yet: read this
                # record again once the keys follower is past it (hurried: a fetch or two). A record
                # naming a key that never comes (forged) is refused after KEY_WAIT_S.
                blocked = self._key_waits.get(s)
                if blocked is None or blocked[0] != rec.offset:
                    self._key_waits[s] = (rec.offset, now)
                elif now - blocked[1] > KEY_WAIT_S:
                    del self._key_waits[s]
                    self.erasure.refused_total += 1
                    log.error("event refused: its data key never arrived",
                              extra={"shard": s, "offset": rec.offset, "error": str(exc)})
                    shard.skip_record(rec.offset, now)
                    continue
                self.erasure.follower.hurry(s, exc.koff + 1, KEY_WAIT_S)  # the keys follower reads lazily
                self.follower.follow(s, rec.offset)
                break
            except events.BadEvent as exc:  # undecodable, or sealed records that fail authentication
                self.erasure.refused_total += 1
                log.error("event refused", extra={"shard": s, "offset": rec.offset, "error": str(exc)})
                shard.skip_record(rec.offset, now)
                continue
            outcome = shard.apply_record(rec.offset, event, self.me, now)
            if outcome == "fenced":
                log.warning("fenced: shard claimed by another node",
                            extra={"shard": s, "owner": shard.owner, "epoch": shard.epoch})
                if shard.owner is not None:
                    self.roles.owners[s] = shard.owner  # 421s name the claimant until the router says more
                self.roles.serving.discard(s)
                self._reset_shard(s, keep_following=s in self.roles.standby or s in self.roles.recovering)
                return
        if shard.acks.acking is not None:
            self.verification.records_read(shard, now)

    def _reset_shard(self, s: int, keep_following: bool) -> None:
        shard = self.roles.shards[s]
        shard.reset()
        self.verification.release_waiters(s)
        self.follower.unfollow(s)
        self.erasure.drop(s)
        self._forget(s, shard)
        if keep_following:
            self.bootstraps.start(s)
        else:
            del self.roles.shards[s]
