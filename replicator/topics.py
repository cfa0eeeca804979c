"""Create the ``changes`` topic at start-up if it is missing, and check its shape."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from stickystate.replicator.settings import ReplicatorSettings

log = logging.getLogger("stickystate.replicator")


class TopicMismatch(RuntimeError):
    pass


def topic_specs(settings: ReplicatorSettings) -> dict[str, dict[str, str]]:
    """Topic name -> configs, for the two topics a cluster needs (same partition count:
    partition = shard in both)."""
    return {
        settings.changes_topic: {"cleanup.policy": "delete", "retention.ms": str(settings.changes_retention_ms)},
        # Compacted: about one record per live session and epoch survives. Segments roll
        # every 10 minutes so the cleaner gets to them; tombstones stay a day, long enough
        # for any reader that started before the delete.
        settings.snapshots_topic: {"cleanup.policy": "compact", "segment.ms": "600000",
                                   "min.cleanable.dirty.ratio": "0.1", "delete.retention.ms": "86400000"},
    }


async def ensure_topics(settings: ReplicatorSettings, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    specs = topic_specs(settings)
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            existing = await admin.list_topics()
            missing = [NewTopic(name, settings.partitions, settings.replication_factor, topic_configs=configs)
                       for name, configs in specs.items() if name not in existing]
            for topic in missing:
                try:
                    await admin.create_topics([topic])
                    log.info("created topic", extra={"topic": topic.name, "partitions": settings.partitions})
                except TopicAlreadyExistsError:
                    pass
            desc = await admin.describe_topics(list(specs))
            counts = {d.get("topic"): len(d.get("partitions") or []) for d in desc}
            for name, got in counts.items():
                if got and got != settings.partitions:
                    raise TopicMismatch(
                        f"topic {name!r} has {got} partitions, settings say {settings.partitions}: "
                        "the shard count is fixed when the topics are created"
                    )
            if all(counts.get(name) for name in specs):
                return
        except (KafkaConnectionError, KafkaError, OSError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"Kafka at {settings.kafka_bootstrap} not reachable: {exc}") from exc
            log.warning("waiting for Kafka", extra={"error": repr(exc)})
        finally:
            await admin.close()
        await asyncio.sleep(0.5)
