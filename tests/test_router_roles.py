"""The router's roles with several routers (router/cluster.py, router/control.py), without
Kafka: what a router does with the records the control channel reads. The election and the
topic themselves are tested against the real broker in tests/test_routers.py."""

from __future__ import annotations

import asyncio
from typing import Any

from stickystate.router.cluster import Cluster
from stickystate.router.control import term_base
from stickystate.router.placement import Placement
from stickystate.router.settings import RouterSettings

NODES = (("n1", "http://127.0.0.1:1"), ("n2", "http://127.0.0.1:2"), ("n3", "http://127.0.0.1:3"))


def cluster(**kw: Any) -> Cluster:
    return Cluster(RouterSettings(nodes=NODES, partitions=8, auth="open", placement_kafka="127.0.0.1:9",
                                  router_id="r1", **kw))


def map_doc(term: int, seq: int, nodes: tuple[str, ...], leader: str = "r2") -> dict[str, Any]:
    p = Placement(nodes, 8, 1)
    return {"generation": term_base(term) + seq, "term": term, "leader": leader, "nodes": list(nodes),
            "partitions": 8, "standbys_per_shard": p.standbys,
            "shards": {str(s): o for s, o in p.owner_map().items()},
            "standbys": {str(s): list(p.standbys_of(s)) for s in range(8)}}


def test_a_follower_forwards_by_the_newest_map_and_ignores_older_ones() -> None:
    c = cluster()
    assert c.role == "follower" and not c._settled.is_set()
    c.leader_record(3, {"router": "r2", "url": "http://r2"})
    c.map_record(map_doc(3, 2, ("n1", "n2", "n3")))
    assert c._settled.is_set() and c.generation == term_base(3) + 2
    assert set(c.placement.owner_map().values()) == {"n1", "n2", "n3"}
    c.map_record(map_doc(3, 1, ("n1",)))  # older
    assert set(c.placement.owner_map().values()) == {"n1", "n2", "n3"}
    c.leader_record(7, {"router": "r3", "url": "http://r3"})
    c.map_record(map_doc(3, 9, ("n1",)))  # a deposed leader's late map: its term is below the newest claim
    assert set(c.placement.owner_map().values()) == {"n1", "n2", "n3"}
    c.map_record(map_doc(7, 1, ("n2", "n3"), leader="r3"))
    assert set(c.placement.owner_map().values()) == {"n2", "n3"} and c.leader == "r3"
    assert c.view()["router"] == {"id": "r1", "role": "follower", "leader": "r3", "leader_url": "http://r3",
                                  "term": 7}


def test_a_map_without_nodes_is_followed_as_no_nodes() -> None:
    c = cluster()
    c.map_record(map_doc(1, 1, ()))
    assert c._settled.is_set() and c.owner(0) is None and c.generation == term_base(1) + 1


def test_a_map_for_another_partition_count_is_refused() -> None:
    c = cluster()
    doc = map_doc(1, 1, ("n1", "n2"))
    doc["partitions"] = 16
    c.map_record(doc)
    assert not c._settled.is_set() and c.generation == 0


def test_a_leader_numbers_in_its_term_and_steps_down_for_a_later_leader() -> None:
    async def run() -> None:
        c = cluster()
        c.map_record(map_doc(1, 5, ("n1", "n2", "n3"), leader="r2"))
        await c.lead(4)
        assert c.role == "leader" and c.generation == term_base(4) and c.leader == "r1"
        assert c._rebalance_wanted.is_set()
        c.leader_record(2, {"router": "r2", "url": "u"})  # an older claim: nothing changes
        assert c.role == "leader"
        c.leader_record(9, {"router": "r2", "url": "u"})
        assert c.role == "follower" and c._settled.is_set()  # forwards by the newest map meanwhile
        await c.rebalance()  # a follower never places
        assert c.generation == term_base(4)

    asyncio.run(run())


def test_a_node_refusing_a_leaders_assignment_as_stale_makes_it_step_down() -> None:
    async def run() -> None:
        c = cluster()
        await c.lead(4)
        c._refused(c.nodes["n1"], term_base(6) + 1)
        assert c.role == "follower" and c.nodes["n1"].generation == term_base(6) + 1

    asyncio.run(run())


def test_a_single_router_continues_above_a_stale_refusal() -> None:
    c = Cluster(RouterSettings(nodes=NODES, partitions=8, auth="open"))
    assert c.role == "single" and c.control is None
    c._refused(c.nodes["n2"], 41)
    assert c.role == "single" and c.generation == 41 and c._rebalance_wanted.is_set()


def test_reports_of_other_routers_make_the_leader_probe_at_once() -> None:
    async def run() -> None:
        c = cluster()
        await c.lead(2)
        node = c.nodes["n2"]
        node.healthy = True
        node.next_probe = 1e12
        c.suspect_record("r2", {"node": "n2", "reason": "connection refused"})
        assert node.suspected and node.next_probe == 0.0
        other = c.nodes["n3"]
        other.healthy, other.next_probe = True, 1e12
        c.suspect_record("r1", {"node": "n3"})  # our own report: we know already
        assert not other.suspected

    asyncio.run(run())
