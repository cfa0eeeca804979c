"""The one Kafka producer of a node process, behind a bounded queue and a sender task.

``enqueue()`` is synchronous: the node calls it in the same step as the in-memory
change, so a change is never applied without being handed over (and is not applied
when the hand-over is refused: ``QueueFull`` / ``KafkaStalled`` are raised before).

The sender task owns the aiokafka producer and hands records over in batches: per
partition, everything queued (up to the producer's batch size) goes into one record
batch (``create_batch``/``send_batch``), and a partition has at most one batch handed
over and not yet acknowledged. aiokafka sends one request per broker at a time and,
with idempotence, one batch per partition at a time anyway, so this loses no
pipelining; it saves aiokafka's per-record work (a future, metadata and partition
look-ups, an await per record). Record ``i`` of a batch gets offset
``base_offset + i``. A round of batches is handed over at most once per
``linger_ms`` (fewer produce requests, and fewer wake-ups of every follower's fetch:
most of a node's replication CPU is aiokafka's per-request work), at once after a
quiet spell or when a caller is about to wait for its record (``hurry()``:
``Durability: log``, claims, flushes), so only ``memory`` writes ever wait for it. Per partition, records go
out in the order they were enqueued; across topics and partitions they are handed
over in enqueue order, round by round.

When a delivery fails (broker gone, fenced, out of sequence, timeout) the producer is
rebuilt and every record not yet acknowledged is sent again in its original order;
readers drop the duplicates by version (node/shard.py). If the sender task itself
dies, every pending delivery future is failed, never left hanging.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from stickystate.replicator.errors import KafkaStalled, QueueFull, ReplicationError
from stickystate.replicator.settings import ReplicatorSettings

log = logging.getLogger("stickystate.replicator")


@dataclass(eq=False)
class Outgoing:
    seq: int
    topic: str
    partition: int
    key: bytes
    value: bytes | None  # None: a tombstone (compacted topics only)
    enqueued_at: float
    future: asyncio.Future[int] = field(repr=False)
    meta: Any = None  # the caller's, handed back with the offset to ``on_acked``


TopicPartition = tuple[str, int]
MAX_BATCH_BYTES = 256 * 1024
# on_acked(partition, [(offset, meta), ...]): records of the changes topic acknowledged
# by Kafka, in offset order, called before their futures resolve
OnAcked = Callable[[int, list[tuple[int, Any]]], None]


class Replicator:
    def __init__(self, settings: ReplicatorSettings, client_id: str, on_acked: OnAcked | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self.on_acked = on_acked
        self._seq = itertools.count()
        # every record from enqueue to acknowledgement, in enqueue order (seq)
        self._unacked: dict[int, Outgoing] = {}
        # records not yet handed to the producer, per partition, in enqueue order
        self._queues: dict[TopicPartition, deque[Outgoing]] = {}
        # partitions with a batch handed over and not yet acknowledged
        self._busy: set[TopicPartition] = set()
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()  # someone awaits a delivery: skip the send interval
        self._producer: AIOKafkaProducer | None = None
        self._generation = 0
        self._broken = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # figures for /metrics and tests
        self.sent_total = 0  # changes topic only (events and claims)
        self.acked_total = 0
        self.other_sent_total = 0  # other topics (snapshots)
        self.other_acked_total = 0
        self.rebuilds_total = 0
        self.send_latency_sum_s = 0.0
        self.batches_total = 0

    # -- admission --------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._unacked)

    def oldest_unacked_age_s(self, now: float | None = None) -> float:
        if not self._unacked:
            return 0.0
        now = time.monotonic() if now is None else now
        return now - next(iter(self._unacked.values())).enqueued_at

    def check_admission(self) -> None:
        """Raise before anything changes if a new event could not be replicated in time."""
        if self._task is None or self._task.done():
            raise KafkaStalled("replicator is not running")
        if len(self._unacked) >= self.settings.queue_max:
            raise QueueFull(f"replication queue full ({self.depth} events)")
        if self.oldest_unacked_age_s() > self.settings.kafka_deadline_s:
            raise KafkaStalled(f"Kafka has not acknowledged for {self.oldest_unacked_age_s():.1f}s")

    def enqueue(self, partition: int, key: bytes, value: bytes | None, topic: str | None = None,
                meta: Any = None) -> asyncio.Future[int]:
        """Hand one record over (synchronous). Returns a future of its log offset.

        ``topic`` defaults to the changes topic. Records to all topics go out in the
        order they were enqueued (also when resent after a producer rebuild). ``meta``
        is handed back with the record's offset to ``on_acked`` (changes topic)."""
        self.check_admission()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        item = Outgoing(next(self._seq), topic or self.settings.changes_topic, partition, key, value,
                        time.monotonic(), fut, meta)
        self._unacked[item.seq] = item
        tp = (item.topic, partition)
        queue = self._queues.get(tp)
        if queue is None:
            queue = self._queues[tp] = deque()
        queue.append(item)
        if tp not in self._busy:
            self._wake.set()
        return fut

    def hurry(self) -> None:
        """A caller is about to wait for the records queued so far (``Durability: log``,
        a claim): hand them over now rather than at the end of the send interval."""
        self._hurry.set()
        self._wake.set()

    async def send_and_wait(self, partition: int, key: bytes, value: bytes, timeout_s: float | None = None) -> int:
        fut = self.enqueue(partition, key, value)
        self.hurry()
        return await asyncio.wait_for(asyncio.shield(fut), timeout_s or self.settings.kafka_deadline_s * 2)

    async def flush(self, partitions: Iterable[int] | None = None, timeout_s: float = 30.0) -> None:
        """Wait until every event queued so far (for these partitions) is acknowledged."""
        wanted = None if partitions is None else set(partitions)
        futs = [o.future for o in self._unacked.values() if wanted is None or o.partition in wanted]
        if futs:
            self.hurry()
            await asyncio.wait_for(asyncio.gather(*(asyncio.shield(f) for f in futs), return_exceptions=True), timeout_s)

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        await self._build_producer()
        self._task = asyncio.create_task(self._run(), name=f"replicator-sender-{self.client_id}")
        self._task.add_done_callback(self._on_sender_done)

    async def stop(self, flush_timeout_s: float = 10.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        try:
            await self.flush(timeout_s=flush_timeout_s)
        except (asyncio.TimeoutError, ReplicationError):
            log.error("stopping with unacknowledged events", extra={"events": self.depth})
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._producer is not None:
            await self._close_producer(self._producer)
            self._producer = None
        self._fail_all(ReplicationError("replicator stopped"))

    def _on_sender_done(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("replicator sender died", exc_info=exc)
        self._fail_all(ReplicationError(f"replicator sender stopped: {exc!r}"))

    def _fail_all(self, exc: Exception) -> None:
        for item in self._unacked.values():
            if not item.future.done():
                item.future.set_exception(exc)
                item.future.exception()  # mark retrieved: nobody may be awaiting a memory-durability future
        self._unacked.clear()
        self._queues.clear()
        self._busy.clear()

    async def _build_producer(self) -> None:
        backoff = 0.1
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                client_id=self.client_id,
                acks="all",
                enable_idempotence=True,
                linger_ms=0,  # batches are built and closed here (see _run)
                request_timeout_ms=self.settings.request_timeout_ms,
                max_batch_size=MAX_BATCH_BYTES,  # also the size of the batches built here
                max_request_size=2 * 1024 * 1024,
            )
            try:
                await producer.start()
            except (KafkaError, OSError) as exc:
                await self._close_producer(producer)
                if self._stopping:
                    raise ReplicationError("stopping") from exc
                log.warning("Kafka producer start failed, retrying", extra={"error": repr(exc), "backoff_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self._producer = producer
            self._generation += 1
            self._broken = False
            return

    @staticmethod
    async def _close_producer(producer: AIOKafkaProducer) -> None:
        try:
            await asyncio.wait_for(producer.stop(), 5)
        except Exception as exc:  # a broken producer may fail to stop; it is dropped either way
            log.debug("producer stop failed", extra={"error": repr(exc)})

    async def _rebuild(self) -> None:
        self.rebuilds_total += 1
        old = self._producer
        self._producer = None
        # Everything not acknowledged goes out again, in its original order (the
        # callbacks of the old producer's batches are ignored: another generation).
        self._queues.clear()
        self._busy.clear()
        for item in self._unacked.values():  # enqueue (seq) order
            self._queues.setdefault((item.topic, item.partition), deque()).append(item)
        log.warning("rebuilding Kafka producer", extra={"resend": len(self._unacked)})
        if old is not None:
            await self._close_producer(old)
        await self._build_producer()

    def _ready(self) -> list[TopicPartition]:
        """Partitions with queued records and no batch in flight, oldest record first."""
        ready = [tp for tp, q in self._queues.items() if q and tp not in self._busy]
        if len(ready) > 1:
            ready.sort(key=lambda tp: self._queues[tp][0].seq)
        return ready

    async def _run(self) -> None:
        linger_s = self.settings.linger_ms / 1000
        last_round = -linger_s
        while True:
            if self._broken:
                await self._rebuild()
            ready = self._ready()
            if not ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            # At most one round per linger: under load, records arriving meanwhile share
            # the next request (fewer produce requests, and fewer wake-ups of every
            # follower's fetch); after a quiet spell, or when a caller waits for its
            # record (hurry), records go at once.
            wait_s = last_round + linger_s - time.monotonic()
            if wait_s > 0 and not self._hurry.is_set():
                try:
                    await asyncio.wait_for(self._hurry.wait(), wait_s)
                except asyncio.TimeoutError:
                    pass
                ready = self._ready()
            self._hurry.clear()
            last_round = time.monotonic()
            producer, generation = self._producer, self._generation
            assert producer is not None
            try:
                for tp in ready:
                    if self._broken:
                        break
                    queue = self._queues[tp]
                    batch = producer.create_batch()
                    items: list[Outgoing] = []
                    while queue:
                        item = queue[0]
                        # the first record always fits (a batch may exceed its size for it)
                        if batch.append(timestamp=None, key=item.key, value=item.value) is None:
                            break
                        items.append(queue.popleft())
                    batch.close()
                    # A failure from here on leaves the records in _unacked: _rebuild re-queues them.
                    delivery = await producer.send_batch(batch, tp[0], partition=tp[1])
                    self._busy.add(tp)
                    if tp[0] == self.settings.changes_topic:
                        self.sent_total += len(items)
                    else:
                        self.other_sent_total += len(items)
                    self.batches_total += 1
                    delivery.add_done_callback(functools.partial(self._on_delivered, tp, items, generation))
            except (KafkaError, OSError) as exc:
                log.warning("send failed", extra={"error": repr(exc)})
                self._broken = True

    def _on_delivered(self, tp: TopicPartition, items: list[Outgoing], generation: int,
                      delivery: asyncio.Future) -> None:
        if generation != self._generation:
            return  # superseded by a rebuild: the items were re-queued
        if delivery.cancelled() or delivery.exception() is not None:
            if not self._broken:
                log.warning("delivery failed", extra={"error": repr(None if delivery.cancelled() else delivery.exception())})
                self._broken = True
                self._wake.set()
            return
        self._busy.discard(tp)
        base = delivery.result().offset
        now = time.monotonic()
        changes = tp[0] == self.settings.changes_topic
        if changes and self.on_acked is not None:
            # Every record of the batch is in the log at base + i, also one whose
            # future failed meanwhile (stop): the offsets are facts either way.
            try:
                self.on_acked(tp[1], [(base + i, item.meta) for i, item in enumerate(items)])
            except Exception:  # never leave the futures below unresolved
                log.exception("on_acked failed")
        for i, item in enumerate(items):
            if self._unacked.pop(item.seq, None) is None:
                continue  # failed meanwhile (stop)
            if changes:
                self.acked_total += 1
            else:
                self.other_acked_total += 1
            self.send_latency_sum_s += now - item.enqueued_at
            if not item.future.done():
                item.future.set_result(base + i)
        if self._queues.get(tp):
            self._wake.set()
