"""Several routers, one placement: a placement leader elected through Kafka, and the
shard map shared through it (``--placement-kafka``; without it a router decides alone).

Every router joins the consumer group ``--router-group`` on the placement topic, which
has one partition. Kafka's group coordinator gives that partition to one member at a
time: that router is the **placement leader**. A member that stops heartbeating (killed,
paused, cut off) loses it after ``--leader-session-timeout-ms``; one that stops cleanly
hands it on at once. Every router also reads the whole topic (it is compacted) and keeps
following it. Its records:

- ``leader``  ``{"router", "url"}``: written by a router that was just given the
  partition, before it does anything else. Its offset + 1 is that leader's **term**.
- ``map``     ``{"generation", "term", "leader", "nodes", "partitions", "standbys",
  "owners", "standby_map"}``: the placement, published by the leader after the nodes
  took it. Followers forward by the newest (highest generation) map they have read.
- ``suspect/<router>`` ``{"node", "reason"}``: a follower found a node dead (a
  connection error); the leader probes that node at once.

Fencing: a leader numbers its assignments ``term << TERM_SHIFT | sequence``, so every
assignment of a later leader is higher than any of an earlier one, and nodes refuse an
assignment older than theirs. A leader that was paused and still believes it leads is
refused by the nodes (it steps down on the refusal), steps down as soon as it reads a
later ``leader`` record, and its late ``map`` records are ignored by everyone (older
generation). Why Kafka and not a consensus library: the cluster already depends on
Kafka, whose group coordinator is a tested lease; no new service to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from stickystate.replicator.topics import ensure_topic

log = logging.getLogger("stickystate.router")

LEADER_KEY = b"leader"
MAP_KEY = b"map"
SUSPECT_PREFIX = b"suspect/"
TERM_SHIFT = 20  # generation = term << TERM_SHIFT | sequence: a million placements per term


def term_base(term: int) -> int:
    return term << TERM_SHIFT


class ControlHandler:
    """What the control channel tells the router (router/cluster.py implements it)."""

    async def lead(self, term: int) -> None:
        raise NotImplementedError

    def step_down(self, reason: str) -> None:
        raise NotImplementedError

    def leader_record(self, term: int, doc: dict[str, Any]) -> None:
        raise NotImplementedError

    def map_record(self, doc: dict[str, Any]) -> None:
        raise NotImplementedError

    def suspect_record(self, router: str, doc: dict[str, Any]) -> None:
        raise NotImplementedError


class Control:
    def __init__(self, *, bootstrap: str, topic: str, group: str, router_id: str, router_url: str,
                 session_timeout_ms: int, handler: ControlHandler, replication_factor: int = 0,
                 min_insync_replicas: int = 0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.router_id = router_id
        self.router_url = router_url
        self.session_timeout_ms = session_timeout_ms
        self.handler = handler
        self.replication_factor = replication_factor
        self.min_insync_replicas = min_insync_replicas
        self.tp = TopicPartition(topic, 0)
        self.position = 0  # next offset the follower reads
        self._read = asyncio.Condition()
        self._producer: AIOKafkaProducer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._leading_task: asyncio.Task[None] | None = None
        self.holds_partition = False

    async def start(self) -> None:
        await ensure_topic(self.bootstrap, self.topic, partitions=1,
                           configs={"cleanup.policy": "compact", "segment.ms": "3600000",
                                    "min.cleanable.dirty.ratio": "0.1", "delete.retention.ms": "3600000"},
                           replication_factor=self.replication_factor, min_insync_replicas=self.min_insync_replicas)
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, client_id=f"router-{self.router_id}",
                                          acks="all", enable_idempotence=True, linger_ms=0)
        await self._producer.start()
        self._tasks = [asyncio.create_task(self._forever(self._follow, "follow"), name="control-follow"),
                       asyncio.create_task(self._forever(self._elect, "elect"), name="control-elect")]

    async def stop(self) -> None:
        tasks = [t for t in (*self._tasks, self._leading_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()

    async def _forever(self, body: Callable[[], Awaitable[None]], what: str) -> None:
        """Run ``body`` again after an error (Kafka unreachable, a broker restarted)."""
        while True:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged, retried
                log.warning("placement control: retrying", extra={"task": what, "error": repr(exc)})
                if what == "elect" and self.holds_partition:
                    self._lost("the election consumer failed")
                await asyncio.sleep(1.0)

    # -- following the topic ---------------------------------------------------------------
    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, client_id=f"router-{self.router_id}-follow",
                                    group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100,
                                    isolation_level="read_committed")
        await consumer.start()
        try:
            consumer.assign([self.tp])
            consumer.seek(self.tp, self.position)
            while True:
                batches = await consumer.getmany(self.tp, timeout_ms=1000)
                for record in batches.get(self.tp, ()):
                    self._apply(record.offset, record.key or b"", record.value)
                    self.position = record.offset + 1
                if not batches:
                    # Fetches that return nothing still move the position past aborted or
                    # compacted-away offsets; readers waiting for an offset must see that.
                    self.position = max(self.position, await consumer.position(self.tp))
                async with self._read:
                    self._read.notify_all()
        finally:
            await consumer.stop()

    def _apply(self, offset: int, key: bytes, value: bytes | None) -> None:
        if value is None:
            return
        try:
            doc = orjson.loads(value)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            log.error("placement control: bad record", extra={"offset": offset, "error": repr(exc)})
            return
        if key == LEADER_KEY:
            self.handler.leader_record(offset + 1, doc)
        elif key == MAP_KEY:
            self.handler.map_record(doc)
        elif key.startswith(SUSPECT_PREFIX):
            self.handler.suspect_record(key[len(SUSPECT_PREFIX):].decode("utf-8", "replace"), doc)

    async def read_past(self, offset: int, timeout_s: float) -> None:
        """Until the follower has read ``offset``."""
        async with self._read:
            await asyncio.wait_for(self._read.wait_for(lambda: self.position > offset), timeout_s)

    # -- the election --------------------------------------------------------------------
    async def _elect(self) -> None:
        control = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                if control.tp in set(revoked) and control.holds_partition:
                    control._lost("the leader partition was revoked")

            async def on_partitions_assigned(self, assigned: Any) -> None:
                if control.tp in set(assigned) and not control.holds_partition:
                    control.holds_partition = True
                    control._leading_task = asyncio.create_task(control._take_lead(), name="control-lead")

        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, client_id=f"router-{self.router_id}-elect",
                                    group_id=self.group, enable_auto_commit=False,
                                    session_timeout_ms=self.session_timeout_ms,
                                    heartbeat_interval_ms=max(100, self.session_timeout_ms // 6),
                                    max_poll_interval_ms=max(60_000, self.session_timeout_ms * 2),
                                    auto_offset_reset="latest")
        await consumer.start()
        try:
            consumer.subscribe([self.topic], listener=Listener())
            while True:
                await consumer.getmany(timeout_ms=1000)  # keeps the membership; the records are the follower's
        finally:
            if self.holds_partition:
                self._lost("stopping")
            await consumer.stop()

    def _lost(self, reason: str) -> None:
        self.holds_partition = False
        if self._leading_task is not None:
            self._leading_task.cancel()
            self._leading_task = None
        self.handler.step_down(reason)

    async def _take_lead(self) -> None:
        """Claim a term (the ``leader`` record), read everything before it (the newest map,
        any later claim), then lead."""
        assert self._producer is not None
        meta = await self._producer.send_and_wait(
            self.topic, orjson.dumps({"router": self.router_id, "url": self.router_url}), key=LEADER_KEY,
            partition=0)
        await self.read_past(meta.offset, timeout_s=30.0)
        if self.holds_partition:
            log.info("placement leader", extra={"router": self.router_id, "term": meta.offset + 1})
            await self.handler.lead(meta.offset + 1)

    # -- writing -------------------------------------------------------------------------
    async def publish_map(self, doc: dict[str, Any]) -> bool:
        if self._producer is None:
            return False
        try:
            await self._producer.send_and_wait(self.topic, orjson.dumps(doc), key=MAP_KEY, partition=0)
            return True
        except KafkaError as exc:
            log.error("placement control: map not published", extra={"error": repr(exc)})
            return False

    def report_suspect(self, node: str, reason: str) -> None:
        if self._producer is None:
            return
        task = asyncio.ensure_future(self._producer.send(
            self.topic, orjson.dumps({"node": node, "reason": reason}),
            key=SUSPECT_PREFIX + self.router_id.encode(), partition=0))
        task.add_done_callback(_quiet)


def _quiet(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("placement control: suspect report not sent", extra={"error": repr(fut.exception())})
