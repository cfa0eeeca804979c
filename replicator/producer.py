"""The one Kafka producer of a node process, behind a bounded queue and a sender task.

``enqueue()`` is synchronous: the node calls it in the same step as the in-memory
change, so a change is never applied without being handed over (and is not applied
when the hand-over is refused: ``QueueFull`` / ``KafkaStalled`` are raised before).

The sender task builds and sends the record batches itself: per partition, everything
queued (up to MAX_BATCH_BYTES) goes into one record batch (aiokafka's C
``DefaultRecordBatchBuilder``, with this producer's id and the partition's next sequence
number), and a round's batches go as one produce request per broker (replicator/wire.py,
through aiokafka's client, which keeps the connections and the metadata). A partition has
at most one batch unacknowledged and a broker at most one request, as in aiokafka's own
idempotent producer; what is gone is aiokafka's per-batch Python (accumulator, drain, a
future and a task per batch, a generic request encoder): at a node's load a batch holds
about one record, so that was most of what replication cost a node (docs/BENCHMARKS.md).
Record ``i`` of a batch gets offset ``base_offset + i``. A round is sent at most once per
``linger_ms`` (fewer produce requests, and fewer wake-ups of every follower's fetch), at
once after a quiet spell or when a caller is about to wait for its record (``hurry()``:
``Durability: log``, claims, flushes), so only ``memory`` writes ever wait for it. Per
partition, records go out in the order they were enqueued; across topics and partitions
they are handed over in enqueue order, round by round.

A request that fails (connection lost, timed out) or a partition answered with a
retriable error (no leader, not enough replicas...) is sent again after RETRY_BACKOFF_S,
the same bytes under the same producer id and sequence numbers, so the broker keeps one
copy. Any other error (out of sequence, unknown producer id, fenced, too large) rebuilds
the producer: a new client and producer id, and every record not yet acknowledged sent
again in its original order; readers drop the duplicates by version (node/shard.py). If
the sender task itself dies, every pending delivery future is failed, never left hanging.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.transaction import InitProducerIdRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from stickystate.replicator.errors import KafkaStalled, QueueFull, ReplicationError
from stickystate.replicator.settings import ReplicatorSettings
from stickystate.replicator.wire import ProduceRequest

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
RETRY_BACKOFF_S = 0.1  # before a batch goes again after a retriable error, or a leader is looked up again


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(eq=False)
class _Batch:
    """One partition's record batch, encoded once: a retry sends the same bytes (same
    producer id and sequence numbers)."""
    tp: tuple[str, int]
    items: list[Outgoing]
    data: bytes
    retry_at: float = 0.0

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
        # partitions with a batch built and not yet acknowledged (in flight, or in _outbox)
        self._busy: set[TopicPartition] = set()
        # built batches waiting to be sent (again, after a retriable error)
        self._outbox: dict[TopicPartition, _Batch] = {}
        # brokers (node ids) with a produce request unanswered
        self._in_flight: set[int] = set()
        self._requests: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._hurried = False  # someone awaits a delivery: skip the send interval
        self._interval: asyncio.Future[None] | None = None  # the sender's wait for the interval
        self._client: AIOKafkaClient | None = None
        self._pid = -1
        self._epoch = -1
        self._sequences: dict[TopicPartition, int] = {}  # next sequence number per partition
        self._topics: set[str] = set()  # topics whose metadata the client was asked for
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
        self.retries_total = 0  # batches sent again unchanged (lost answer, retriable error)
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
        self._hurried = True
        if self._interval is not None and not self._interval.done():
            self._interval.set_result(None)
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
        for request in list(self._requests):
            request.cancel()
        await asyncio.gather(*self._requests, return_exceptions=True)
        if self._client is not None:
            await self._close_client(self._client)
            self._client = None
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
        self._outbox.clear()

    async def _build_producer(self) -> None:
        backoff = 0.1
        while True:
            client = AIOKafkaClient(
                bootstrap_servers=self.settings.kafka_bootstrap,
                client_id=self.client_id,
                request_timeout_ms=self.settings.request_timeout_ms,
            )
            try:
                await client.bootstrap()
                pid, epoch = await self._init_producer_id(client)
            except (KafkaError, OSError) as exc:
                await self._close_client(client)
                if self._stopping:
                    raise ReplicationError("stopping") from exc
                log.warning("Kafka producer start failed, retrying", extra={"error": repr(exc), "backoff_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self._client = client
            self._pid, self._epoch = pid, epoch
            self._sequences = {}  # a new producer id starts every partition at sequence 0
            self._topics = set()
            self._broken = False
            return

    @staticmethod
    async def _init_producer_id(client: AIOKafkaClient) -> tuple[int, int]:
        """An idempotent producer's id and epoch (InitProducerId without a transactional id):
        the broker then drops a resent batch it already has (same id, same sequence)."""
        for _ in range(10):
            node = client.get_random_node()
            if node is None:
                await client.force_metadata_update()
                continue
            resp = await client.send(node, InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60_000))
            error = kafka_errors.for_code(resp.error_code)
            if error is kafka_errors.NoError:
                return resp.producer_id, resp.producer_epoch
            if not error.retriable:
                raise error()
            await asyncio.sleep(0.1)
        raise KafkaError("no producer id after 10 attempts")

    @staticmethod
    async def _close_client(client: AIOKafkaClient) -> None:
        try:
            await asyncio.wait_for(client.close(), 5)
        except Exception as exc:  # a broken client may fail to close; it is dropped either way
            log.debug("Kafka client close failed", extra={"error": repr(exc)})

    async def _rebuild(self) -> None:
        self.rebuilds_total += 1
        old = self._client
        self._client = None
        # Everything not acknowledged goes out again, in its original order, under a new
        # producer id (the answers to the old client's requests are ignored: another
        # generation). A record the broker had already taken is then in the log twice;
        # readers drop the second copy by version (node/shard.py).
        self._generation += 1
        self._queues.clear()
        self._busy.clear()
        self._outbox = {}
        self._in_flight = set()
        for item in self._unacked.values():  # enqueue (seq) order
            self._queues.setdefault((item.topic, item.partition), deque()).append(item)
        log.warning("rebuilding Kafka producer", extra={"resend": len(self._unacked)})
        if old is not None:
            await self._close_client(old)
        await self._build_producer()

    def _ready(self) -> list[TopicPartition]:
        """Partitions with queued records and no batch built and unacknowledged, oldest record first."""
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
            if not self._outbox and not any(q and tp not in self._busy for tp, q in self._queues.items()):
                self._wake.clear()
                await self._wake.wait()
                continue
            # At most one round per linger: under load, records arriving meanwhile share
            # the next request (fewer produce requests, and fewer wake-ups of every
            # follower's fetch); after a quiet spell, or when a caller waits for its
            # record (hurry), records go at once.
            wait_s = last_round + linger_s - time.monotonic()
            if wait_s > 0 and not self._hurried:
                await self._wait_interval(wait_s)
            if self._broken:
                continue
            self._hurried = False
            last_round = time.monotonic()
            sent, look_again_s = self._round()
            if not sent:
                # Nothing could go (every leader busy with a request, a leader unknown, a
                # retry not yet due): wait for an answer, a metadata update or the retry.
                self._wake.clear()
                timer = (None if look_again_s is None
                         else asyncio.get_running_loop().call_later(look_again_s, self._wake.set))
                await self._wake.wait()
                if timer is not None:
                    timer.cancel()

    async def _wait_interval(self, wait_s: float) -> None:
        """Sleep ``wait_s`` unless hurried meanwhile (a future and a timer: this runs once
        per round, and ``wait_for`` would add a task and a cancellation each time)."""
        loop = asyncio.get_running_loop()
        interval = self._interval = loop.create_future()
        timer = loop.call_later(wait_s, _resolve, interval)
        try:
            await interval
        finally:
            timer.cancel()
            self._interval = None

    def _round(self) -> tuple[bool, float | None]:
        """Hand every batch that can go to its partition leader: one produce request per
        broker, at most one request per broker and one batch per partition unacknowledged
        (per partition, batches go in sequence order; a broker takes a connection's requests
        one at a time anyway). Returns whether anything was sent, and how long to wait at
        most before trying again when not."""
        client = self._client
        assert client is not None
        cluster = client.cluster
        now = time.monotonic()
        wait_s: float | None = None
        groups: dict[int, list[_Batch]] = {}
        in_flight = self._in_flight

        def leader(tp: TopicPartition) -> int | None:
            nonlocal wait_s
            if tp[0] not in self._topics:
                self._topics.add(tp[0])
                client.add_topic(tp[0]).add_done_callback(lambda _f: self._wake.set())
            node = cluster.leader_for_partition(KafkaTopicPartition(*tp))
            if node is None or node < 0:
                # unknown or no leader (an election): ask again, look again shortly
                client.force_metadata_update().add_done_callback(lambda _f: self._wake.set())
                wait_s = RETRY_BACKOFF_S if wait_s is None else min(wait_s, RETRY_BACKOFF_S)
                return None
            return node

        # batches to send again first: they are older than anything queued
        for tp, batch in list(self._outbox.items()):
            if batch.retry_at > now:
                due = batch.retry_at - now
                wait_s = due if wait_s is None else min(wait_s, due)
                continue
            node = leader(tp)
            if node is None or node in in_flight:
                continue
            del self._outbox[tp]
            groups.setdefault(node, []).append(batch)
        for tp in self._ready():
            node = leader(tp)
            if node is None or node in in_flight:
                continue
            groups.setdefault(node, []).append(self._build(tp))
        for node, batches in groups.items():
            in_flight.add(node)
            task = asyncio.get_running_loop().create_task(
                self._send(client, node, batches, self._generation, in_flight))
            self._requests.add(task)
            task.add_done_callback(self._on_request_done)
        return bool(groups), wait_s

    def _build(self, tp: TopicPartition) -> _Batch:
        """One record batch of everything queued for ``tp`` (up to MAX_BATCH_BYTES), with the
        producer id and the partition's next sequence number."""
        queue = self._queues[tp]
        seq = self._sequences.get(tp, 0)
        builder = DefaultRecordBatchBuilder(2, 0, 0, self._pid, self._epoch, seq, MAX_BATCH_BYTES)
        items: list[Outgoing] = []
        while queue:
            item = queue[0]
            # the first record always fits (a batch may exceed its size for it)
            if builder.append(len(items), None, item.key, item.value, []) is None:
                break
            items.append(queue.popleft())
        self._sequences[tp] = (seq + len(items)) & 0x7FFFFFFF  # sequences wrap to 0 after 2**31 - 1
        self._busy.add(tp)
        if tp[0] == self.settings.changes_topic:
            self.sent_total += len(items)
        else:
            self.other_sent_total += len(items)
        self.batches_total += 1
        return _Batch(tp, items, bytes(builder.build()))

    async def _send(self, client: AIOKafkaClient, node: int, batches: list[_Batch], generation: int,
                    in_flight: set[int]) -> None:
        request = ProduceRequest(-1, self.settings.request_timeout_ms,
                                 [(b.tp[0], b.tp[1], b.data) for b in batches])
        try:
            response = await client.send(node, request)
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            in_flight.discard(node)
            if generation == self._generation:
                # Not known whether the broker took them: the same batches go again (same
                # producer id and sequence numbers, so the broker keeps one copy).
                log.warning("produce request failed, sending again", extra={"error": repr(exc), "node": node})
                client.force_metadata_update()
                for batch in batches:
                    self._send_again(batch)
            self._wake.set()
            return
        in_flight.discard(node)
        self._wake.set()
        if generation != self._generation:
            return  # superseded by a rebuild: the records were queued again
        for batch in batches:
            error, base = response.partitions.get(batch.tp, (-1, -1))
            if error == 0:
                self._on_delivered(batch, base)
                continue
            kind = kafka_errors.for_code(error) if error != -1 else kafka_errors.KafkaError
            if error == -1 or kind.retriable:
                if error == -1 or getattr(kind, "invalid_metadata", False):
                    client.force_metadata_update()
                log.info("produce answered with a retriable error, sending again",
                         extra={"error": kind.__name__, "topic": batch.tp[0], "partition": batch.tp[1]})
                self._send_again(batch)
            elif not self._broken:
                # out of sequence, unknown producer id, fenced, too large...: a new producer
                # sends everything unacknowledged again
                log.warning("delivery failed", extra={"error": kind.__name__, "topic": batch.tp[0],
                                                      "partition": batch.tp[1]})
                self._broken = True

    def _send_again(self, batch: _Batch) -> None:
        batch.retry_at = time.monotonic() + RETRY_BACKOFF_S
        self.retries_total += 1
        self._outbox[batch.tp] = batch

    def _on_request_done(self, task: asyncio.Task[None]) -> None:
        self._requests.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a bug: never leave records waiting on a request nobody answers
            log.error("produce request task failed", exc_info=exc)
            self._broken = True
            self._wake.set()

    def _on_delivered(self, batch: _Batch, base: int) -> None:
        tp, items = batch.tp, batch.items
        self._busy.discard(tp)
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
