"""The one Kafka producer of a node process, behind a bounded queue and a sender task.

``enqueue()`` is synchronous: the node calls it in the same step as the in-memory
change, so a change is never applied without being handed over (and is not applied
when the hand-over is refused: ``QueueFull`` / ``KafkaStalled`` are raised before).

The sender task owns the aiokafka producer. When a delivery fails (broker gone,
fenced, out of sequence, timeout) the producer is rebuilt and every event not yet
acknowledged is sent again in its original order; readers drop the duplicates by
version (node/shard.py). If the sender task itself dies, every pending delivery
future is failed, never left hanging.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from replicator.errors import KafkaStalled, QueueFull, ReplicationError
from replicator.settings import ReplicatorSettings

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


class Replicator:
    def __init__(self, settings: ReplicatorSettings, client_id: str) -> None:
        self.settings = settings
        self.client_id = client_id
        self._seq = itertools.count()
        self._pending: deque[Outgoing] = deque()  # not yet handed to the producer
        self._inflight: dict[int, Outgoing] = {}  # handed over, not acknowledged (insertion = send order)
        self._wake = asyncio.Event()
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

    # -- admission --------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._pending) + len(self._inflight)

    def oldest_unacked_age_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        oldest = None
        if self._inflight:
            oldest = next(iter(self._inflight.values())).enqueued_at
        if self._pending:
            first = self._pending[0].enqueued_at
            oldest = first if oldest is None else min(oldest, first)
        return 0.0 if oldest is None else now - oldest

    def check_admission(self) -> None:
        """Raise before anything changes if a new event could not be replicated in time."""
        if self._task is None or self._task.done():
            raise KafkaStalled("replicator is not running")
        if self.depth >= self.settings.queue_max:
            raise QueueFull(f"replication queue full ({self.depth} events)")
        if self.oldest_unacked_age_s() > self.settings.kafka_deadline_s:
            raise KafkaStalled(f"Kafka has not acknowledged for {self.oldest_unacked_age_s():.1f}s")

    def enqueue(self, partition: int, key: bytes, value: bytes | None, topic: str | None = None) -> asyncio.Future[int]:
        """Hand one record over (synchronous). Returns a future of its log offset.

        ``topic`` defaults to the changes topic. Records to all topics go out in the
        order they were enqueued (also when resent after a producer rebuild)."""
        self.check_admission()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(Outgoing(next(self._seq), topic or self.settings.changes_topic, partition, key, value,
                                      time.monotonic(), fut))
        self._wake.set()
        return fut

    async def send_and_wait(self, partition: int, key: bytes, value: bytes, timeout_s: float | None = None) -> int:
        fut = self.enqueue(partition, key, value)
        return await asyncio.wait_for(asyncio.shield(fut), timeout_s or self.settings.kafka_deadline_s * 2)

    async def flush(self, partitions: Iterable[int] | None = None, timeout_s: float = 30.0) -> None:
        """Wait until every event queued so far (for these partitions) is acknowledged."""
        wanted = None if partitions is None else set(partitions)
        futs = [o.future for o in itertools.chain(self._pending, self._inflight.values())
                if wanted is None or o.partition in wanted]
        if futs:
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
        for item in itertools.chain(self._pending, self._inflight.values()):
            if not item.future.done():
                item.future.set_exception(exc)
                item.future.exception()  # mark retrieved: nobody may be awaiting a memory-durability future
        self._pending.clear()
        self._inflight.clear()

    async def _build_producer(self) -> None:
        backoff = 0.1
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                client_id=self.client_id,
                acks="all",
                enable_idempotence=True,
                linger_ms=self.settings.linger_ms,
                request_timeout_ms=self.settings.request_timeout_ms,
                max_batch_size=256 * 1024,
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
        # Everything not acknowledged goes out again, in its original order.
        unacked = sorted(list(self._inflight.values()) + list(self._pending), key=lambda o: o.seq)
        self._inflight.clear()
        self._pending = deque(unacked)
        log.warning("rebuilding Kafka producer", extra={"resend": len(unacked)})
        if old is not None:
            await self._close_producer(old)
        await self._build_producer()

    async def _run(self) -> None:
        while True:
            if self._broken:
                await self._rebuild()
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            producer, generation = self._producer, self._generation
            assert producer is not None
            try:
                while self._pending and not self._broken:
                    item = self._pending[0]
                    delivery = await producer.send(item.topic, item.value, key=item.key, partition=item.partition)
                    self._pending.popleft()
                    self._inflight[item.seq] = item
                    if item.topic == self.settings.changes_topic:
                        self.sent_total += 1
                    else:
                        self.other_sent_total += 1
                    delivery.add_done_callback(lambda f, item=item, g=generation: self._on_delivered(item, g, f))
            except (KafkaError, OSError) as exc:
                log.warning("send failed", extra={"error": repr(exc)})
                self._broken = True

    def _on_delivered(self, item: Outgoing, generation: int, delivery: asyncio.Future) -> None:
        if generation != self._generation or item.seq not in self._inflight:
            return  # superseded by a rebuild: the item was re-queued
        if delivery.cancelled() or delivery.exception() is not None:
            if not self._broken:
                log.warning("delivery failed", extra={"error": repr(None if delivery.cancelled() else delivery.exception())})
                self._broken = True
                self._wake.set()
            return
        del self._inflight[item.seq]
        if item.topic == self.settings.changes_topic:
            self.acked_total += 1
        else:
            self.other_acked_total += 1
        now = time.monotonic()
        self.send_latency_sum_s += now - item.enqueued_at
        if not item.future.done():
            item.future.set_result(delivery.result().offset)
