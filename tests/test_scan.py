"""replicator/scan.py against a real broker: a shared reader scans whole partitions, and
between uses its consumer has no partition assigned (aiokafka fetches an assigned
partition in the background whether anyone reads it or not)."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import TopicPartition

from stickystate.replicator.producer import Replicator
from stickystate.replicator.scan import SharedConsumer, scan
from stickystate.replicator.settings import ReplicatorSettings
from stickystate.replicator.topics import ensure_topics

pytestmark = pytest.mark.kafka


async def test_a_shared_reader_scans_partitions_and_keeps_none_assigned_between_uses(kafka_bootstrap: str) -> None:
    s = ReplicatorSettings(kafka_bootstrap=kafka_bootstrap, changes_topic=f"scan-{uuid.uuid4().hex[:10]}",
                           partitions=2)
    await ensure_topics(s)
    rep = Replicator(s, client_id="test-scan")
    await rep.start()
    try:
        for i in range(5):
            rep.enqueue(i % 2, b"k%d" % i, b"v%d" % i)
        await rep.flush(timeout_s=20)
    finally:
        await rep.stop()
    reader = SharedConsumer(s, "test-scan-reader", fetch_max_wait_ms=10)
    try:
        for partition, wanted in ((0, [b"v0", b"v2", b"v4"]), (1, [b"v1", b"v3"])):
            async with reader.use() as consumer:
                tp = TopicPartition(s.changes_topic, partition)
                end = (await consumer.end_offsets([tp]))[tp]
                got = [rec.value async for rec in scan(consumer, tp, end)]
                assert consumer.assignment() == {tp}  # assigned while in use
            assert got == wanted
            assert consumer.assignment() == set()  # nothing fetched in the background after the use
    finally:
        await reader.stop()
