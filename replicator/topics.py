"""Create the topics (``changes``, ``snapshots``, ``keys``) at start-up if they are missing, and check their shape."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from stickystate.replicator.settings import ReplicatorSettings

log = logging.getLogger("stickystate.replicator")


class TopicMismatch(RuntimeError):
    pass


def replication(settings: ReplicatorSettings, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for new topics on a cluster of ``brokers``:
    the settings', or by default min(3, brokers) and 2 from a factor of 3 on (else 1)."""
    return replication_of(settings.replication_factor, settings.min_insync_replicas, brokers)


def replication_of(replication_factor: int, min_insync_replicas: int, brokers: int) -> tuple[int, int]:
    rf = replication_factor or max(1, min(3, brokers))
    min_isr = min_insync_replicas or (2 if rf >= 3 else 1)
    return rf, min(min_isr, rf)


def topic_specs(settings: ReplicatorSettings, min_isr: int = 1) -> dict[str, dict[str, str]]:
    """Topic name -> configs, for the three topics a cluster needs (same partition count:
    partition = shard in all). Never an unclean leader: it could drop acknowledged events."""
    safety = {"min.insync.replicas": str(min_isr), "unclean.leader.election.enable": "false"}
    lag = str(settings.keys_compaction_lag_ms)
    return {
        settings.changes_topic: {"cleanup.policy": "delete", "retention.ms": str(settings.changes_retention_ms),
                                 **safety},
        # Compacted: about one record per live session and epoch survives. Segments roll
        # every 10 minutes so the cleaner gets to them; tombstones stay a day, long enough
        # for any reader that started before the delete.
        settings.snapshots_topic: {"cleanup.policy": "compact", "segment.ms": "600000",
                                   "min.cleanable.dirty.ratio": "0.1", "delete.retention.ms": "86400000",
                                   **safety},
        # Compacted, and compacted soon: a tombstoned data key must leave the disk within a
        # bound. max.compaction.lag.ms makes a record eligible for compaction at the latest
        # this long after it was written, and rolls the active segment (never compacted) on
        # the first append after that long (segment.ms the same, for brokers that roll only
        # by it); the owners append a small "#roll" record when a tombstone would otherwise
        # sit in an idle active segment (node/erasure.py). The tombstone itself (no secret)
        # stays delete.retention.ms so a node reading the partition meanwhile sees it.
        settings.keys_topic: {"cleanup.policy": "compact", "max.compaction.lag.ms": lag, "segment.ms": lag,
                              "min.cleanable.dirty.ratio": "0.01", "delete.retention.ms": "86400000", **safety},
    }


async def ensure_topics(settings: ReplicatorSettings, timeout_s: float = 60.0) -> None:
    """The node's three topics: created if missing, their partition count (= shard count) checked."""
    await _ensure(settings.kafka_bootstrap, settings.partitions, settings.replication_factor,
                  settings.min_insync_replicas, lambda min_isr: topic_specs(settings, min_isr), timeout_s,
                  fixed="the shard count is fixed when the topics are created")


async def ensure_topic(bootstrap: str, name: str, *, partitions: int, configs: dict[str, str],
                       replication_factor: int = 0, min_insync_replicas: int = 0, timeout_s: float = 60.0) -> None:
    """One topic of someone else's (the routers' placement topic, router/control.py): created
    if missing with the same replication rules as the node's topics; its partition count checked."""
    def specs(min_isr: int) -> dict[str, dict[str, str]]:
        return {name: {**configs, "min.insync.replicas": str(min_isr), "unclean.leader.election.enable": "false"}}

    await _ensure(bootstrap, partitions, replication_factor, min_insync_replicas, specs, timeout_s,
                  fixed="a topic's partition count is fixed when it is created")


async def _ensure(bootstrap: str, partitions: int, replication_factor: int, min_insync_replicas: int,
                  specs_for: Callable[[int], dict[str, dict[str, str]]], timeout_s: float, fixed: str) -> None:
    """Create the missing topics of ``specs_for(min_isr)`` (name -> configs), then wait until
    each has its partitions; retried while Kafka is unreachable, up to ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            existing = await admin.list_topics()
            brokers = len((await admin.describe_cluster()).get("brokers") or [])
            rf, min_isr = replication_of(replication_factor, min_insync_replicas, brokers)
            specs = specs_for(min_isr)
            for name, configs in specs.items():
                if name in existing:
                    continue
                try:
                    await admin.create_topics([NewTopic(name, partitions, rf, topic_configs=configs)])
                    log.info("created topic", extra={"topic": name, "partitions": partitions,
                                                     "replication_factor": rf, "min_insync_replicas": min_isr})
                except TopicAlreadyExistsError:
                    pass
            desc = await admin.describe_topics(list(specs))
            counts = {d.get("topic"): len(d.get("partitions") or []) for d in desc}
            _warn_under_replicated(desc, rf)
            for name, got in counts.items():
                if got and got != partitions:
                    raise TopicMismatch(f"topic {name!r} has {got} partitions, {partitions} expected: {fixed}")
            if all(counts.get(name) for name in specs):
                return
        except (KafkaConnectionError, KafkaError, OSError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"Kafka at {bootstrap} not reachable: {exc}") from exc
            log.warning("waiting for Kafka", extra={"error": repr(exc)})
        finally:
            await admin.close()
        await asyncio.sleep(0.5)


def _warn_under_replicated(desc: list[dict[str, Any]], rf: int) -> None:
    """An existing topic keeps its replication factor: say so when it is below the wanted one."""
    for d in desc:
        got = min((len(p.get("replicas") or []) for p in d.get("partitions") or []), default=rf)
        if got < rf:
            log.warning("topic has fewer replicas than wanted (Kafka does not change it: "
                        "kafka-reassign-partitions does)",
                        extra={"topic": d.get("topic"), "replicas": got, "wanted": rf})
