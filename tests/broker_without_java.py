"""Child process of tests/test_kafka_local.py::test_broker_runs_with_java_and_maven_hidden.

Run as ``python -m tests.broker_without_java DATA_DIR`` with PATH and JAVA_HOME as the
test set them: starts the local broker, produces and consumes one record with aiokafka,
stops the broker, and prints what it saw as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stickystate.kafka_local import LocalKafka


async def round_trip(bootstrap: str, value: bytes) -> list[bytes]:
    topic = f"nojava-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"k", partition=0)  # waits for the topic's metadata
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            got += [m.value for m in batch.get(tp, []) if m.value is not None]
        return got
    finally:
        await consumer.stop()


def main() -> None:
    seen: dict[str, object] = {
        "java_on_path": shutil.which("java"),
        "mvn_on_path": shutil.which("mvn"),
        "java_home": os.environ.get("JAVA_HOME"),
    }
    kafka = LocalKafka(Path(sys.argv[1]))
    kafka.start()
    try:
        assert kafka.java is not None and kafka.pid is not None
        seen["java"] = {"path": str(kafka.java.path), "major": kafka.java.major, "source": kafka.java.source}
        seen["broker_exe"] = os.path.realpath(f"/proc/{kafka.pid}/exe")
        seen["consumed"] = [v.decode() for v in asyncio.run(round_trip(kafka.bootstrap, b"hello without java"))]
    finally:
        kafka.stop()
    seen["console"] = kafka.console_file.read_text()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
