"""Failover on a real broker: kill -9, restart of an empty node, and a paused zombie."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable

import aiohttp
import pytest

from stickystate.chaos.checker import Record, replay
from stickystate.local_cluster import LocalCluster, http_json
from stickystate.protocol import shard_of
from tests.helpers import Api, codec_for, read_records, wait_for

pytestmark = pytest.mark.kafka

N = 300


@pytest.fixture
def fresh_cluster(start_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return start_cluster()


async def write_sessions(api: Api, n: int, prefix: str) -> dict[str, dict]:
    """Create n sessions and append to each at durability log; return what was acknowledged."""
    acked: dict[str, dict] = {}
    sem = asyncio.Semaphore(24)

    async def one(i: int) -> None:
        sid = f"{prefix}-{i}"
        async with sem:
            status, body, _ = await api.call("POST", "/v1/sessions", {"id": sid, "data": {"n": i}},
                                             headers={"Durability": "log"})
            assert status == 201, body
            status, body, _ = await api.call("POST", f"/v1/sessions/{sid}/lists/turns",
                                             {"items": [f"turn-{i}"], "max_len": 50}, headers={"Durability": "log"})
            assert status == 200, body
            acked[sid] = body["data"]

    await asyncio.gather(*(one(i) for i in range(n)))
    return acked


async def read_all(api: Api, sids: list[str]) -> dict[str, tuple[int, dict | None, str]]:
    sem = asyncio.Semaphore(24)
    out: dict[str, tuple[int, dict | None, str]] = {}

    async def one(sid: str) -> None:
        async with sem:
            status, body, headers = await api.call("GET", f"/v1/sessions/{sid}")
            out[sid] = (status, body["data"] if status == 200 else body, headers.get("X-Stickystate-Owner", ""))

    await asyncio.gather(*(one(s) for s in sids))
    return out


async def test_kill_9_loses_no_acknowledged_write_and_reads_see_no_error(fresh_cluster: LocalCluster) -> None:
    c = fresh_cluster
    prefix = "k9-" + uuid.uuid4().hex[:6]
    async with aiohttp.ClientSession() as http:
        api = Api(http, c.router_url)
        acked = await write_sessions(api, N, prefix)
        victim = "n1"
        victim_shards = {int(s) for s, o in c.cluster_view()["shards"].items() if o == victim}
        on_victim = [s for s in acked if shard_of(s, c.partitions) in victim_shards]
        assert on_victim, "the victim owns none of the sessions; pick more sessions"

        c.kill_node(victim)  # SIGKILL: no flush, no goodbye
        results = await read_all(api, list(acked))

    errors = {s: r for s, r in results.items() if r[0] != 200}
    assert not errors, f"{len(errors)} reads failed, e.g. {list(errors.items())[:3]}"
    lost = {s for s, r in results.items() if r[1] != acked[s]}
    assert not lost, f"{len(lost)} acknowledged sessions differ, e.g. {sorted(lost)[:3]}"
    assert all(results[s][2] != victim for s in on_victim)


async def test_restarted_empty_node_rejoins_and_serves_its_shards_rebuilt_from_the_log(
        fresh_cluster: LocalCluster) -> None:
    c = fresh_cluster
    prefix = "rj-" + uuid.uuid4().hex[:6]
    victim = "n2"
    async with aiohttp.ClientSession() as http:
        api = Api(http, c.router_url)
        acked = await write_sessions(api, N, prefix)
        shards_before = {int(s) for s, o in c.cluster_view()["shards"].items() if o == victim}

        c.kill_node(victim)
        wait_for(lambda: not any(n["healthy"] for n in c.cluster_view()["nodes"] if n["id"] == victim),
                 what="router to see the node dead")
        # Writes while it is away land on the takeover node; the rebuilt node must have them.
        moved = [s for s in acked if shard_of(s, c.partitions) in shards_before][:20]
        for sid in moved:
            status, body, headers = await api.call("POST", f"/v1/sessions/{sid}/lists/turns",
                                                   {"items": ["while-away"], "max_len": 50},
                                                   headers={"Durability": "log"})
            assert status == 200 and headers["X-Stickystate-Owner"] != victim
            acked[sid] = body["data"]

        c.restart_node(victim)  # a new process: empty memory
        wait_for(lambda: http_json(c.node_url(victim) + "/readyz")[0] == 200 and c.cluster_view()["settled"]
                 and {int(s) for s, o in c.cluster_view()["shards"].items() if o == victim} == shards_before,
                 what="the node to take its shards back")
        results = await read_all(api, list(acked))

    assert all(r[0] == 200 for r in results.values())
    assert {s for s, r in results.items() if r[1] != acked[s]} == set()
    served_by_victim = {s for s, r in results.items() if r[2] == victim}
    assert served_by_victim == {s for s in acked if shard_of(s, c.partitions) in shards_before}
    status, node_status = http_json(c.node_url(victim) + "/internal/status")
    rebuilt = {r["shard"]: r for r in node_status["recoveries"]}
    assert set(rebuilt) == shards_before
    # Each session came back from a snapshot (the takeover node wrote a full set when it
    # claimed) or from replayed events: the node did rebuild, it was not handed anything.
    assert sum(r["events_applied"] + r["snapshot_sessions"] for r in rebuilt.values()) >= len(served_by_victim)


async def test_paused_zombie_owner_cannot_acknowledge_or_leak_writes(fresh_cluster: LocalCluster) -> None:
    """SIGSTOP the owner, fail over, write through the new owner, SIGCONT the old one
    and write to it directly: none of its writes is acknowledged at durability log
    or appears in anyone's state."""
    c = fresh_cluster
    sid = "zombie-" + uuid.uuid4().hex[:6]
    shard = shard_of(sid, c.partitions)
    async with aiohttp.ClientSession() as http:
        api = Api(http, c.router_url)
        status, _, headers = await api.call("POST", "/v1/sessions", {"id": sid, "data": {"log": []}},
                                            headers={"Durability": "log"})
        assert status == 201
        old = headers["X-Stickystate-Owner"]
        old_epoch = int(headers["X-Stickystate-Epoch"])

        c.signal_node(old, signal.SIGSTOP)
        status, body, headers = await api.call("POST", f"/v1/sessions/{sid}/lists/log", {"items": ["via-new"]},
                                               headers={"Durability": "log"})
        assert status == 200, body
        new = headers["X-Stickystate-Owner"]
        assert new != old and int(headers["X-Stickystate-Epoch"]) > old_epoch

        # Keep the router from re-adding the old node while we talk to it directly.
        c.signal_node("router", signal.SIGSTOP)
        try:
            c.signal_node(old, signal.SIGCONT)
            zombie = Api(http, c.node_url(old))
            answers = []
            for i in range(5):
                answers.append(await zombie.call("POST", f"/v1/sessions/{sid}/lists/log", {"items": [f"zombie-{i}"]},
                                                 headers={"Durability": "log"}))
            memory_answer = await zombie.call("POST", f"/v1/sessions/{sid}/lists/log", {"items": ["zombie-mem"]},
                                              headers={"Durability": "memory"})
        finally:
            c.signal_node("router", signal.SIGCONT)

        # Nothing the zombie was asked was acknowledged: resuming, it re-read its partitions
        # (a stall), found the new owner's claim, and refused with a 421 at either durability,
        # naming the new owner as the claim in the log says (never itself: a client
        # following the hint would come straight back).
        assert [(a[0], a[1]["error"], a[1]["owner"]) for a in answers] == [(421, "not_owner", new)] * 5, answers
        assert (memory_answer[0], memory_answer[1]["error"], memory_answer[1]["owner"]) == (421, "not_owner", new)
        assert all(a[2]["X-Stickystate-Owner"] == new for a in [*answers, memory_answer])

        c.wait_ready()
        status, body, headers = await api.call("GET", f"/v1/sessions/{sid}")
        assert status == 200 and body["data"]["log"] == ["via-new"]
        assert int(headers["X-Stickystate-Epoch"]) > old_epoch
        for nid in c.node_ids():
            got = await Api(http, c.node_url(nid)).call("GET", f"/v1/sessions/{sid}")
            if got[0] == 200:
                assert not any(str(x).startswith("zombie") for x in got[1]["data"]["log"]), (nid, got)
    # ... nor in the log: the independent checker's replay of the session's partition (its
    # own fencing rule) rebuilds exactly what the new owner acknowledged.
    records = [Record(shard, offset, key, value)
               for offset, key, value in await read_records(c.kafka_bootstrap, c.topic, shard)]
    rebuilt = replay(records, c.partitions, codec=await codec_for(c.kafka_bootstrap, c.topic, c.master_keys, shard))
    assert rebuilt.sessions[sid] == {"version": 2, "data": {"log": ["via-new"]}}, rebuilt.stats
    assert not rebuilt.anomalies, rebuilt.anomalies
