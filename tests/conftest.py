"""Shared fixtures. Integration tests run against a real Kafka broker: one LocalKafka
(KRaft, from .kafka/libs) per test session, or the one named by KAFKA_BOOTSTRAP.

Tiers (README, "Tests"): every test that needs Kafka is marked ``kafka``, so
``-m "not kafka"`` runs without a broker. Two guards keep that true:

- at collection, a test that uses a Kafka fixture (anything that depends on
  ``kafka_bootstrap``) without the ``kafka`` mark stops the run (UsageError);
- at run time, starting a LocalKafka from a test that is not marked ``kafka`` fails
  that test, so a broker started directly (not through a fixture) is caught too.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from stickystate import kafka_local
from stickystate.kafka_cluster import LocalKafkaCluster
from stickystate.local_cluster import LocalCluster
from tests.helpers import BROKER_LOGS, Api

# Fixtures that reach a broker. Every other Kafka fixture depends on one of these, and
# item.fixturenames is the whole closure, so a test that uses `cluster`, `api`,
# `start_cluster`, ... is seen here through them.
KAFKA_FIXTURES = frozenset({"kafka_bootstrap", "kafka_cluster3"})


def unmarked_kafka_tests(items: list[pytest.Item]) -> list[str]:
    """Node ids of the tests that use a Kafka fixture but are not marked ``kafka``."""
    return [item.nodeid for item in items
            if KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("kafka") is None]


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    offenders = unmarked_kafka_tests(items)
    if offenders:
        raise pytest.UsageError("these tests use a Kafka fixture but are not marked kafka "
                                "(add @pytest.mark.kafka or a module-level pytestmark):\n  " + "\n  ".join(offenders))


# The test being run (setup, call, teardown), for the broker guard below.
_running: list[pytest.Item] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _running.append(item)
    try:
        yield
    finally:
        _running.remove(item)


@pytest.fixture(scope="session", autouse=True)
def _brokers_only_for_kafka_tests() -> Iterator[None]:
    """A LocalKafka may start only while a test marked ``kafka`` is being set up or run."""
    start = kafka_local.LocalKafka.start

    def guarded_start(self: kafka_local.LocalKafka, *args: Any, **kwargs: Any) -> Any:
        item = _running[-1] if _running else None
        if item is None or item.get_closest_marker("kafka") is None:
            who = item.nodeid if item is not None else "code outside any test"
            pytest.fail(f"{who} starts a Kafka broker but is not marked kafka", pytrace=False)
        return start(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kafka_local.LocalKafka, "start", guarded_start)
        yield


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    kafka_local.ensure_jars()
    broker = kafka_local.LocalKafka(tmp_path_factory.mktemp("kafka"))
    broker.start()
    BROKER_LOGS[broker.bootstrap] = broker.log_file
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def kafka_cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafkaCluster]:
    """Three KRaft brokers (a quorum of three combined nodes), topics at RF 3 and
    min.insync.replicas 2, for the tests of one module that kill and restart brokers.
    Tests using it never need ``kafka_bootstrap`` (one broker setup at a time)."""
    kafka_local.ensure_jars()
    kafka = LocalKafkaCluster(tmp_path_factory.mktemp("kafka3"), brokers=3)
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


def make_cluster(tmp: Path, kafka_bootstrap: str, **kw: object) -> LocalCluster:
    """A cluster on its own topic, so test modules never see each other's events."""
    kw.setdefault("partitions", 8)
    return LocalCluster(tmp, kafka_bootstrap=kafka_bootstrap, topic=f"changes-{uuid.uuid4().hex[:10]}", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cluster_options() -> dict[str, Any]:
    """Override in a module to shape its shared cluster (limits, auth, ...)."""
    return {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str,
            cluster_options: dict[str, Any]) -> Iterator[LocalCluster]:
    """Three nodes and a router, shared by the tests of one module."""
    c = make_cluster(tmp_path_factory.mktemp("cluster"), kafka_bootstrap, **cluster_options)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def api(cluster: LocalCluster) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as http:
        yield Api(http, cluster.router_url)


@pytest.fixture
def start_cluster(tmp_path_factory: pytest.TempPathFactory,
                  kafka_bootstrap: str) -> Iterator[Callable[..., LocalCluster]]:
    """A fresh cluster per test, for tests that kill and restart things."""
    started: list[LocalCluster] = []

    def start(**kw: Any) -> LocalCluster:
        c = make_cluster(tmp_path_factory.mktemp("fresh"), kafka_bootstrap, **kw)
        c.start()
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()
