"""The Replicator against a real broker: record batches per partition, each record's own
offset, order, tombstones, and a producer rebuild that re-sends what was not acknowledged."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from aiokafka.errors import KafkaConnectionError

from stickystate.replicator.producer import Replicator
from stickystate.replicator.settings import ReplicatorSettings
from stickystate.replicator.topics import ensure_topics
from tests.helpers import read_records

pytestmark = pytest.mark.kafka

PARTITIONS = 4


@pytest.fixture
async def settings(kafka_bootstrap: str) -> ReplicatorSettings:
    s = ReplicatorSettings(kafka_bootstrap=kafka_bootstrap, changes_topic=f"rep-{uuid.uuid4().hex[:10]}",
                           partitions=PARTITIONS, linger_ms=2)
    await ensure_topics(s)
    # a second topic (as snapshots will use): same partition count, created the same way
    await ensure_topics(ReplicatorSettings(kafka_bootstrap=kafka_bootstrap, changes_topic=s.changes_topic + "-b",
                                           partitions=PARTITIONS))
    return s


async def test_every_record_gets_its_own_offset_in_enqueue_order(settings: ReplicatorSettings) -> None:
    rep = Replicator(settings, client_id="test-rep")
    await rep.start()
    other = settings.changes_topic + "-b"
    rng = random.Random(3)
    sent: list[tuple[str, int, bytes, bytes | None, asyncio.Future[int]]] = []
    try:
        for burst in range(20):
            for i in range(rng.randrange(1, 40)):
                topic = other if rng.random() < 0.2 else settings.changes_topic
                p = rng.randrange(PARTITIONS)
                key = b"k%d-%d" % (burst, i)
                value = None if topic == other and rng.random() < 0.3 else b"v%d-%d" % (burst, i)
                sent.append((topic, p, key, value, rep.enqueue(p, key, value, topic=topic)))
            await asyncio.sleep(rng.random() * 0.01)
        offsets = await asyncio.wait_for(asyncio.gather(*(f for *_, f in sent)), 30)
        assert rep.depth == 0 and rep.acked_total == rep.sent_total == sum(1 for t, *_ in sent if t == settings.changes_topic)
        assert rep.other_acked_total == rep.other_sent_total == sum(1 for t, *_ in sent if t != settings.changes_topic)
        assert rep.batches_total < len(sent)  # records of a partition shared batches
    finally:
        await rep.stop()
    for topic in (settings.changes_topic, other):
        for p in range(PARTITIONS):
            log = await read_records(settings.kafka_bootstrap, topic, p)
            mine = [(off, key, value) for (t, pp, key, value, _), off in zip(sent, offsets) if (t, pp) == (topic, p)]
            assert log == mine, (topic, p)  # the future's offset is the record's; enqueue order kept


async def test_a_rebuilt_producer_sends_again_what_was_not_acknowledged(settings: ReplicatorSettings) -> None:
    rep = Replicator(settings, client_id="test-rep-rebuild")
    await rep.start()
    futures: list[tuple[int, bytes, asyncio.Future[int]]] = []
    try:
        for i in range(300):
            p = i % PARTITIONS
            futures.append((p, b"v%d" % i, rep.enqueue(p, b"k", b"v%d" % i)))
            if i == 150:
                rep._broken = True  # as after a failed delivery: rebuild, re-send every unacknowledged record
                rep._wake.set()
            if i % 10 == 0:
                await asyncio.sleep(0.001)
        offsets = await asyncio.wait_for(asyncio.gather(*(f for *_, f in futures)), 60)
        assert rep.rebuilds_total == 1 and rep.depth == 0
    finally:
        await rep.stop()
    for p in range(PARTITIONS):
        log = await read_records(settings.kafka_bootstrap, settings.changes_topic, p)
        by_offset = {off: value for off, _, value in log}
        mine = [(v, off) for (pp, v, _), off in zip(futures, offsets) if pp == p]
        assert all(by_offset[off] == v for v, off in mine)  # each future names its record
        first_seen: list[bytes] = []
        for _, _, value in log:
            if value not in first_seen:
                first_seen.append(value)
        assert first_seen == [v for v, _ in mine]  # every record, first copies in enqueue order


async def test_a_request_whose_answer_is_lost_goes_again_and_the_log_keeps_one_copy(settings: ReplicatorSettings) -> None:
    """The broker took a request but its answer never came (a connection lost, a timeout): the
    same batches go again under the same producer id and sequence numbers, the broker keeps
    one copy and answers with the first copy's offsets; no producer rebuild."""
    rep = Replicator(settings, client_id="test-rep-lost")
    await rep.start()
    client = rep._client
    assert client is not None
    real_send = client.send
    lost: list[object] = []

    async def send_and_lose_the_first_answer(node: int, request: object, **kw: object) -> object:
        answer = await real_send(node, request, **kw)  # the broker has the batches now
        if not lost:
            lost.append(request)
            raise KafkaConnectionError("the answer was lost (test)")
        return answer

    client.send = send_and_lose_the_first_answer  # type: ignore[method-assign]
    try:
        values = [b"lost-%d" % i for i in range(8)]
        futures = [rep.enqueue(i % PARTITIONS, b"k", v) for i, v in enumerate(values)]
        offsets = await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert lost and rep.rebuilds_total == 0 and rep.retries_total >= 1 and rep.depth == 0
    finally:
        await rep.stop()
    for p in range(PARTITIONS):
        log = await read_records(settings.kafka_bootstrap, settings.changes_topic, p)
        mine = [(off, b"k", v) for i, (v, off) in enumerate(zip(values, offsets)) if i % PARTITIONS == p]
        assert log == mine, p  # each record once, at the offset its future was given


async def test_a_dead_sender_fails_every_queued_future(settings: ReplicatorSettings) -> None:
    rep = Replicator(settings, client_id="test-rep-dead")
    await rep.start()
    futures = [rep.enqueue(i % PARTITIONS, b"k", b"v") for i in range(10)]
    rep._task.cancel()  # type: ignore[union-attr]  # in the same step: nothing was handed over yet
    done, pending = await asyncio.wait(futures, timeout=5)
    assert not pending and all(isinstance(f.exception(), Exception) for f in done)
    assert rep.depth == 0
    with pytest.raises(Exception, match="not running"):
        rep.enqueue(0, b"k", b"v")  # refused before anything is queued
    await rep.stop()


async def test_records_share_rounds_under_load_and_hurry_skips_the_interval(kafka_bootstrap: str) -> None:
    """linger_ms spaces the send rounds; a caller that waits (Durability: log, a claim,
    a flush) does not wait for the interval. The interval is the longest allowed (10 s) so
    that "sent before the next round was due" is told apart from it by seconds: this is
    behaviour, not speed."""
    s = ReplicatorSettings(kafka_bootstrap=kafka_bootstrap, changes_topic=f"rep-{uuid.uuid4().hex[:10]}",
                           partitions=PARTITIONS, linger_ms=10_000)
    interval_s = s.linger_ms / 1000
    await ensure_topics(s)
    rep = Replicator(s, client_id="test-rep-linger")
    await rep.start()
    try:
        await asyncio.wait_for(rep.enqueue(0, b"k", b"first"), 20)  # after a quiet spell: at once
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting = [rep.enqueue(p, b"k", b"v") for p in range(PARTITIONS)]
        await asyncio.sleep(0.5)  # a window in which nothing may happen, not a wait for something
        assert not any(f.done() for f in waiting)  # held for the next round
        rep.hurry()
        await asyncio.wait_for(asyncio.gather(*waiting), interval_s - 2)
        assert loop.time() - started < interval_s - 1.5  # before the round would have been due
        assert rep.batches_total == 1 + PARTITIONS
        # send_and_wait hurries by itself (the next round is again about interval_s away)
        started = loop.time()
        await rep.send_and_wait(1, b"k", b"claim-like", timeout_s=interval_s - 2)
        assert loop.time() - started < interval_s - 1.5
    finally:
        await rep.stop()
