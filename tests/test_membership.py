"""Graceful membership under load: a node joins, and every node is restarted in turn
(SIGTERM drain), while clients append at both durability levels. Zero client errors,
zero lost acknowledged writes — at durability memory too."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from stickystate.local_cluster import LocalCluster
from tests.helpers import Api, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


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
            await asyncio.sleep(0.01)  # pacing: each session writes about every 10 ms plus its round trip

    async def __aenter__(self) -> Load:
        for sid, durability in self.sessions:
            status, body, _ = await self.api.call("POST", "/v1/sessions", {"id": sid}, headers={"Durability": "log"})
            assert status == 201, body
        self.tasks = [asyncio.create_task(self.run_session(s, d)) for s, d in self.sessions]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    def acked_total(self) -> int:
        return sum(len(v) for v in self.acked.values())

    async def progress(self, appends: int = 50, timeout_s: float = 60.0) -> None:
        """Wait until ``appends`` more writes have been acknowledged: the load is running."""
        goal = self.acked_total() + appends
        await wait_until(lambda: self.acked_total() >= goal, timeout_s=timeout_s,
                         what=f"{appends} more acknowledged appends (errors so far: {self.errors[:3]})")

    async def verify(self) -> None:
        assert self.errors == [], self.errors[:5]
        for sid, durability in self.sessions:
            status, body, _ = await self.api.call("GET", f"/v1/sessions/{sid}")
            assert status == 200, (sid, body)
            seen = body["data"].get("log", [])
            assert seen == self.acked[sid], (sid, durability, len(seen), len(self.acked[sid]))
        assert self.acked_total() > 100


def sessions(prefix: str, n: int = 16) -> list[tuple[str, str]]:
    return [(f"{prefix}-{i}", "log" if i % 2 else "memory") for i in range(n)]


@pytest.fixture
def four_slots(start_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return start_cluster(nodes=4, initial_nodes=3)


async def test_node_join_under_load_loses_nothing(four_slots: LocalCluster) -> None:
    c = four_slots
    async with aiohttp.ClientSession() as http:
        load = Load(Api(http, c.router_url), sessions("join-" + uuid.uuid4().hex[:5]))
        async with load:
            await load.progress()  # under load before the join ...
            assert "n4" not in c.cluster_view()["shards"].values()
            await asyncio.to_thread(c.start_node, "n4")
            await wait_until(lambda: "n4" in c.cluster_view()["shards"].values() and c.cluster_view()["settled"],
                             what="n4 to own shards in a settled placement")
            await asyncio.to_thread(c.wait_ready)
            await load.progress()  # ... and after it
        await load.verify()


@pytest.fixture
def three(start_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return start_cluster()


async def test_rolling_restart_under_load_loses_nothing(three: LocalCluster) -> None:
    c = three
    async with aiohttp.ClientSession() as http:
        load = Load(Api(http, c.router_url), sessions("roll-" + uuid.uuid4().hex[:5]))
        async with load:
            await load.progress()
            for nid in c.node_ids():
                await asyncio.to_thread(c.restart_node, nid)  # SIGTERM: drain, hand off, exit; then start
                await asyncio.to_thread(c.wait_ready)
                await load.progress(25)  # writes go on between restarts
        await load.verify()
