"""Reading whole partitions up to an end offset, with one lazily started consumer per
reader, shared under a lock (the history and snapshot readers of a node). Between uses
the consumer has no partition assigned, so it fetches nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from stickystate.replicator.settings import ReplicatorSettings


class SharedConsumer:
    def __init__(self, settings: ReplicatorSettings, client_id: str, **options: Any) -> None:
        self.settings = settings
        self.client_id = client_id
        self.options = options
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def use(self) -> AsyncIterator[AIOKafkaConsumer]:
        """The consumer, for this caller alone until the block ends."""
        async with self._lock:
            if self._consumer is None:
                consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                            client_id=self.client_id, group_id=None, enable_auto_commit=False,
                                            auto_offset_reset="earliest", **self.options)
                # Kept only once started: a start cut short (the caller cancelled, e.g. a
                # bootstrap given up on, or Kafka not answering) used to leave a consumer that
                # was never started for every later caller ("'NoneType' object has no attribute
                # 'end_offsets'"), so every shard acquisition of the node failed from then on.
                try:
                    await consumer.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                    raise
                self._consumer = consumer
            try:
                yield self._consumer
            finally:
                # No partition stays assigned between uses: aiokafka fetches an assigned
                # partition in the background whether anyone reads or not, and at the end of a
                # partition with this reader's 10 ms wait that was ~100 empty fetches a second
                # per node, for as long as the process ran.
                if self._consumer is not None and self._consumer.assignment():
                    self._consumer.unsubscribe()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


async def scan(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int,
               max_records: int = 5000) -> AsyncIterator[Any]:
    """Every record of ``tp`` from its first retained offset up to ``end`` (exclusive),
    in order. Assigns the consumer to ``tp`` alone."""
    consumer.assign([tp])
    position = (await consumer.beginning_offsets([tp]))[tp]
    if position >= end:
        return
    consumer.seek(tp, position)  # explicit offset: seek_to_beginning races with assign
    while position < end:
        batch = await consumer.getmany(tp, timeout_ms=500, max_records=max_records)
        recs = batch.get(tp, [])
        for rec in recs:
            if rec.offset >= end:
                return
            position = rec.offset + 1
            yield rec
        if not recs:
            # compaction or retention can leave gaps up to the end: trust the fetch position
            position = max(position, await consumer.position(tp))
