"""Per-session data keys on a node, and erasure (asyncio, no aiohttp).

Every session's records in ``changes`` and ``snapshots`` are sealed under its own data
key (stickystate/crypto.py, replicator/keys.py). ``Erasure`` owns what a node does
with those keys:

- the key ring of the shards it holds (owned and standby), in memory only: loaded from
  the shard's ``keys`` partition when the shard is loaded (after its snapshots, so every
  snapshot read has its key), then kept current by a follower of those partitions; a
  key's tombstone drops the key and the session from memory (``Shard.erase``), on
  standbys too;
- a new session's key (``ensure_key``): made, wrapped under the newest master key,
  written to ``keys`` and acknowledged before the session's first event is written, so
  any reader that has read the ``keys`` partition past that offset and lacks the key
  knows it was erased;
- erasure (``erase``): on delete and expiry, after the event: the key's tombstone, then
  the session's snapshot tombstone; the idempotency records of the session are dropped.
  Tombstones the queue refused are retried every second;
- the ``#roll`` record: compaction never touches a partition's active segment, and
  Kafka rolls it only on an append; the owner of a shard appends a small ``#roll``
  record to its ``keys`` partition once a tombstone read there (live or at load, so
  also after a restart) is older than the compaction lag with no ``#roll`` after it, so
  the bound holds on an idle partition too.

With encryption off (``master`` None) records are plaintext and erasure is the delete
event alone (README "Encryption and erasure").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import TopicPartition

from stickystate import crypto
from stickystate.node.roles import ShardRoles
from stickystate.node.shard import Shard
from stickystate.node.tasks import cancel_and_wait
from stickystate.replicator.errors import ReplicationError
from stickystate.replicator.follower import Follower
from stickystate.replicator.keys import ROLL_KEY, Codec, KeyErased, KeyNotRead, KeyRing, Tampered, key_record_key
from stickystate.replicator.producer import Replicator
from stickystate.replicator.scan import SharedConsumer, scan
from stickystate.replicator.settings import ReplicatorSettings
from stickystate.replicator.snapshots import session_key

log = logging.getLogger("stickystate.node")

__all__ = ["Erasure", "KeyErased", "KeyNotRead", "Tampered"]


class Erasure:
    def __init__(self, settings: ReplicatorSettings, master: crypto.MasterKeys | None, replicator: Replicator,
                 roles: ShardRoles, me: str) -> None:
        self.settings = settings
        self.replicator = replicator
        self.roles = roles
        self.me = me
        self.ring = (KeyRing(master, on_erased=self._on_erased, roll_lag_ms=settings.keys_compaction_lag_ms)
                     if master is not None else None)
        self.codec = Codec(self.ring)
        self.follower = Follower(settings, f"stickystate-{me}-keys", self._on_key_records, topic=settings.keys_topic)
        self._reader = SharedConsumer(settings, f"stickystate-{me}-keys-load")
        self._pending: dict[tuple[int, str], asyncio.Future[None]] = {}  # keys being written
        self._retry: list[tuple[int, bytes, str]] = []  # (shard, key, topic) tombstones the queue refused
        self._task: asyncio.Task[None] | None = None
        self.keys_written_total = 0
        self.rolls_total = 0
        self.erased_total = 0
        self.skipped_erased_total = 0  # records read whose key is gone
        self.refused_total = 0  # records that failed authentication

    @property
    def encrypting(self) -> bool:
        return self.ring is not None

    async def start(self) -> None:
        if self.ring is None:
            return
        await self.follower.start()
        async with self._reader.use():
            pass  # started now, not by the first shard load (a consumer's start costs a metadata round)
        self._task = asyncio.create_task(self._loop(), name="erasure")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        if self.ring is not None:
            await self.follower.stop()
            await self._reader.stop()

    # -- shards held ---------------------------------------------------------------------
    async def load(self, s: int) -> None:
        """Read shard ``s``'s ``keys`` partition to its end into the ring, then follow it."""
        if self.ring is None:
            return
        async with self._reader.use() as consumer:
            tp = TopicPartition(self.settings.keys_topic, s)
            end = (await consumer.end_offsets([tp]))[tp]
            records = [rec async for rec in scan(consumer, tp, end)] if end else []
        self.ring.drop_shard(s)
        self.ring.apply(s, records)
        self.ring.shard(s).position = end
        self.follower.follow(s, end)

    def drop(self, s: int) -> None:
        if self.ring is not None:
            self.follower.unfollow(s)
            self.ring.drop_shard(s)

    def _on_key_records(self, s: int, records: Sequence[Any]) -> None:
        assert self.ring is not None
        if s in self.ring.shards:
            self.ring.apply(s, records)

    def _on_erased(self, s: int, sid: str) -> None:
        """A key's tombstone was read: its session leaves this node's memory."""
        shard = self.roles.shards.get(s)
        if shard is not None:
            shard.erase(sid)

    async def open_snapshots(self, s: int, raw: dict[str, bytes]) -> dict[str, dict[str, Any]]:
        """Decode loaded snapshots; those whose key is erased are dropped, forged ones refused.

        The keys partition is read alongside the snapshots (node/bootstrap.py): a snapshot
        of a session created meanwhile names a key further than was read, and the keys are
        read again once (a session's key is in ``keys`` before its first event, so before
        any snapshot of it)."""
        out: dict[str, dict[str, Any]] = {}
        for attempt in (1, 2):
            unread = False
            for sid, value in raw.items():
                if sid in out:
                    continue
                try:
                    out[sid] = self.codec.decode_snapshot(s, sid, value)
                except KeyErased:
                    self.skipped_erased_total += 1
                except KeyNotRead as exc:
                    if attempt == 1:
                        unread = True
                        continue
                    self._refuse_snapshot(s, sid, exc)
                except (Tampered, ValueError) as exc:
                    self._refuse_snapshot(s, sid, exc)
            if not unread:
                break
            await self.load(s)
        return out

    def _refuse_snapshot(self, s: int, sid: str, exc: Exception) -> None:
        self.refused_total += 1
        log.error("snapshot refused", extra={"shard": s, "sid": sid, "error": str(exc)})

    # -- the owner ---------------------------------------------------------------------
    async def ensure_key(self, s: int, sid: str) -> None:
        """A data key for ``sid`` (about to be created), written to ``keys`` and acknowledged."""
        ring = self.ring
        if ring is None or ring.current(s, sid) is not None:
            return
        pending = self._pending.get((s, sid))
        if pending is None:
            pending = self._pending[(s, sid)] = asyncio.get_running_loop().create_future()
            try:
                gen, key = crypto.new_generation(), crypto.new_data_key()
                fut = self.replicator.enqueue(s, key_record_key(sid, gen), crypto.wrap(ring.master, key, sid, gen),
                                              topic=self.settings.keys_topic)
                self.replicator.hurry()
                koff = await asyncio.wait_for(asyncio.shield(fut), self.settings.kafka_deadline_s)
                ring.add(s, sid, gen, koff, key)
                self.keys_written_total += 1
                pending.set_result(None)
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved here; waiters re-raise it
                raise
            finally:
                del self._pending[(s, sid)]
        else:
            await asyncio.shield(pending)

    def erase(self, shard: Shard, sid: str) -> None:
        """``sid`` was deleted or expired on this owner (its event is queued): tombstone its
        key, then its snapshot; drop its idempotency records."""
        shard.erase(sid)
        if self.ring is None:
            return
        epoch = shard.my_epoch
        tombstones = [(shard.id, key_record_key(sid, gen), self.settings.keys_topic)
                      for gen in self.ring.erase(shard.id, sid)]
        if epoch is not None:
            tombstones.append((shard.id, session_key(sid, epoch), self.settings.snapshots_topic))
        self.erased_total += 1
        self._send(tombstones)

    def _send(self, tombstones: list[tuple[int, bytes, str]]) -> None:
        for i, (s, key, topic) in enumerate(tombstones):
            try:
                self.replicator.enqueue(s, key, None, topic=topic)
            except ReplicationError:
                self._retry.extend(tombstones[i:])
                return

    def _roll_due(self) -> None:
        """Owned shards whose newest tombstone not rolled out yet is older than the lag: append
        one ``#roll`` for it (Kafka then rolls the segment holding it; read back, the roll
        clears the mark if it covered it). The newest, not the oldest: a roll sent the lag after
        an older tombstone leaves a younger one that began a new segment in it (the erasure
        test saw that key never compacted)."""
        if self.ring is None:
            return
        # a margin: Kafka rolls only if the roll is strictly more than the lag younger
        due_ms = time.time() * 1000 - self.settings.keys_compaction_lag_ms - 10
        for s in sorted(self.roles.serving):
            keys = self.ring.shards.get(s)
            mark = None if keys is None else keys.unrolled_since_ms
            if keys is None or mark is None or mark > due_ms or keys.roll_sent_for_ms == mark:
                continue
            try:
                self.replicator.enqueue(s, ROLL_KEY, b"", topic=self.settings.keys_topic)
            except ReplicationError:
                return
            keys.roll_sent_for_ms = mark
            self.rolls_total += 1

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._retry:
                retry, self._retry = self._retry, []
                self._send(retry)
            self._roll_due()

    def status(self) -> dict[str, Any]:
        return {"encryption": self.encrypting, "keys_cached": self.ring.count() if self.ring is not None else 0,
                "keys_refused": self.ring.refused_total if self.ring is not None else 0,
                "keys_written": self.keys_written_total, "erased": self.erased_total,
                "records_skipped_erased": self.skipped_erased_total, "records_refused": self.refused_total}
