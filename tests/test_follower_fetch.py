"""The follower's two readers against a real broker (replicator/follower.py): standby
shards are read lazily (a fetch waits for fetch_min_bytes or fetch_max_wait_ms), and a
shard whose position someone waits for (a takeover reading its claim back, a hole being
settled) is read by the eager reader meanwhile, on its own connection: the wait never sits
behind a parked lazy fetch. Records are delivered once and in order across the moves."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from stickystate.replicator.follower import Follower
from stickystate.replicator.producer import Replicator
from stickystate.replicator.settings import ReplicatorSettings
from stickystate.replicator.topics import ensure_topics

pytestmark = pytest.mark.kafka

LAZY_WAIT_MS = 30_000  # a lazy fetch parks at the broker longer than any wait below may take


async def test_a_wait_for_a_position_is_read_eagerly_and_records_stay_in_order(kafka_bootstrap: str) -> None:
    settings = ReplicatorSettings(kafka_bootstrap=kafka_bootstrap, changes_topic=f"fol-{uuid.uuid4().hex[:10]}",
                                  partitions=2, linger_ms=0, fetch_max_wait_ms=LAZY_WAIT_MS,
                                  fetch_min_bytes=64 * 1024 * 1024)
    await ensure_topics(settings)
    got: dict[int, list[bytes]] = {0: [], 1: []}
    follower = Follower(settings, "test-fol", lambda shard, records: got[shard].extend(r.value for r in records))
    rep = Replicator(settings, client_id="test-fol-rep")
    await follower.start()
    await rep.start()
    sent: dict[int, list[bytes]] = {0: [], 1: []}
    try:
        follower.follow(0, 0)
        follower.follow(1, 0)
        for n in range(5):
            for shard in (0, 1):
                value = f"{shard}-{n}".encode()
                offset = await rep.send_and_wait(shard, b"k", value)
                sent[shard].append(value)
            # the lazy reader's fetch is parked for 30 s; the wait moves shard 1 to the eager reader
            await follower.wait_position(1, offset + 1, timeout_s=10)
            assert got[1] == sent[1]
            # end offsets are answered on the eager reader's connection, not behind the parked fetch
            assert (await asyncio.wait_for(follower.end_offsets([0, 1]), 10)) == {0: n + 1, 1: n + 1}
        assert follower.eager_moves_total == 5
        await follower.wait_position(0, len(sent[0]), timeout_s=10)
    finally:
        await rep.stop()
        await follower.stop()
    assert got == sent  # each record once, in order, whichever reader read it


async def test_a_standby_whose_records_were_removed_reads_on_from_the_earliest_left(kafka_bootstrap: str) -> None:
    """Retention (here: delete-records) removed the records a lazy fetch asks for: the broker
    answers offset out of range, and the reader goes on from the earliest offset left, once
    and in order, as aiokafka's consumer did with auto_offset_reset=earliest."""
    settings = ReplicatorSettings(kafka_bootstrap=kafka_bootstrap, changes_topic=f"fol-{uuid.uuid4().hex[:10]}",
                                  partitions=1, linger_ms=0, fetch_max_wait_ms=50, fetch_min_bytes=1)
    await ensure_topics(settings)
    rep = Replicator(settings, client_id="test-fol-rep")
    await rep.start()
    got: list[tuple[int, bytes]] = []
    reached: dict[int, asyncio.Event] = {9: asyncio.Event(), 10: asyncio.Event()}

    def on_records(shard: int, records: Sequence[Any]) -> None:
        got.extend((r.offset, r.value) for r in records)
        for offset, event in reached.items():
            if got[-1][0] >= offset:
                event.set()

    follower = Follower(settings, "test-fol", on_records)
    await follower.start()
    try:
        for n in range(10):
            await rep.send_and_wait(0, b"k", f"v{n}".encode())
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_records({TopicPartition(settings.changes_topic, 0): RecordsToDelete(6)})
        finally:
            await admin.close()
        follower.follow(0, 0)  # offset 0 is gone: out of range
        await asyncio.wait_for(reached[9].wait(), 10)  # no wait_position: it would read eagerly
        await rep.send_and_wait(0, b"k", b"v10")
        await asyncio.wait_for(reached[10].wait(), 10)
    finally:
        await rep.stop()
        await follower.stop()
    assert follower.eager_moves_total == 0  # all of it read by the lazy reader
    assert got == [(n, f"v{n}".encode()) for n in range(6, 11)]
