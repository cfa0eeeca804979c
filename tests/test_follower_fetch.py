"""The follower's two readers against a real broker (replicator/follower.py): standby
shards are read lazily (a fetch waits for fetch_min_bytes or fetch_max_wait_ms), and a
shard whose position someone waits for (a takeover reading its claim back, a hole being
settled) is read by the eager reader meanwhile, on its own connection: the wait never sits
behind a parked lazy fetch. Records are delivered once and in order across the moves."""

from __future__ import annotations

import asyncio
import uuid

import pytest

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
