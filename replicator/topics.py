"""Create the ``changes`` topic at start-up if it is missing, and check its shape."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from replicator.settings import ReplicatorSettings

log = logging.getLogger("stickystate.replicator")


class TopicMismatch(RuntimeError):
    pass


async def ensure_topics(settings: ReplicatorSettings, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            existing = await admin.list_topics()
            if settings.changes_topic not in existing:
                try:
                    await admin.create_topics(
                        [NewTopic(settings.changes_topic, settings.partitions, settings.replication_factor,
                                  topic_configs={"retention.ms": "-1", "cleanup.policy": "delete"})]
                    )
                    log.info("created topic", extra={"topic": settings.changes_topic, "partitions": settings.partitions})
                except TopicAlreadyExistsError:
                    pass
            desc = await admin.describe_topics([settings.changes_topic])
            got = len(desc[0]["partitions"]) if desc and desc[0].get("partitions") else 0
            if got and got != settings.partitions:
                raise TopicMismatch(
                    f"topic {settings.changes_topic!r} has {got} partitions, settings say {settings.partitions}: "
                    "the shard count is fixed when the topic is created"
                )
            if got:
                return
        except (KafkaConnectionError, KafkaError, OSError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"Kafka at {settings.kafka_bootstrap} not reachable: {exc}") from exc
            log.warning("waiting for Kafka", extra={"error": repr(exc)})
        finally:
            await admin.close()
        await asyncio.sleep(0.5)
