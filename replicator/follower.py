"""Follows partitions of the ``changes`` topic for a node process.

The node decides which shards to follow (standby ones, to keep their state warm;
recovering ones, from their checkpoint; owned ones only while a claim is read back or
a hole in the owner's acknowledgements is settled, see node/shard.py) and
receives records through ``on_records(shard, records)``, called synchronously in log
order. Assignment changes are applied by each reader's task itself between fetches, so a
consumer is only ever touched from one task.

Two readers, each with its own connection to the broker:

- the **lazy** one reads the standby shards: a fetch waits at the broker for
  ``fetch_min_bytes`` or ``fetch_max_wait_ms`` (defaults 256 KiB, 200 ms), so a standby
  costs the broker and itself a few fetches a second instead of one per produce round (at
  20 ms / 16 KiB, the fetches were a quarter of a replicating node's and the broker's CPU
  per turn). It sends its own Fetch requests (replicator/wire.py) through an aiokafka
  client and parses the records with aiokafka's C reader: aiokafka's consumer decoded every
  answer (all of the reader's partitions) through its generic schema and wrapped every record
  once more, which was about half of what following cost a standby (docs/BENCHMARKS.md);
- the **eager** one (an aiokafka consumer; 1 byte, ``EAGER_WAIT_MS``) reads a shard while someone waits for its
  position (``wait_position``: a takeover catching up and reading its claim back, a ``log``
  write settling a hole) and answers ``end_offsets``. It has a connection of its own because
  the broker answers one request per connection at a time: a request behind a parked lazy
  fetch would wait for it.

A shard moves between readers at its delivered position; a reader whose assignment changed
while it fetched drops that fetch's records (they are fetched again), so a record is
delivered once, in order. The lazy reader drops only those of the shards that moved or were
sought elsewhere (a standby re-reads a record whose data key it has not read yet,
node/ownership.py): while many sessions are created, dropping the whole answer had it fetch
the same megabytes many times over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.record.memory_records import MemoryRecords

from stickystate.replicator.settings import ReplicatorSettings
from stickystate.replicator.wire import FetchedPartition, FetchRequest

log = logging.getLogger("stickystate.replicator")

OnRecords = Callable[[int, Sequence[Any]], None]
EAGER_WAIT_MS = 10
POLL_MS = 100  # a reader's getmany wait: its task wakes at least this often
RETRY_S = 0.2  # after a failed fetch, or while a partition has no known leader
PARTITION_MAX_BYTES = 1024 * 1024  # per partition and fetch (a larger first batch still comes whole)
FETCH_MAX_BYTES = 8 * 1024 * 1024  # per fetch answer
DELIVER_CHUNK = 2000  # records handed to on_records at a time; the loop runs between chunks
OFFSET_OUT_OF_RANGE = kafka_errors.OffsetOutOfRangeError.errno


class _ReaderBase:
    """What both readers share: the shards they read (decided by the follower), the flag that
    the assignment changed, and the task that reads; a reader opens and closes its connection."""

    def __init__(self, follower: Follower, name: str) -> None:
        self.follower = follower
        self.name = name
        self.task: asyncio.Task[None] | None = None
        self.dirty = asyncio.Event()
        self.shards: set[int] = set()

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        raise NotImplementedError

    def _apply_assignment(self) -> None:
        raise NotImplementedError

    def _take_assignment(self) -> dict[int, int]:
        """The shards this reader now reads, each with the offset to read it from (where it
        was sought to, else its delivered position)."""
        f = self.follower
        self.dirty.clear()
        self.shards = {s for s in f._wanted if f._reader_of(s) is self}
        starts = {}
        for shard in self.shards:
            seek = f._wanted[shard]
            starts[shard] = seek if seek is not None else f._positions.get(shard, 0)
            f._wanted[shard] = None
        return starts

    async def _assigned(self) -> None:
        """Apply a changed assignment; wait while there is nothing to read."""
        while True:
            if self.dirty.is_set():
                self._apply_assignment()
            if self.shards:
                return
            await self.dirty.wait()

    async def start(self) -> None:
        await self._open()
        self.task = asyncio.create_task(self._run(), name=f"follower-{self.follower.client_id}-{self.name}")
        self.task.add_done_callback(self.follower._on_reader_done)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        try:
            await asyncio.wait_for(self._close(), 5)
        except Exception as exc:  # a broken connection may fail to close; it is dropped either way
            log.debug("Kafka reader close failed", extra={"error": repr(exc), "reader": self.name})


class _Reader(_ReaderBase):
    """The eager reader: an aiokafka consumer."""

    def __init__(self, follower: Follower, name: str) -> None:
        super().__init__(follower, name)
        self.consumer: AIOKafkaConsumer | None = None

    async def _open(self) -> None:
        s = self.follower.settings
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            client_id=f"{self.follower.client_id}-{self.name}",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=min(EAGER_WAIT_MS, s.fetch_max_wait_ms),
            fetch_min_bytes=1,
            request_timeout_ms=s.request_timeout_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await self.consumer.start()

    async def _close(self) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await consumer.stop()

    def _apply_assignment(self) -> None:
        assert self.consumer is not None
        topic = self.follower.topic
        starts = self._take_assignment()
        self.consumer.assign([TopicPartition(topic, s) for s in sorted(starts)])
        for shard, start in starts.items():
            # After assign() positions are reset; put every partition where it is to be read from.
            self.consumer.seek(TopicPartition(topic, shard), start)

    async def _run(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        f = self.follower
        while True:
            await self._assigned()
            try:
                batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=2000)
            except KafkaError as exc:
                log.warning("fetch failed", extra={"error": repr(exc), "reader": self.name})
                await asyncio.sleep(0.2)
                continue
            if self.dirty.is_set():
                continue  # the assignment changed while fetching: these records are read again after it
            for tp, records in batches.items():
                shard = tp.partition
                if shard not in self.shards or not records or self.dirty.is_set():
                    continue
                # Position first: on_records may re-seek the shard (follow(shard, 0)).
                f._positions[shard] = records[-1].offset + 1
                f.records_total += len(records)
                f.on_records(shard, records)
            if not self.dirty.is_set():
                # The consumer's fetch position can be past the last record delivered (e.g. the
                # first offsets were removed by retention).
                for shard in self.shards:
                    pos = _fetch_position(consumer, TopicPartition(f.topic, shard))
                    if pos is not None and pos > f._positions.get(shard, 0):
                        f._positions[shard] = pos
            async with f._progress:
                f._progress.notify_all()


class _WireReader(_ReaderBase):
    """The lazy reader: its own Fetch requests (replicator/wire.py) through an aiokafka
    client, one per partition leader and round."""

    def __init__(self, follower: Follower, name: str) -> None:
        super().__init__(follower, name)
        self.client: AIOKafkaClient | None = None
        self._fetch_at: dict[int, int] = {}  # shard -> next offset to fetch

    async def _open(self) -> None:
        s = self.follower.settings
        client = AIOKafkaClient(bootstrap_servers=s.kafka_bootstrap,
                                client_id=f"{self.follower.client_id}-{self.name}",
                                request_timeout_ms=s.request_timeout_ms + s.fetch_max_wait_ms)
        try:
            await client.bootstrap()
            await client.add_topic(self.follower.topic)  # its partitions' leaders
        except BaseException:
            await client.close()
            raise
        self.client = client

    async def _close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.close()

    def _apply_assignment(self) -> None:
        self._fetch_at = self._take_assignment()

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the assignment changes."""
        try:
            await asyncio.wait_for(self.dirty.wait(), seconds)
        except TimeoutError:
            pass

    async def _run(self) -> None:
        assert self.client is not None
        client = self.client
        f = self.follower
        s = f.settings
        while True:
            await self._assigned()
            by_leader: dict[int, list[tuple[int, int]]] = {}
            leaderless = False
            for shard in sorted(self.shards):
                node = client.cluster.leader_for_partition(TopicPartition(f.topic, shard))
                if node is None or node < 0:
                    leaderless = True
                    continue
                by_leader.setdefault(node, []).append((shard, self._fetch_at[shard]))
            if leaderless:
                client.force_metadata_update()
            if not by_leader:
                await self._pause(RETRY_S)
                continue
            answers = await asyncio.gather(*(
                client.send(node, FetchRequest(f.topic, parts, s.fetch_max_wait_ms, s.fetch_min_bytes,
                                               FETCH_MAX_BYTES, PARTITION_MAX_BYTES))
                for node, parts in by_leader.items()), return_exceptions=True)
            fetched_at = {shard: offset for parts in by_leader.values() for shard, offset in parts}
            failed = False
            for answer in answers:
                if isinstance(answer, BaseException):
                    if isinstance(answer, asyncio.CancelledError):
                        raise answer
                    if not isinstance(answer, (KafkaError, OSError, TimeoutError)):
                        raise answer
                    log.warning("fetch failed", extra={"error": repr(answer), "reader": self.name})
                    client.force_metadata_update()
                    failed = True
                    continue
                for part in answer.partitions:
                    if part.topic == f.topic:
                        await self._take(part, fetched_at.get(part.partition))
            if self.dirty.is_set():
                self._apply_assignment()
            for shard in self.shards:
                # past the last record delivered when records were skipped (control batches)
                if self._fetch_at[shard] > f._positions.get(shard, 0):
                    f._positions[shard] = self._fetch_at[shard]
            async with f._progress:
                f._progress.notify_all()
            if failed or leaderless:
                await self._pause(RETRY_S)

    def _still(self, shard: int, offset: int) -> bool:
        """Is ``shard`` still read here from ``offset``? (The assignment may have changed
        meanwhile: a shard moved to the eager reader, or re-sought, is not; the others are.)"""
        if self.dirty.is_set():
            self._apply_assignment()
        return self._fetch_at.get(shard) == offset

    async def _take(self, part: FetchedPartition, fetched_at: int | None) -> None:
        """One partition of a fetch answer (fetched from ``fetched_at``): its records from
        there on, delivered, unless the shard was moved or sought elsewhere since."""
        f = self.follower
        shard = part.partition
        if fetched_at is None or not self._still(shard, fetched_at):
            return
        if part.error_code == OFFSET_OUT_OF_RANGE:
            await self._reset(shard, fetched_at)
            return
        if part.error_code:
            kind = kafka_errors.for_code(part.error_code)
            if getattr(kind, "invalid_metadata", False) or kind.retriable:
                assert self.client is not None
                self.client.force_metadata_update()
            log.warning("fetch answered with an error", extra={"error": kind.__name__, "reader": self.name,
                                                                "topic": f.topic, "partition": shard})
            return
        if part.records is None:
            return
        out: list[Any] = []
        batches = MemoryRecords(part.records)
        next_at = at = fetched_at
        while batches.has_next():
            batch = batches.next_batch()
            if batch is None:
                break  # cut short at the answer's size limit: fetched again from there
            if not batch.is_control_batch:
                out.extend(rec for rec in batch if rec.offset >= fetched_at)
            next_at = max(next_at, batch.next_offset)
        for i in range(0, len(out), DELIVER_CHUNK):
            if i:
                await asyncio.sleep(0)  # the loop runs between large chunks (a catch-up)
                if not self._still(shard, at):
                    return
            chunk = out[i:i + DELIVER_CHUNK]
            # Positions first: on_records may re-seek the shard (follow(shard, offset)).
            at = f._positions[shard] = self._fetch_at[shard] = chunk[-1].offset + 1
            f.records_total += len(chunk)
            f.on_records(shard, chunk)
            if not self._still(shard, at):
                return
        self._fetch_at[shard] = next_at

    async def _reset(self, shard: int, fetched_at: int) -> None:
        """The fetch offset is outside the log (retention removed what it named): go on from
        the earliest offset, as the consumer's ``auto_offset_reset="earliest"`` did."""
        consumer = self.follower._eager.consumer
        assert consumer is not None
        tp = TopicPartition(self.follower.topic, shard)
        try:
            earliest = (await consumer.beginning_offsets([tp]))[tp]
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("earliest offset not known", extra={"error": repr(exc), "reader": self.name})
            return
        if self._still(shard, fetched_at):
            log.info("fetch offset out of range, reading from the earliest",
                     extra={"topic": self.follower.topic, "partition": shard, "offset": fetched_at,
                            "earliest": earliest})
            self._fetch_at[shard] = earliest


class Follower:
    def __init__(self, settings: ReplicatorSettings, client_id: str, on_records: OnRecords,
                 topic: str | None = None) -> None:
        self.settings = settings
        self.topic = topic or settings.changes_topic  # another topic partitioned by shard: keys (node/erasure.py)
        self.client_id = client_id
        self.on_records = on_records
        self._wanted: dict[int, int | None] = {}  # shard -> offset to seek to (None: keep position)
        self._urgent: dict[int, int] = {}  # shard -> wait_position calls waiting for it (the eager reader's)
        self._lazy = _WireReader(self, "lazy")
        self._eager = _Reader(self, "eager")
        self._positions: dict[int, int] = {}
        self._progress = asyncio.Condition()
        self._started = False
        self._hurries: set[asyncio.Task[None]] = set()
        self.records_total = 0
        self.eager_moves_total = 0  # shards moved to the eager reader for a wait

    async def start(self) -> None:
        await self._eager.start()
        await self._lazy.start()
        self._started = True
        self._changed()

    async def stop(self) -> None:
        self._started = False
        for task in list(self._hurries):
            task.cancel()
        await asyncio.gather(*self._hurries, return_exceptions=True)
        await self._lazy.stop()
        await self._eager.stop()

    @property
    def alive(self) -> bool:
        return all(r.task is not None and not r.task.done() for r in (self._lazy, self._eager))

    def _on_reader_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("follower reader died", exc_info=task.exception())
        asyncio.get_running_loop().create_task(self._notify())  # waiters see the follower dead

    async def _notify(self) -> None:
        async with self._progress:
            self._progress.notify_all()

    def _reader_of(self, shard: int) -> _ReaderBase:
        return self._eager if shard in self._urgent else self._lazy

    def _changed(self, shard: int | None = None) -> None:
        """The assignment changed (of ``shard``, else of any): the readers concerned re-apply theirs."""
        for reader in (self._lazy, self._eager):
            if shard is None or shard in reader.shards or reader is self._reader_of(shard):
                reader.dirty.set()

    def follow(self, shard: int, from_offset: int | None) -> None:
        """Follow a shard from ``from_offset`` (0 = the start), or keep its position if None."""
        if from_offset is not None or shard not in self._wanted:
            self._wanted[shard] = from_offset if from_offset is not None else 0
            self._positions[shard] = from_offset or 0
        self._changed(shard)

    def unfollow(self, shard: int) -> None:
        if self._wanted.pop(shard, -1) != -1:
            self._positions.pop(shard, None)
            self._changed(shard)

    def following(self) -> set[int]:
        return set(self._wanted)

    def position(self, shard: int) -> int | None:
        return self._positions.get(shard)

    async def end_offsets(self, shards: Sequence[int]) -> dict[int, int]:
        consumer = self._eager.consumer  # its connection is never parked behind a lazy fetch
        assert consumer is not None
        tps = [TopicPartition(self.topic, s) for s in shards]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in ends.items()}

    async def wait_position(self, shard: int, offset: int, timeout_s: float) -> None:
        """Wait until every record of ``shard`` before ``offset`` has been delivered (read by
        the eager reader meanwhile)."""
        def reached() -> bool:
            return self._positions.get(shard, -1) >= offset or shard not in self._wanted or not self.alive

        if not reached():
            self._urgent[shard] = self._urgent.get(shard, 0) + 1
            if self._urgent[shard] == 1:
                self.eager_moves_total += 1
                self._move(shard)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for returns instead of raising when the
                # condition comes true in the same step as a cancel, and a takeover called off while
                # catching up here went on (node/ownership.py, tests/test_acquire_called_off.py)
                async with self._progress, asyncio.timeout(timeout_s):
                    await self._progress.wait_for(reached)
            finally:
                self._urgent[shard] -= 1
                if not self._urgent[shard]:
                    del self._urgent[shard]
                    self._move(shard)
        if not self.alive:
            raise RuntimeError("follower stopped")
        if shard not in self._wanted:
            raise LookupError(f"shard {shard} is no longer followed")

    def hurry(self, shard: int, offset: int, timeout_s: float) -> None:
        """Read ``shard`` eagerly until ``offset`` (or ``timeout_s``), without waiting here: a
        reader of another topic needs this one's records first (a change whose data key the
        keys follower has not read yet, node/ownership.py)."""
        if self._positions.get(shard, -1) >= offset or shard not in self._wanted or not self.alive:
            return

        async def wait() -> None:
            try:
                await self.wait_position(shard, offset, timeout_s)
            except (TimeoutError, LookupError, RuntimeError):
                pass  # the caller reads again and decides (e.g. refuses a key that never comes)

        task = asyncio.get_running_loop().create_task(wait())
        self._hurries.add(task)
        task.add_done_callback(self._hurries.discard)

    def _move(self, shard: int) -> None:
        """``shard`` changed readers: both re-apply their assignment (at its delivered position)."""
        if shard in self._wanted:
            self._lazy.dirty.set()
            self._eager.dirty.set()


def _fetch_position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's next fetch offset without awaiting (aiokafka keeps it in its
    subscription state; ``consumer.position()`` would block on a reset)."""
    try:
        state = consumer._subscription.subscription.assignment.state_value(tp)  # noqa: SLF001
    except AttributeError:
        return None
    if state is None or not state.has_valid_position:
        return None
    return int(state.position)
