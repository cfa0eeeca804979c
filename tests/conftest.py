"""Shared fixtures. Integration tests run against a real Kafka broker: one LocalKafka
(KRaft, from .kafka/libs) per test session, or the one named by KAFKA_BOOTSTRAP."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from stickystate import kafka_local
from stickystate.local_cluster import LocalCluster
from tests.helpers import Api


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    kafka_local.ensure_jars()
    broker = kafka_local.LocalKafka(tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


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
