"""Follows partitions of the ``changes`` topic with one consumer per node process.

The node decides which shards to follow (standby ones, to keep their state warm;
recovering ones, from their checkpoint; owned ones only while a claim is read back or
a hole in the owner's acknowledgements is settled, see node/shard.py) and
receives records through ``on_records(shard, records)``, called synchronously from the
follower task in log order. Assignment changes are applied by the follower task itself
between fetches, so the consumer is only ever touched from one task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from stickystate.replicator.settings import ReplicatorSettings

log = logging.getLogger("stickystate.replicator")

OnRecords = Callable[[int, Sequence[Any]], None]


class Follower:
    def __init__(self, settings: ReplicatorSettings, client_id: str, on_records: OnRecords,
                 topic: str | None = None) -> None:
        self.settings = settings
        self.topic = topic or settings.changes_topic  # another topic partitioned by shard: keys (node/erasure.py)
        self.client_id = client_id
        self.on_records = on_records
        self._wanted: dict[int, int | None] = {}  # shard -> offset to seek to (None: keep position)
        self._dirty = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._positions: dict[int, int] = {}
        self._progress = asyncio.Condition()
        self.records_total = 0

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            client_id=self.client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
            fetch_min_bytes=self.settings.fetch_min_bytes,
            request_timeout_ms=self.settings.request_timeout_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"follower-{self.client_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._consumer is not None:
            try:
                await asyncio.wait_for(self._consumer.stop(), 5)
            except Exception as exc:
                log.debug("consumer stop failed", extra={"error": repr(exc)})
            self._consumer = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def follow(self, shard: int, from_offset: int | None) -> None:
        """Follow a shard from ``from_offset`` (0 = the start), or keep its position if None."""
        if from_offset is not None or shard not in self._wanted:
            self._wanted[shard] = from_offset if from_offset is not None else 0
            self._positions[shard] = from_offset or 0
        self._dirty.set()

    def unfollow(self, shard: int) -> None:
        if self._wanted.pop(shard, -1) != -1:
            self._positions.pop(shard, None)
            self._dirty.set()

    def following(self) -> set[int]:
        return set(self._wanted)

    def position(self, shard: int) -> int | None:
        return self._positions.get(shard)

    async def end_offsets(self, shards: Sequence[int]) -> dict[int, int]:
        assert self._consumer is not None
        tps = [TopicPartition(self.topic, s) for s in shards]
        ends = await self._consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in ends.items()}

    async def wait_position(self, shard: int, offset: int, timeout_s: float) -> None:
        """Wait until every record of ``shard`` before ``offset`` has been delivered."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for returns instead of raising when the
        # condition comes true in the same step as a cancel, and a takeover called off while
        # catching up here went on (node/ownership.py, tests/test_acquire_called_off.py)
        async with self._progress, asyncio.timeout(timeout_s):
            await self._progress.wait_for(
                lambda: self._positions.get(shard, -1) >= offset or shard not in self._wanted or not self.alive)
        if not self.alive:
            raise RuntimeError("follower stopped")
        if shard not in self._wanted:
            raise LookupError(f"shard {shard} is no longer followed")

    def _apply_assignment(self) -> None:
        assert self._consumer is not None
        self._dirty.clear()
        topic = self.topic
        self._consumer.assign([TopicPartition(topic, s) for s in sorted(self._wanted)])
        for shard, offset in list(self._wanted.items()):
            # After assign() positions are reset; put every partition where we were.
            target = offset if offset is not None else self._positions.get(shard, 0)
            self._consumer.seek(TopicPartition(topic, shard), target)
            self._wanted[shard] = None

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while True:
            if self._dirty.is_set():
                self._apply_assignment()
            if not self._wanted:
                await self._dirty.wait()
                continue
            try:
                batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            except KafkaError as exc:
                log.warning("fetch failed", extra={"error": repr(exc)})
                await asyncio.sleep(0.2)
                continue
            if self._dirty.is_set():
                # Assignment changed while fetching: records of a dropped or re-seeked
                # shard must not be delivered; positions of the others are kept.
                batches = {tp: recs for tp, recs in batches.items()
                           if tp.partition in self._wanted and self._wanted[tp.partition] is None}
            for tp, records in batches.items():
                shard = tp.partition
                if shard not in self._wanted or not records:
                    continue
                # Position first: on_records may re-seek the shard (follow(shard, 0)).
                self._positions[shard] = records[-1].offset + 1
                self.records_total += len(records)
                self.on_records(shard, records)
            # The consumer's fetch position can be past the last record delivered (e.g. the
            # first offsets were removed by retention): take it for shards not being re-seeked.
            for shard, seek in self._wanted.items():
                if seek is None:
                    pos = _fetch_position(consumer, TopicPartition(self.topic, shard))
                    if pos is not None and pos > self._positions.get(shard, 0):
                        self._positions[shard] = pos
            async with self._progress:
                self._progress.notify_all()


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
