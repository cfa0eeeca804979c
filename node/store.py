"""The node's session store: shards it owns or follows, live writes, expiry, ownership.

asyncio but no aiohttp: handlers in node/http.py parse, call and render.

Write path (``write``): find the shard (421 if not ours, wait while it is recovering),
check idempotency and If-Match, ``apply`` (pure), check limits, hand the event to the
replicator and install the new state, all in one synchronous step. For durability
``log`` the caller then awaits ``confirm``: Kafka acknowledged the event (acks=all) AND
no takeover claim precedes it in the partition, so an acknowledged write can never be
on the losing side of a claim. The owner does not read its own partitions back for
that: Kafka's acknowledgements of our records at the offsets directly after our claim
prove nothing else is between (node/shard.py, "Owner verification"). It reads a
partition only to settle a hole (an acknowledged offset past records it has not seen),
after a stall, and when the partition's end moved past what it wrote (checked every
``OWNER_CHECK_S``): that is how an owner that was replaced learns it is fenced.

Ownership (``acquire``): load the shard's snapshots and follow the partition from
their checkpoint, read to the end offset taken at the start (the finish line), append
a claim with a higher epoch, read past it, write a full set of snapshots for the new
epoch, serve. Standbys are bootstrapped the same way (snapshots + tail), then follow.

Snapshots (``_snapshot_loop``): while owning a shard, sessions whose changes have been
read back from the log are snapshotted after ``snapshot_every_events`` changes or
``snapshot_max_age_s`` seconds, then a checkpoint records the offset a rebuild may
start from (replicator/snapshots.py says why keys carry the epoch).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stickystate.errors import Conflict, NotFound, NotOwner, StickyError, Unavailable
from stickystate.node.ops import Op, Session, apply
from stickystate.node.settings import NodeSettings
from stickystate.node.idempotency import DELIVERY, EPOCH, FP, STATE, STATUS, IdempotencyCache
from stickystate.node.shard import DELETED, Shard
from stickystate.node.validate import check_precondition, check_state
from stickystate.replicator import events
from stickystate.replicator.errors import ReplicationError
from stickystate.replicator.follower import Follower
from stickystate.replicator.history import HistoryReader
from stickystate.replicator.producer import Replicator
from stickystate.replicator.snapshots import SnapshotReader, checkpoint_key, encode_checkpoint, encode_snapshot, parse_key, session_key
from stickystate.protocol import shard_of

log = logging.getLogger("stickystate.node")

Clock = Callable[[], float]


def fingerprint(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.hexdigest()


@dataclass
class WriteResult:
    status: int
    state: Session | None
    shard: int
    epoch: int
    delivery: asyncio.Future[int] | None  # None when answered from the idempotency cache
    replayed: bool = False


class NodeStore:
    def __init__(self, settings: NodeSettings, clock: Clock = time.time) -> None:
        self.settings = settings
        self.me = settings.node_id
        self.clock = clock
        self.partitions = settings.replicator.partitions
        self.replicator = Replicator(settings.replicator, client_id=f"stickystate-{self.me}",
                                     on_acked=self._on_acked)
        self.follower = Follower(settings.replicator, client_id=f"stickystate-{self.me}-follower",
                                 on_records=self._on_records)
        self.history = HistoryReader(settings.replicator, client_id=f"stickystate-{self.me}-history")
        self.snapshot_reader = SnapshotReader(settings.replicator, client_id=f"stickystate-{self.me}-snapshots")
        self._bootstraps: dict[int, asyncio.Task[None]] = {}  # shard -> loading its snapshots, then following
        self._full_due: set[int] = set()  # owned shards whose new epoch still needs its full snapshot set
        self._checkpointed: dict[int, tuple[int, int]] = {}  # shard -> (epoch, replay_from) of the last checkpoint
        self._cleanup_due: dict[int, asyncio.Future[int]] = {}  # shard -> first checkpoint of our epoch (its delivery)
        self._snapshot_task: asyncio.Task[None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()  # referenced until done (the loop keeps only weak refs)
        self.snapshots_total = 0
        self.tombstones_total = 0
        self.checkpoints_total = 0
        self.snapshot_bytes_total = 0
        self.snapshot_cleanups_total = 0
        self.shards: dict[int, Shard] = {}
        # owner verification: confirm() callers waiting for shard.position to pass their
        # offset, per shard a heap of (offset, seq, future of "verified while owning")
        self._waiters: dict[int, list[tuple[int, int, asyncio.Future[bool]]]] = {}
        self._waiter_seq = itertools.count()
        self._prev_ends: dict[int, int] = {}  # owned shard -> its end offset at the last check
        self._owner_check_task: asyncio.Task[None] | None = None
        self.owner_log_reads = {"hole": 0, "check": 0, "stall": 0}  # why owned partitions were read
        self.serving: set[int] = set()
        self.recovering: dict[int, asyncio.Event] = {}
        self.standby: set[int] = set()
        self.owners: dict[int, str] = {}  # the router's view, for 421 hints
        self.generation = -1
        self._acquire_tasks: dict[int, asyncio.Task[None]] = {}
        self._expiry: list[tuple[float, str]] = []
        self._expiry_wake = asyncio.Event()
        self._expiry_task: asyncio.Task[None] | None = None
        self._assign_lock = asyncio.Lock()
        self.draining = False  # advertised to the router: move my shards away
        self.refusing = False  # no new requests: the router retries them elsewhere
        self.last_probe = 0.0  # monotonic time of the router's last status probe
        # Stall detection: a process that was paused (SIGSTOP, a long GC or a blocked loop)
        # may have been replaced meanwhile. It serves nothing until its follower has read
        # every owned partition to an end offset taken after the stall.
        self._last_tick = time.monotonic()
        self._verifying: asyncio.Future[bool] | None = None
        self._unverified = False  # a verification failed: retry before serving again
        self._next_verify_at = 0.0
        self._tick_task: asyncio.Task[None] | None = None
        self._verify_task: asyncio.Task[None] | None = None
        self.stalls_total = 0
        self.expired_total = 0
        self.recoveries: deque[dict[str, Any]] = deque(maxlen=256)  # recent, for /internal/status
        self.recoveries_total = 0
        self.recovery_events_total = 0
        self.recovery_seconds_total = 0.0

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        from stickystate.replicator.topics import ensure_topics

        if not self.settings.replication:
            log.warning("replication is OFF: sessions are lost when this node stops")
            self._expiry_task = asyncio.create_task(self._expiry_loop(), name="expiry")
            return
        await ensure_topics(self.settings.replicator)
        await self.replicator.start()
        await self.follower.start()
        self._expiry_task = asyncio.create_task(self._expiry_loop(), name="expiry")
        self._tick_task = asyncio.create_task(self._ticker(), name="stall-ticker")
        self._owner_check_task = asyncio.create_task(self._owner_check_loop(), name="owner-check")
        if self.settings.snapshot_every_events:
            self._snapshot_task = asyncio.create_task(self._snapshot_loop(), name="snapshots")

    async def drain(self, timeout_s: float = 15.0) -> None:
        """Leave gracefully: refuse new requests, flush replication, then ask the
        router to move the shards, and wait until it has (its assignment takes them
        away from us, after their queues are flushed). Nothing acknowledged is lost, even at
        durability memory: every queued event is in Kafka before any new claim."""
        if self.refusing:
            return
        self.refusing = True
        log.info("draining: flushing replication", extra={"queued": self.replicator.depth if self.settings.replication else 0})
        if self.settings.replication:
            try:
                await self.replicator.flush(timeout_s=timeout_s)
            except asyncio.TimeoutError:
                log.error("drain: replication not flushed in time", extra={"queued": self.replicator.depth})
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.serving and self.settings.replication and time.monotonic() < deadline:
            if time.monotonic() - self.last_probe > 2.0:
                break  # no router is watching (whole cluster stopping): nobody will take over
            await asyncio.sleep(0.05)
        log.info("drained", extra={"still_serving": sorted(self.serving)})

    async def stop(self) -> None:
        self.refusing = self.draining = True
        background = [*self._acquire_tasks.values(), *self._bootstraps.values(), *self._cleanups]
        for pending in background:
            pending.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for task in (self._expiry_task, self._tick_task, self._verify_task, self._snapshot_task,
                     self._owner_check_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._expiry_task = self._tick_task = self._snapshot_task = self._owner_check_task = None
        if self.settings.replication:
            await self.replicator.stop()
            await self.follower.stop()
            await self.history.stop()
            await self.snapshot_reader.stop()

    @property
    def ready(self) -> bool:
        return (not self.draining and (self.follower.alive or not self.settings.replication)
                and not self.recovering and self.generation >= 0)

    # -- shard lookup -----------------------------------------------------------
    def shard_for(self, sid: str) -> int:
        return shard_of(sid, self.partitions)

    # -- stall detection ---------------------------------------------------------------
    STALL_S = 0.5
    TICK_S = 0.1

    def _check_stall(self) -> None:
        now = time.monotonic()
        # A pause while serving nothing (start-up, before any shard is acquired) needs no
        # re-verification: acquiring a shard reads its partition past our claim anyway.
        stalled = now - self._last_tick > self.STALL_S and bool(self.serving)
        self._last_tick = now
        if stalled:
            self.stalls_total += 1
            self._unverified = True
            log.warning("stall detected: re-verifying ownership from the log")
        if self._unverified and self._verifying is None and self.serving and now >= self._next_verify_at:
            self._verifying = asyncio.get_running_loop().create_future()
            self._verify_task = asyncio.create_task(self._verify(self._verifying), name="verify-after-stall",
                                                    context=contextvars.Context())

    async def _ticker(self) -> None:
        self._last_tick = time.monotonic()  # the time start() took is not a stall
        while True:
            self._check_stall()
            await asyncio.sleep(self.TICK_S)

    async def _verify(self, done: asyncio.Future[bool]) -> None:
        """Read every served partition up to an end offset taken now: any claim made
        while we were stalled is seen (and fences us) before we answer again."""
        ok = False
        try:
            shards = sorted(self.serving)
            ends = await asyncio.wait_for(self.follower.end_offsets(shards), self.settings.hold_timeout_s)
            for s, end in ends.items():
                shard = self.shards.get(s)
                if shard is None or shard.acks.acking is None or shard.position >= end:
                    continue
                self._read_log(shard, end, "stall")
                await self._until_verified(shard, end - 1, self.settings.hold_timeout_s)  # False: fenced meanwhile
            ok = True
        except Exception as exc:  # Kafka unreachable: keep refusing; retry shortly
            log.warning("ownership verification failed", extra={"error": repr(exc)})
            self._next_verify_at = time.monotonic() + 0.5
        finally:
            self._unverified = not ok
            self._verifying = None
            if not done.done():
                done.set_result(ok)

    async def serving_shard(self, sid: str) -> Shard:
        s = self.shard_for(sid)
        if self.refusing:
            raise NotOwner(s, None, None)
        if self.settings.replication:
            self._check_stall()
            if self._unverified:
                verified = False
                if self._verifying is not None:
                    try:
                        verified = await asyncio.wait_for(asyncio.shield(self._verifying),
                                                          self.settings.hold_timeout_s)
                    except asyncio.TimeoutError:
                        pass
                if not verified:
                    raise Unavailable("re-verifying shard ownership after a stall", retry_after_s=1,
                                      code="recovering")
        if s in self.serving:
            return self.shards[s]
        event = self.recovering.get(s)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), self.settings.hold_timeout_s)
            except asyncio.TimeoutError:
                raise Unavailable(f"shard {s} is still being rebuilt", retry_after_s=1, code="recovering") from None
            if s in self.serving:
                return self.shards[s]
        raise NotOwner(s, self.owners.get(s), self.shards[s].epoch if s in self.shards else None)

    # -- reads --------------------------------------------------------------------
    async def read(self, sid: str) -> tuple[Shard, Session]:
        shard = await self.serving_shard(sid)
        state = shard.sessions.get(sid)
        if state is None or state["expires_at"] <= self.clock():
            raise NotFound(f"session {sid!r} not found")
        return shard, state

    # -- writes -------------------------------------------------------------------
    async def write(self, op: Op, *, if_match: int | str | None = None, idem: str | None = None,
                    request_fingerprint: str = "", appended_field: str | None = None) -> WriteResult:
        shard = await self.serving_shard(op["sid"])
        # From here to the end: no await. Check, apply, hand over, install.
        sid = op["sid"]
        if idem is not None:
            cached = shard.idem.records.get((sid, idem))
            if cached is not None:
                if cached[FP] != request_fingerprint:
                    raise Conflict("Idempotency-Key was used with a different request", code="idempotency_key_reused")
                state = cached[STATE]
                if state is None and cached[STATUS] != 204:
                    state = shard.sessions.get(sid)  # a router key's entry: the session as it is now
                delivery = cached[DELIVERY]
                if isinstance(delivery, int):  # settled: the offset it got
                    delivery = asyncio.get_running_loop().create_future()
                    delivery.set_result(cached[DELIVERY])
                return WriteResult(cached[STATUS], state, shard.id,
                                   cached[EPOCH] if cached[EPOCH] is not None else shard.epoch, delivery, replayed=True)
            op["idem"] = [idem, request_fingerprint]
        current = shard.sessions.get(sid)
        now = self.clock()
        if current is not None and current["expires_at"] <= now:
            current = None  # expired, not reaped yet: treated as absent (the reaper's event comes first)
            self._expire_now(shard, sid)
        check_precondition(if_match, None if current is None else current["version"])
        new, event = apply(current, op, now)
        size = check_state(new["data"], self.settings.limits, appended_field) if new is not None else 0
        epoch = shard.my_epoch
        assert epoch is not None
        event["node"] = self.me
        event["epoch"] = epoch
        try:
            delivery = (self.replicator.enqueue(shard.id, sid.encode(), events.encode(event),
                                                meta=(sid, DELETED if new is None else new["version"]))
                        if self.settings.replication else None)
        except ReplicationError as exc:
            raise Unavailable(str(exc), retry_after_s=1, code="replication_unavailable") from exc
        shard.commit(event, new, size)
        if new is not None and current is None:
            self._schedule_expiry(new)
        status = 201 if op["op"] == "create" or (op["op"] == "replace" and current is None) else (
            204 if new is None else 200)
        if idem is not None:
            key = (sid, idem)
            shard.idem.answered(key, status, delivery)
            if delivery is not None:
                delivery.add_done_callback(functools.partial(IdempotencyCache.settle, shard.idem, key))
        return WriteResult(status, new, shard.id, epoch, delivery)

    async def confirm(self, result: WriteResult) -> None:
        """Durability ``log``: Kafka has the event and no takeover precedes it."""
        if result.delivery is None:
            return
        deadline = self.settings.replicator.kafka_deadline_s
        s = result.shard
        try:
            offset = await asyncio.wait_for(asyncio.shield(result.delivery), deadline)
            shard = self.shards.get(s)
            if shard is not None and shard.position <= offset:
                # Not verified yet: a hole before it is being read, or we own the shard no more.
                if not await self._until_verified(shard, offset, deadline):
                    # Ownership ended first: what decides now is what the log holds before
                    # our record, read as a follower (or, not followed, a refusal).
                    await self.follower.wait_position(s, offset + 1, deadline)
        except asyncio.TimeoutError:
            raise Unavailable("Kafka did not confirm the write in time; it is applied in memory and still queued",
                              retry_after_s=1, code="replication_timeout") from None
        except LookupError:
            raise NotOwner(s, self.owners.get(s), None) from None
        except (ReplicationError, RuntimeError) as exc:
            raise Unavailable(f"replication failed: {exc}", retry_after_s=1, code="replication_unavailable") from exc
        shard = self.shards.get(result.shard)
        if shard is None:
            raise NotOwner(result.shard, self.owners.get(result.shard), None)
        if not shard.write_is_valid(offset, result.epoch, self.me):
            raise NotOwner(result.shard, self.owners.get(result.shard), shard.epoch if shard else None)

    # -- expiry -------------------------------------------------------------------
    def _schedule_expiry(self, session: Session) -> None:
        heapq.heappush(self._expiry, (session["expires_at"], session["id"]))
        if self._expiry[0][1] == session["id"]:
            self._expiry_wake.set()

    def _expire_now(self, shard: Shard, sid: str) -> bool:
        state = shard.sessions.get(sid)
        if state is None:
            return False
        try:
            new, event = apply(state, {"op": "expire", "sid": sid}, self.clock())
            event["node"], event["epoch"] = self.me, shard.my_epoch
            if self.settings.replication:
                self.replicator.enqueue(shard.id, sid.encode(), events.encode(event), meta=(sid, DELETED))
        except (ReplicationError, StickyError):
            return False
        shard.commit(event, new)
        self.expired_total += 1
        return True

    async def _expiry_loop(self) -> None:
        while True:
            now = self.clock()
            while self._expiry and self._expiry[0][0] <= now and not self.refusing and not self._unverified:
                _, sid = heapq.heappop(self._expiry)
                s = self.shard_for(sid)
                if s not in self.serving:
                    continue  # re-scheduled when the shard is (re)acquired
                shard = self.shards[s]
                state = shard.sessions.get(sid)
                if state is None:
                    continue
                if state["expires_at"] > now:
                    heapq.heappush(self._expiry, (state["expires_at"], sid))  # refreshed by a write
                elif not self._expire_now(shard, sid):
                    heapq.heappush(self._expiry, (now + 1.0, sid))  # replication full: try again
            delay = 1.0 if not self._expiry else max(0.0, min(1.0, self._expiry[0][0] - now))
            self._expiry_wake.clear()
            try:
                await asyncio.wait_for(self._expiry_wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    # -- owner verification (module docstring; node/shard.py) ----------------------------
    OWNER_CHECK_S = 1.0

    def _on_acked(self, s: int, acked: list[tuple[int, Any]]) -> None:
        shard = self.shards.get(s)
        if shard is None or shard.acks.acking is None:
            return
        shard.own_acked(acked, time.monotonic())
        if shard.acks.hole:
            self._read_log(shard, 0, "hole")
        self._wake(shard)

    def _read_log(self, shard: Shard, upto: int, reason: str) -> None:
        """Read an owned partition from ``shard.position`` (to ``upto`` at least)."""
        shard.acks.read_to = max(shard.acks.read_to, upto)
        if shard.id not in self.follower.following():
            self.follower.follow(shard.id, shard.position)
            self.owner_log_reads[reason] += 1

    def _caught_up(self, shard: Shard) -> None:
        """An owned partition read far enough: stop following it."""
        if not shard.acks.hole and shard.position >= shard.acks.read_to and shard.id in self.follower.following():
            self.follower.unfollow(shard.id)
            shard.acks.read_to = 0

    def _wake(self, shard: Shard) -> None:
        heap = self._waiters.get(shard.id)
        while heap and heap[0][0] < shard.position:
            fut = heapq.heappop(heap)[2]
            if not fut.done():
                fut.set_result(True)

    def _release_waiters(self, s: int) -> None:
        """Ownership ended: waiters not verified by now are answered False."""
        for _, _, fut in self._waiters.pop(s, ()):
            if not fut.done():
                fut.set_result(False)

    async def _until_verified(self, shard: Shard, offset: int, timeout_s: float) -> bool:
        """True once ``offset`` is verified while we own the shard; False if ownership ends first."""
        if shard.position > offset:
            return True
        if shard.acks.acking is None:
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters.setdefault(shard.id, []), (offset, next(self._waiter_seq), fut))
        return await asyncio.wait_for(fut, timeout_s)

    async def _owner_check_loop(self) -> None:
        """Read an owned partition whose end moved past what we wrote (acknowledged): a
        shard we do not write to would otherwise not notice a takeover claim."""
        while True:
            await asyncio.sleep(self.OWNER_CHECK_S)
            owned = [s for s in sorted(self.serving) if s in self.shards and self.shards[s].acks.acking is not None]
            if not owned or self.refusing:
                self._prev_ends.clear()
                continue
            try:
                ends = await asyncio.wait_for(self.follower.end_offsets(owned), self.OWNER_CHECK_S * 5)
            except Exception as exc:  # Kafka away: the acknowledgements stop too; next round
                log.debug("owner check failed", extra={"error": repr(exc)})
                continue
            prev, self._prev_ends = self._prev_ends, {}
            for s, end in ends.items():
                shard = self.shards.get(s)
                if shard is None or shard.acks.acking is None:
                    continue
                before = prev.get(s)
                if before is not None and shard.position < before:
                    self._read_log(shard, before, "check")
                self._prev_ends[s] = end

    # -- log -> memory -----------------------------------------------------------------
    def _on_records(self, s: int, records: Sequence[Any]) -> None:
        shard = self.shards.get(s)
        if shard is None:
            return
        now = time.monotonic()
        for rec in records:
            try:
                event = events.decode(rec.value)
            except events.BadEvent as exc:
                log.error("undecodable event", extra={"shard": s, "offset": rec.offset, "error": str(exc)})
                shard.position = rec.offset + 1
                continue
            outcome = shard.apply_record(rec.offset, event, self.me, now)
            if outcome == "fenced":
                log.warning("fenced: shard claimed by another node",
                            extra={"shard": s, "owner": shard.owner, "epoch": shard.epoch})
                self.serving.discard(s)
                self._reset_shard(s, keep_following=s in self.standby or s in self.recovering)
                return
        if shard.acks.acking is not None:
            shard.absorb(now)
            self._wake(shard)
            self._caught_up(shard)

    def _reset_shard(self, s: int, keep_following: bool) -> None:
        shard = self.shards[s]
        shard.reset()
        self._release_waiters(s)
        self.follower.unfollow(s)
        self._forget_ownership(s)
        if keep_following:
            self._start_bootstrap(s)
        else:
            del self.shards[s]

    def _forget_ownership(self, s: int) -> None:
        if s in self.shards:
            self.shards[s].marks.dirty.clear()
        self._full_due.discard(s)
        self._checkpointed.pop(s, None)
        self._cleanup_due.pop(s, None)
        self._prev_ends.pop(s, None)

    # -- rebuilding from snapshots + tail ---------------------------------------------
    def _start_bootstrap(self, s: int) -> None:
        task = self._bootstraps.get(s)
        if task is not None and not task.done():
            return
        task = self._bootstraps[s] = asyncio.create_task(self._bootstrap(s), name=f"bootstrap-{s}",
                                                         context=contextvars.Context())
        task.add_done_callback(self._bootstrap_done)

    @staticmethod
    def _bootstrap_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("loading a shard from snapshots failed", extra={"task": task.get_name(),
                                                                      "error": repr(task.exception())})

    async def _bootstrap(self, s: int) -> None:
        """Load the shard's snapshots, then follow its changes from their checkpoint."""
        shard = self.shards.get(s)
        if shard is None:
            return
        loaded = await self.snapshot_reader.load(s, self.settings.recovery_timeout_s)
        start = await self.snapshot_reader.changes_start(s)
        if start > loaded.replay_from:
            raise RuntimeError(
                f"shard {s}: the changes partition starts at offset {start} but snapshots cover only the events "
                f"before {loaded.replay_from}: retention removed changes no snapshot holds "
                "(see README 'Snapshots and retention'); refusing to serve a partial state")
        if self.shards.get(s) is not shard:
            return  # dropped meanwhile
        shard.load(loaded.epoch, loaded.node, loaded.replay_from, loaded.snapshots, packed=s not in self.recovering)
        shard.loaded = {"snapshot_sessions": len(loaded.snapshots), "snapshot_records": loaded.records_read,
                        "snapshot_epoch": loaded.epoch, "replay_from": loaded.replay_from,
                        "snapshot_load_s": round(loaded.seconds, 4)}
        self.follower.follow(s, loaded.replay_from)
        log.info("shard bootstrapped from snapshots",
                 extra={"shard": s, "snapshot_epoch": loaded.epoch, "sessions": len(loaded.snapshots),
                        "snapshot_records": loaded.records_read, "replay_from": loaded.replay_from,
                        "duration_s": round(loaded.seconds, 4)})

    async def _ensure_following(self, s: int) -> Shard:
        """The shard object, loaded from snapshots and followed (waits for a running bootstrap)."""
        for _ in range(3):
            shard = self.shards.setdefault(s, Shard(s))
            if s in self.follower.following():
                return shard
            task = self._bootstraps.get(s)
            if task is None or task.done():
                self._bootstraps.pop(s, None)
                self._start_bootstrap(s)
                task = self._bootstraps[s]
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():
                    continue  # dropped and re-assigned meanwhile: start over
                raise
        raise RuntimeError(f"shard {s}: could not load snapshots")

    # -- assignment (told by the router) -------------------------------------------
    async def assign(self, generation: int, owners: dict[int, str], standbys: dict[int, list[str]]) -> dict[str, Any]:
        """Take the router's placement. Shards we lose are released (queue flushed)
        before this returns; shards we gain are acquired in the background."""
        async with self._assign_lock:
            if generation < self.generation:
                return {"generation": self.generation, "stale": True}
            self.generation = generation
            self.owners = dict(owners)
            owned = {s for s, n in owners.items() if n == self.me}
            standby = {s for s, chain in standbys.items() if self.me in chain}
            self.standby = standby
            lost = (self.serving | set(self.recovering)) - owned
            for s in lost:
                task = self._acquire_tasks.pop(s, None)
                if task is not None:
                    task.cancel()
                self.recovering.pop(s, None)
                self.serving.discard(s)
                self._forget_ownership(s)
                if s in self.shards:
                    self.shards[s].my_epoch = None
            if lost and self.settings.replication:
                try:
                    await self.replicator.flush(lost, timeout_s=self.settings.replicator.kafka_deadline_s * 2)
                except asyncio.TimeoutError:
                    log.error("release: replication not flushed in time", extra={"shards": sorted(lost)})
            for s in lost:
                shard = self.shards.get(s)
                owned_it = False
                if shard is not None and shard.acks.acking is not None:
                    owned_it = True
                    shard.acks.reset()  # after the flush: every acknowledgement is in
                    self._release_waiters(s)
                if s not in standby:
                    self._drop(s)
                elif shard is not None:
                    shard.pack_all()
                    if owned_it:
                        self.follower.follow(s, shard.position)  # a standby now: from where we verified
            for s in set(self.shards) - owned - standby:
                if s not in self.serving and s not in self.recovering:
                    self._drop(s)
            # Owned shards first: their snapshot loads queue ahead of the standbys'.
            for s in sorted(owned - self.serving - set(self.recovering)):
                self.recovering[s] = asyncio.Event()
                if self.settings.replication and s not in self.shards:
                    self.shards[s] = Shard(s)
                    self._start_bootstrap(s)
                # A fresh context: the task outlives the assign request (no request id in its logs).
                self._acquire_tasks[s] = asyncio.create_task(self._acquire(s), name=f"acquire-{s}",
                                                             context=contextvars.Context())
            for s in sorted(standby - owned) if self.settings.replication else ():
                if s not in self.shards:
                    self.shards[s] = Shard(s)
                    self._start_bootstrap(s)
            return {"generation": generation, "serving": sorted(self.serving), "recovering": sorted(self.recovering),
                    "released": sorted(lost)}

    def _drop(self, s: int) -> None:
        task = self._bootstraps.pop(s, None)
        if task is not None:
            task.cancel()
        if s in self.shards:
            self.shards[s].acks.reset()
        self._release_waiters(s)
        self._forget_ownership(s)
        if self.settings.replication:
            self.follower.unfollow(s)
        self.shards.pop(s, None)

    async def _acquire(self, s: int) -> None:
        started = time.monotonic()
        applied_before = self.shards[s].applied if s in self.shards else 0
        read_before = self.shards[s].read_records if s in self.shards else 0
        try:
            for attempt in range(5):
                if await self._claim(s):
                    break
                log.warning("claim lost a race, retrying", extra={"shard": s, "attempt": attempt})
            else:
                raise RuntimeError(f"could not claim shard {s}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("acquire failed", extra={"shard": s})
            self.recovering.pop(s, None)
            self._acquire_tasks.pop(s, None)
            # The router's next health round sees the shard not served and assigns again.
            self.generation = -1
            return
        shard = self.shards[s]
        for state in shard.sessions.values():
            heapq.heappush(self._expiry, (state["expires_at"], state["id"]))
        self._expiry_wake.set()
        shard.start_owning()
        if self.settings.replication:
            # Our claim has been read: from here on Kafka's acknowledgements verify our
            # writes, and the partition is read only to settle holes (see above).
            assert shard.my_epoch is not None
            shard.acks.start(shard.my_epoch)
            self._caught_up(shard)
        if self.settings.snapshot_every_events and self.settings.replication:
            self._full_due.add(s)
            self._snapshot_full(shard)
        self.serving.add(s)
        ev = self.recovering.pop(s, None)
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
        if not self.settings.replication:
            shard = self.shards.setdefault(s, Shard(s))
            shard.epoch = shard.my_epoch = 1
            shard.owner = self.me
            return True
        timeout = self.settings.recovery_timeout_s
        shard = await self._ensure_following(s)
        end = (await self.follower.end_offsets([s]))[s]
        await self._catch_up(s, end, timeout)  # the finish line
        shard.unpack_all()  # from the compact standby form: from now on events apply to live objects
        epoch = shard.epoch + 1
        shard.my_epoch = epoch
        claim = events.claim(s, epoch, self.me, self.clock())
        offset = await self.replicator.send_and_wait(s, events.CLAIM_KEY, events.encode(claim), timeout)
        await self.follower.wait_position(s, offset + 1, timeout)
        if shard.owner == self.me and shard.epoch == epoch and shard.my_epoch == epoch:
            return True
        shard.my_epoch = None
        return False

    # -- snapshots ----------------------------------------------------------------------
    def _write_snapshot(self, shard: Shard, sid: str, epoch: int) -> None:
        """Enqueue one session's snapshot (or tombstone) for the current epoch; raises
        ReplicationError when the queue refuses it (the session then stays dirty)."""
        state = shard.sessions.get(sid)
        topic = self.settings.replicator.snapshots_topic
        if state is None:
            self.replicator.enqueue(shard.id, session_key(sid, epoch), None, topic=topic)
            self.tombstones_total += 1
            return
        offset = shard.last_offset.get(sid, shard.position - 1)
        value = encode_snapshot(sid, state, offset, epoch, self.me, self.clock(), shard.idem.of_session(sid))
        self.replicator.enqueue(shard.id, session_key(sid, epoch), value, topic=topic)
        self.snapshots_total += 1
        self.snapshot_bytes_total += len(value)

    def _write_checkpoint(self, shard: Shard, epoch: int) -> asyncio.Future[int] | None:
        replay_from = shard.replay_from()
        last = self._checkpointed.get(shard.id)
        if last is not None and last == (epoch, replay_from):
            return None
        fut = self.replicator.enqueue(shard.id, checkpoint_key(epoch),
                                      encode_checkpoint(epoch, self.me, replay_from, self.clock()),
                                      topic=self.settings.replicator.snapshots_topic)
        self._checkpointed[shard.id] = (epoch, replay_from)
        self.checkpoints_total += 1
        return fut

    def _snapshot_full(self, shard: Shard) -> None:
        """A new epoch: snapshot every session of the shard, then checkpoint. Until this
        succeeds, readers keep using the previous epoch's checkpoint (still valid)."""
        epoch = shard.my_epoch
        if epoch is None:
            return
        try:
            for sid in list(shard.sessions):
                self._write_snapshot(shard, sid, epoch)
            fut = self._write_checkpoint(shard, epoch)
        except ReplicationError as exc:
            log.warning("full snapshot deferred", extra={"shard": shard.id, "error": str(exc)})
            return
        self._full_due.discard(shard.id)
        if fut is not None:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: nobody else awaits it
            self._cleanup_due[shard.id] = fut

    def snapshot_round(self) -> None:
        """Snapshot what is due in every owned shard, then move each shard's checkpoint."""
        now = time.monotonic()
        for s in sorted(self.serving):
            shard = self.shards.get(s)
            if shard is None or shard.my_epoch is None:
                continue
            if s in self._full_due:
                self._snapshot_full(shard)
                continue
            epoch = shard.my_epoch
            try:
                for sid in shard.snapshot_due(self.settings.snapshot_every_events, self.settings.snapshot_max_age_s,
                                              now):
                    self._write_snapshot(shard, sid, epoch)
                    shard.snapshot_taken(sid)
                self._write_checkpoint(shard, epoch)
            except ReplicationError:
                return  # queue full or Kafka away: the sessions stay dirty, next round tries again
        for s, fut in list(self._cleanup_due.items()):
            if fut.done():
                del self._cleanup_due[s]
                if not fut.cancelled() and fut.exception() is None and s in self.serving:
                    task = asyncio.create_task(self._cleanup(s, self.shards[s].my_epoch),
                                               name=f"snapshot-cleanup-{s}", context=contextvars.Context())
                    self._cleanups.add(task)
                    task.add_done_callback(self._cleanups.discard)

    async def _cleanup(self, s: int, epoch: int | None) -> None:
        """Our epoch's first checkpoint is in the log: older epochs' records are not needed."""
        try:
            loaded = await self.snapshot_reader.load(s, self.settings.recovery_timeout_s)
            if epoch is None or loaded.epoch != epoch or self.shards.get(s) is None or self.shards[s].my_epoch != epoch:
                return
            topic = self.settings.replicator.snapshots_topic
            for key in loaded.other_epoch_keys:
                parsed = parse_key(key)
                if parsed is not None and parsed[1] < epoch:
                    self.replicator.enqueue(s, key, None, topic=topic)
            self.snapshot_cleanups_total += 1
        except Exception as exc:  # best effort: stale records only cost reading time
            log.warning("snapshot cleanup failed", extra={"shard": s, "error": repr(exc)})

    def snapshot_tail_events(self) -> int:
        """Records after the last checkpoint, summed over owned shards: what a rebuild would replay."""
        return sum(max(0, self.shards[s].position - self._checkpointed.get(s, (0, 0))[1])
                   for s in self.serving if s in self.shards)

    async def _snapshot_loop(self) -> None:
        interval = min(1.0, self.settings.snapshot_max_age_s / 4)
        while True:
            await asyncio.sleep(interval)
            if not self.refusing and not self._unverified:
                self.snapshot_round()

    # -- introspection -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self.last_probe = time.monotonic()
        return {
            "node": self.me,
            "generation": self.generation,
            "ready": self.ready,
            "draining": self.draining,
            "serving": sorted(self.serving),
            "recovering": sorted(self.recovering),
            "standby": sorted(self.standby),
            "following": sorted(self.follower.following()) if self.settings.replication else [],
            "owner_log_reads": dict(self.owner_log_reads),
            "sessions": sum(len(self.shards[s].sessions) for s in self.serving),
            "replication_queue": self.replicator.depth,
            "recoveries": list(self.recoveries),
        }

