"""Graceful membership under load: a node joins, and every node is restarted in turn
(SIGTERM drain), while clients append at both durability levels. Zero client errors,
zero lost acknowledged writes — at durability memory too."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from stickystate.local_cluster import LocalCluster
from tests.helpers import Api

pytestmark = pytest.mark.kafka


@dataclass
class Load:
    api: Api
    sessions: list[tuple[str, str]]  # (id, durability)
    acked: dict[str, list[str]] = field(default_factory=dict)
    errors: list[tuple[str, int, object]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run_session(self, sid: str, durability: str) -> None:
        seq = 0
        self.acked[sid] = []
        while not self.stop.is_set():
            token = f"{sid}:{seq}"
            status, body, _ = await self.api.call("POST", f"/v1/sessions/{sid}/lists/log", {"items": [token]},
                                                  headers={"Durability": durability})
            if status == 200:
                self.acked[sid].append(token)
            else:
                self.errors.append((sid, status, body))
            seq += 1
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> Load:
        for sid, durability in self.sessions:
            status, body, _ = await self.api.call("POST", "/v1/sessions", {"id": sid}, headers={"Durability": "log"})
            assert status == 201, body
        self.tasks = [asyncio.create_task(self.run_session(s, d)) for s, d in self.sessions]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    async def verify(self) -> None:
        assert self.errors == [], self.errors[:5]
        for sid, durability in self.sessions:
            status, body, _ = await self.api.call("GET", f"/v1/sessions/{sid}")
            assert status == 200, (sid, body)
            seen = body["data"].get("log", [])
            assert seen == self.acked[sid], (sid, durability, len(seen), len(self.acked[sid]))
        assert sum(len(v) for v in self.acked.values()) > 100


def sessions(prefix: str, n: int = 16) -> list[tuple[str, str]]:
    return [(f"{prefix}-{i}", "log" if i % 2 else "memory") for i in range(n)]


async def wait_until(predicate, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


@pytest.fixture
def four_slots(start_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return start_cluster(nodes=4, initial_nodes=3)


async def test_node_join_under_load_loses_nothing(four_slots: LocalCluster) -> None:
    c = four_slots
    async with aiohttp.ClientSession() as http:
        load = Load(Api(http, c.router_url), sessions("join-" + uuid.uuid4().hex[:5]))
        async with load:
            await asyncio.sleep(1.0)
            assert "n4" not in c.cluster_view()["shards"].values()
            await asyncio.to_thread(c.start_node, "n4")
            await wait_until(lambda: "n4" in c.cluster_view()["shards"].values() and c.cluster_view()["settled"])
            await asyncio.to_thread(c.wait_ready)
            await asyncio.sleep(1.0)
        await load.verify()


@pytest.fixture
def three(start_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return start_cluster()


async def test_rolling_restart_under_load_loses_nothing(three: LocalCluster) -> None:
    c = three
    async with aiohttp.ClientSession() as http:
        load = Load(Api(http, c.router_url), sessions("roll-" + uuid.uuid4().hex[:5]))
        async with load:
            await asyncio.sleep(1.0)
            for nid in c.node_ids():
                await asyncio.to_thread(c.restart_node, nid)  # SIGTERM: drain, hand off, exit; then start
                await asyncio.to_thread(c.wait_ready)
                await asyncio.sleep(0.5)
        await load.verify()
