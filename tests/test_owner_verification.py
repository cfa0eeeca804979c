"""An owner verifies its writes from Kafka's acknowledgements instead of reading its
own partitions back (node/verification.py, node/acks.py); it reads a partition only to
settle a hole, after a stall, or when the partition's end moved past its writes.

Unit tests on the pure Shard, then a real cluster on a real broker where a foreign
claim is written into an owned partition behind the owner's back.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from stickystate.node.ops import apply
from stickystate.node.shard import DELETED, Shard
from stickystate.replicator import events
from stickystate.protocol import shard_of
from stickystate.local_cluster import LocalCluster, http_json
from tests.helpers import Api, owned_shard


def acking_shard(claim_offset: int) -> Shard:
    """Owned, with our acknowledgements tracked from its claim on (as after _acquire)."""
    shard = owned_shard(claim_offset)
    shard.acks.start(1)
    return shard


def live_write(shard: Shard, sid: str, item: str) -> int:
    """Apply a write as the owner does (no log yet); returns the new version."""
    current = shard.sessions.get(sid)
    op = {"op": "create", "sid": sid, "data": {"m": []}, "ttl_s": 3600} if current is None else \
        {"op": "append", "sid": sid, "field": "m", "items": [item]}
    new, event = apply(current, op, 1.0)
    event["node"], event["epoch"] = "n1", 1
    shard.commit(event, new)
    return new["version"]


def test_contiguous_acknowledgements_verify_without_reading() -> None:
    shard = acking_shard(claim_offset=4)
    assert shard.position == 5
    v1 = live_write(shard, "a", "x")
    v2 = live_write(shard, "a", "y")
    v3 = live_write(shard, "b", "z")
    shard.own_acked([(5, ("a", v1)), (6, ("a", v2))], now=0.0)
    assert shard.position == 7 and not shard.acks.hole
    assert shard.marks.read_ver == {"a": v2} and shard.last_offset["a"] == 6 and shard.marks.dirty["a"][0] == 5
    assert shard.marks.dirty["a"][2] == 2
    shard.own_acked([(7, ("b", v3))], now=0.0)
    assert shard.position == 8 and shard.marks.read_ver["b"] == v3
    assert shard.snapshot_due(1, 60, time.monotonic()) == ["a", "b"]  # verified: a snapshot may hold them


def test_an_acknowledgement_past_a_gap_is_a_hole_until_the_gap_is_read() -> None:
    shard = acking_shard(claim_offset=4)
    v1 = live_write(shard, "a", "x")
    v2 = live_write(shard, "a", "y")
    # offset 5 was written by someone else (or is an earlier attempt of ours): unknown
    shard.own_acked([(6, ("a", v1)), (7, ("a", v2))], now=0.0)
    assert shard.position == 5 and shard.acks.hole and "a" not in shard.marks.read_ver
    # The follower reads offset 5: a stale event of an old owner, harmless.
    stale = {"op": "append", "sid": "a", "field": "m", "items": ["old"], "ver": 9, "at": 0, "node": "n0",
             "epoch": 0}
    assert shard.apply_record(5, stale, "n1", now=0.0) == "stale"
    shard.absorb(now=0.0)
    assert shard.position == 8 and not shard.acks.hole and shard.marks.read_ver["a"] == v2


def test_a_foreign_claim_in_the_hole_fences_and_nothing_after_it_is_verified() -> None:
    shard = acking_shard(claim_offset=4)
    v1 = live_write(shard, "a", "x")
    shard.own_acked([(6, ("a", v1))], now=0.0)
    assert shard.acks.hole and shard.position == 5
    assert shard.apply_record(5, events.claim(0, 2, "n2", 0.0), "n1", now=0.0) == "fenced"
    assert not shard.write_is_valid(6, 1, "n1")  # our record at 6 comes after the takeover


def test_a_record_read_before_its_acknowledgement_is_counted_once() -> None:
    shard = acking_shard(claim_offset=0)
    v1 = live_write(shard, "a", "x")
    event = {"op": "append", "sid": "a", "field": "m", "items": ["x"], "ver": v1, "at": 1.0, "node": "n1",
             "epoch": 1}
    assert shard.apply_record(1, event, "n1", now=0.0) == "own"
    shard.own_acked([(1, ("a", v1))], now=0.0)  # late: below position, ignored
    assert shard.position == 2 and not shard.acks.hole and shard.marks.dirty["a"][2] == 1


def test_deletes_are_verified_as_deleted() -> None:
    shard = acking_shard(claim_offset=0)
    live_write(shard, "a", "x")
    new, event = apply(shard.sessions["a"], {"op": "delete", "sid": "a"}, 1.0)
    event["node"], event["epoch"] = "n1", 1
    shard.commit(event, new)
    shard.own_acked([(1, ("a", 1)), (2, ("a", DELETED))], now=0.0)
    assert shard.marks.read_ver["a"] == DELETED and "a" not in shard.last_offset
    assert shard.snapshot_due(1, 60, time.monotonic()) == ["a"]  # a tombstone is due


# -- on a real broker -------------------------------------------------------------------
@pytest.fixture
def fresh_cluster(start_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return start_cluster()


def status_of(c: LocalCluster, nid: str) -> dict:
    return http_json(c.node_url(nid) + "/internal/status")[1]


async def write_foreign_claim(c: LocalCluster, shard: int, epoch: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=c.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        claim = events.claim(shard, epoch, "intruder", time.time())
        await producer.send_and_wait(c.topic, events.encode(claim), key=events.CLAIM_KEY, partition=shard)
    finally:
        await producer.stop()


def sids_on_distinct_shards(partitions: int, n: int) -> list[str]:
    out: dict[int, str] = {}
    while len(out) < n:
        sid = "ov-" + uuid.uuid4().hex[:8]
        out.setdefault(shard_of(sid, partitions), sid)
    return list(out.values())


@pytest.mark.kafka
async def test_owner_does_not_follow_its_shards_and_notices_a_claim_behind_its_back(
        fresh_cluster: LocalCluster) -> None:
    """Steady state: owned shards are not followed, `log` writes are acknowledged. A claim
    written into an owned partition behind the owner's back: the next `log` write there is
    refused (421: its record lies after the claim), and a shard nobody writes to stops
    being served within a few seconds (the end-offset check)."""
    c = fresh_cluster
    async with aiohttp.ClientSession() as http:
        api = Api(http, c.router_url)
        created: dict[str, tuple[str, int, int]] = {}
        for sid in sids_on_distinct_shards(c.partitions, c.partitions):
            status, body, headers = await api.call("POST", "/v1/sessions", {"id": sid, "data": {"m": ["first"]}},
                                                   headers={"Durability": "log"})
            assert status == 201, body
            for i in range(3):
                status, body, headers = await api.call("POST", f"/v1/sessions/{sid}/lists/m", {"items": [f"a{i}"]},
                                                       headers={"Durability": "log"})
                assert status == 200, body
            created[sid] = (headers["X-Stickystate-Owner"], int(headers["X-Stickystate-Epoch"]),
                            shard_of(sid, c.partitions))
        for nid in c.node_ids():
            st = status_of(c, nid)
            assert st["serving"], st
            assert not set(st["serving"]) & set(st["following"]), st  # owned shards are not read back
            assert set(st["standby"]) <= set(st["following"]), st

        # Two sessions of one owner: one is written to after the claim, one only read.
        owners = [o for o, _, _ in created.values()]
        owner = max(set(owners), key=owners.count)
        mine = [sid for sid, (o, _, _) in created.items() if o == owner]
        assert len(mine) >= 2, created
        written, idle = mine[0], mine[1]
        node = Api(http, c.node_url(owner))
        c.signal_node("router", signal.SIGSTOP)  # keep it from re-assigning while we talk to the node
        try:
            for sid in (written, idle):
                _, epoch, shard = created[sid]
                await write_foreign_claim(c, shard, epoch + 1)
            refused = await node.call("POST", f"/v1/sessions/{written}/lists/m", {"items": ["after-claim"]},
                                      headers={"Durability": "log"})
            assert refused[0] == 421, refused
            deadline = time.monotonic() + 15
            idle_answers = []
            while time.monotonic() < deadline:
                got = await node.call("GET", f"/v1/sessions/{idle}")
                idle_answers.append(got[0])
                if got[0] == 421:
                    break
                await asyncio.sleep(0.2)
            assert idle_answers[-1] == 421, idle_answers
            reads = status_of(c, owner)["owner_log_reads"]
            assert reads["hole"] >= 1 and reads["check"] >= 1, reads
        finally:
            c.signal_node("router", signal.SIGCONT)

        # The router gives the shards back; nothing acknowledged is missing, nothing refused appears.
        c.wait_ready()
        for sid in (written, idle):
            status, body, _ = await api.call("GET", f"/v1/sessions/{sid}")
            assert status == 200, body
            assert body["data"]["m"] == ["first", "a0", "a1", "a2"], body
