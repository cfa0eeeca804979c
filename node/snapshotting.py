"""Writing the snapshots of owned shards (asyncio, no aiohttp).

While owning a shard, sessions whose changes are verified in the log are snapshotted
after ``snapshot_every_events`` changes or ``snapshot_max_age_s`` seconds
(node/snapshot_marks.py says which are due), then a checkpoint records the offset a
rebuild may start from (replicator/snapshots.py says why keys carry the epoch). A new
epoch of ownership starts with a full set: every session, then a checkpoint; once that
checkpoint is in the log, the older epochs' records are tombstoned (cleanup).

``Snapshotting`` owns the per-shard state of that (full sets due, the last checkpoint
written, the checkpoint a cleanup waits for), the snapshot loop task and the cleanup
tasks, and the counters /metrics reports.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable

from stickystate.node.roles import ShardRoles
from stickystate.node.shard import Shard
from stickystate.node.tasks import cancel_and_wait
from stickystate.node.verification import StallGuard
from stickystate.replicator.errors import ReplicationError
from stickystate.replicator.keys import Codec
from stickystate.replicator.producer import Replicator
from stickystate.replicator.snapshots import (SnapshotReader, checkpoint_key, encode_checkpoint, encode_snapshot,
                                              parse_key, session_key)

log = logging.getLogger("stickystate.node")


class Snapshotting:
    def __init__(self, roles: ShardRoles, stall: StallGuard, replicator: Replicator, reader: SnapshotReader,
                 me: str, clock: Callable[[], float], every_events: int, max_age_s: float,
                 recovery_timeout_s: float, codec: Codec) -> None:
        self.roles = roles
        self.stall = stall
        self.replicator = replicator
        self.reader = reader
        self.topic = replicator.settings.snapshots_topic
        self.me = me
        self.clock = clock
        self.every_events = every_events
        self.max_age_s = max_age_s
        self.recovery_timeout_s = recovery_timeout_s
        self.codec = codec  # seals each snapshot under its session's data key
        self._full_due: set[int] = set()  # owned shards whose new epoch still needs its full snapshot set
        self._checkpointed: dict[int, tuple[int, int]] = {}  # shard -> (epoch, replay_from) of the last checkpoint
        self._cleanup_due: dict[int, asyncio.Future[int]] = {}  # shard -> first checkpoint of our epoch (its delivery)
        self._task: asyncio.Task[None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()  # referenced until done (the loop keeps only weak refs)
        self.snapshots_total = 0
        self.tombstones_total = 0
        self.checkpoints_total = 0
        self.snapshot_bytes_total = 0
        self.snapshot_cleanups_total = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="snapshots")

    async def stop(self) -> None:
        await cancel_and_wait([*self._cleanups, self._task])
        self._task = None

    def begin_epoch(self, shard: Shard) -> None:
        """We own ``shard`` at a new epoch: its full set of snapshots is due (written now if the queue takes it)."""
        if not self.every_events:
            return  # snapshots are off
        self._full_due.add(shard.id)
        self._snapshot_full(shard)

    def forget(self, s: int) -> None:
        """Ownership of ``s`` ended."""
        self._full_due.discard(s)
        self._checkpointed.pop(s, None)
        self._cleanup_due.pop(s, None)

    def _write_snapshot(self, shard: Shard, sid: str, epoch: int) -> None:
        """Enqueue one session's snapshot (or tombstone) for the current epoch; raises
        ReplicationError when the queue refuses it (the session then stays dirty)."""
        state = shard.sessions.get(sid)
        if state is None:
            self.replicator.enqueue(shard.id, session_key(sid, epoch), None, topic=self.topic)
            self.tombstones_total += 1
            return
        offset = shard.last_offset.get(sid, shard.position - 1)
        try:
            value = self.codec.encode_snapshot(shard.id, sid, state["version"], encode_snapshot(
                sid, state, offset, epoch, self.me, self.clock(), shard.idem.of_session(sid)))
        except LookupError:
            return  # its key is erased: the session is on its way out
        self.replicator.enqueue(shard.id, session_key(sid, epoch), value, topic=self.topic)
        self.snapshots_total += 1
        self.snapshot_bytes_total += len(value)

    def _write_checkpoint(self, shard: Shard, epoch: int) -> asyncio.Future[int] | None:
        replay_from = shard.replay_from()
        last = self._checkpointed.get(shard.id)
        if last is not None and last == (epoch, replay_from):
            return None
        fut = self.replicator.enqueue(shard.id, checkpoint_key(epoch),
                                      encode_checkpoint(epoch, self.me, replay_from, self.clock()), topic=self.topic)
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
        roles = self.roles
        now = time.monotonic()
        for s in sorted(roles.serving):
            shard = roles.shards.get(s)
            if shard is None or shard.my_epoch is None:
                continue
            if s in self._full_due:
                self._snapshot_full(shard)
                continue
            epoch = shard.my_epoch
            try:
                for sid in shard.snapshot_due(self.every_events, self.max_age_s, now):
                    self._write_snapshot(shard, sid, epoch)
                    shard.snapshot_taken(sid)
                self._write_checkpoint(shard, epoch)
            except ReplicationError:
                return  # queue full or Kafka away: the sessions stay dirty, next round tries again
        for s, fut in list(self._cleanup_due.items()):
            if fut.done():
                del self._cleanup_due[s]
                if not fut.cancelled() and fut.exception() is None and s in roles.serving:
                    task = asyncio.create_task(self._cleanup(s, roles.shards[s].my_epoch),
                                               name=f"snapshot-cleanup-{s}", context=contextvars.Context())
                    self._cleanups.add(task)
                    task.add_done_callback(self._cleanups.discard)

    async def _cleanup(self, s: int, epoch: int | None) -> None:
        """Our epoch's first checkpoint is in the log: older epochs' records are not needed."""
        try:
            loaded = await self.reader.load(s, self.recovery_timeout_s, opener=None)
            shard = self.roles.shards.get(s)
            if epoch is None or loaded.epoch != epoch or shard is None or shard.my_epoch != epoch:
                return
            for key in loaded.other_epoch_keys:
                parsed = parse_key(key)
                if parsed is not None and parsed[1] < epoch:
                    self.replicator.enqueue(s, key, None, topic=self.topic)
            self.snapshot_cleanups_total += 1
        except Exception as exc:  # best effort: stale records only cost reading time
            log.warning("snapshot cleanup failed", extra={"shard": s, "error": repr(exc)})

    def tail_events(self) -> int:
        """Records after the last checkpoint, summed over owned shards: what a rebuild would replay."""
        shards = self.roles.shards
        return sum(max(0, shards[s].position - self._checkpointed.get(s, (0, 0))[1])
                   for s in self.roles.serving if s in shards)

    async def _loop(self) -> None:
        interval = min(1.0, self.max_age_s / 4)
        while True:
            await asyncio.sleep(interval)
            if not self.roles.refusing and not self.stall.unverified:
                self.snapshot_round()
