"""Several routers, one placement (router/control.py), against the real broker.

Two routers elect a placement leader through a consumer group on the placement topic;
the leader places and publishes the shard map, the follower forwards by it. The tests
kill and pause routers under load and check what a user would: no client request fails
beyond the client's own retries, nothing acknowledged is lost, the routers agree on the
map, and a change of leader moves no shard (no claim, no rebuild).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

from stickystate.client import Client
from stickystate.local_cluster import LocalCluster, http_json
from tests.helpers import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROUTERS = {"routers": 2, "nodes": 3, "leader_session_timeout_ms": 2000}


def views(c: LocalCluster) -> dict[str, dict[str, Any]]:
    out = {}
    for name in c.router_names():
        if name not in c.stopped:
            code, view = http_json(c.url_of_router(name) + "/v1/cluster")
            out[name] = view if code == 200 else {}
    return out


def leader_of(c: LocalCluster) -> str | None:
    """The router every live router names as leader, once one of them says it leads."""
    vs = views(c)
    leaders = {v.get("router", {}).get("leader") for v in vs.values()}
    roles = {name: v.get("router", {}).get("role") for name, v in vs.items()}
    if len(leaders) == 1 and (leader := leaders.pop()) in roles and roles[leader] == "leader":
        return str(leader)
    return None


def agreed(c: LocalCluster) -> bool:
    """Every live router settled on the same generation and shard map."""
    vs = list(views(c).values())
    return all(v.get("settled") for v in vs) and len({(v.get("generation"), tuple(sorted(
        (v.get("shards") or {}).items()))) for v in vs}) == 1


def recoveries(c: LocalCluster) -> int:
    """Shards acquired by the live nodes since they started (a move of a shard is one)."""
    return sum(http_json(c.node_url(n) + "/internal/status",
                         headers={"X-Stickystate-Internal": c.internal_secret} if c.internal_secret else None)[1]
               .get("recoveries_total", 0) for n in c.node_ids() if n not in c.stopped)


class Load:
    """Appends at Durability log through the client, given both router URLs and no
    direct path: every call goes through a router. Records what was acknowledged and
    every call that failed (after the client's own retries)."""

    def __init__(self, c: LocalCluster, sessions: int = 12) -> None:
        self.client = Client(c.router_urls, direct=False, durability="log")
        self.sids = [f"routers-{i}" for i in range(sessions)]
        for sid in self.sids:
            self.client.create(sid, {})
        self.acked: dict[str, list[int]] = {sid: [] for sid in self.sids}
        self.errors: list[str] = []
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            sid = self.sids[n % len(self.sids)]
            try:
                self.client.append(sid, "items", [n])
                self.acked[sid].append(n)
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                self.errors.append(f"{sid} {n}: {exc!r}")
            n += 1
            self.done = n

    def after(self, more: int) -> Callable[[], bool]:
        target = self.done + more
        return lambda: self.done >= target

    def check_nothing_lost(self) -> None:
        for sid, items in self.acked.items():
            got = self.client.get(sid)["data"]["items"]
            assert [i for i in got if i in set(items)] == items, f"{sid}: acknowledged appends missing or reordered"


def test_two_routers_agree_and_the_follower_forwards_by_the_leaders_map(start_cluster: Callable[..., LocalCluster]) -> None:
    c = start_cluster(**ROUTERS)
    wait_for(lambda: leader_of(c) is not None and agreed(c), 60, "a leader and one map")
    leader = leader_of(c)
    follower = next(n for n in c.router_names() if n != leader)
    vs = views(c)
    assert vs[follower]["router"]["role"] == "follower"
    assert vs[follower]["shards"] == vs[leader]["shards"] and set(vs[leader]["shards"].values()) == {"n1", "n2", "n3"}
    # A node dies: the leader moves its shards, and the follower forwards by the new map.
    c.kill_node("n2")
    wait_for(lambda: agreed(c) and "n2" not in views(c)[follower]["shards"].values(), 60,
             "the follower's map without n2")
    with Client(c.url_of_router(follower), direct=False) as client:
        for i in range(20):
            client.create(f"agree-{i}", {"i": i})
            assert client.get(f"agree-{i}")["data"] == {"i": i}


def test_killing_the_leader_router_under_load_fails_no_request_and_loses_nothing(
        start_cluster: Callable[..., LocalCluster]) -> None:
    c = start_cluster(**ROUTERS)
    wait_for(lambda: leader_of(c) is not None and agreed(c), 60, "a leader and one map")
    first = leader_of(c)
    assert first is not None
    owners = views(c)[first]["shards"]
    acquired = recoveries(c)
    with Load(c) as load:
        wait_for(load.after(100), 60, "load running")
        c.kill_router(first)  # kill -9
        wait_for(lambda: leader_of(c) not in (None, first), 60, "the other router leads")
        wait_for(load.after(100), 60, "load after the handover")
        c.start_router(first)
        wait_for(lambda: first in views(c) and agreed(c) and views(c)[first].get("router", {}).get("leader")
                 is not None, 60, "the restarted router follows")
        wait_for(load.after(100), 60, "load after the restart")
    print(f"leader {first} killed and restarted: {load.done} appends through two routers, "
          f"{sum(map(len, load.acked.values()))} acknowledged, {len(load.errors)} failed")
    assert load.errors == [], load.errors[:5]
    load.check_nothing_lost()
    # A change of leader is not a change of owner: the same map, no shard claimed again.
    assert all(v["shards"] == owners for v in views(c).values())
    assert recoveries(c) == acquired


def test_a_paused_leader_is_replaced_and_steps_down_when_it_resumes(start_cluster: Callable[..., LocalCluster]) -> None:
    c = start_cluster(**ROUTERS)
    wait_for(lambda: leader_of(c) is not None and agreed(c), 60, "a leader and one map")
    first = leader_of(c)
    assert first is not None
    second = next(n for n in c.router_names() if n != first)
    old_term = views_of(c, first)["router"]["term"]
    with Load(c) as load:
        wait_for(load.after(50), 60, "load running")
        c.procs[first].signal(signal.SIGSTOP)
        try:
            wait_for(lambda: views_of(c, second).get("router", {}).get("role") == "leader", 60, "the other leads")
            term = views_of(c, second)["router"]["term"]
            # While the old leader is paused a node dies: the new leader moves its shards.
            c.kill_node("n3")
            wait_for(lambda: "n3" not in views_of(c, second).get("shards", {}).values(), 60, "n3's shards moved")
        finally:
            c.procs[first].signal(signal.SIGCONT)
        # Resumed, the old leader must not place under its old term: it follows the new leader's
        # map, or (rejoining the group, it may be given the partition again) leads under a new term.
        wait_for(lambda: views_of(c, first).get("router", {}).get("term", 0) >= term > old_term and agreed(c), 60,
                 "the old leader on a later term's map")
        wait_for(load.after(50), 60, "load after the resume")
    assert "n3" not in views_of(c, first)["shards"].values() and "n3" not in views_of(c, second)["shards"].values()
    assert load.errors == [], load.errors[:5]
    load.check_nothing_lost()


def views_of(c: LocalCluster, name: str) -> dict[str, Any]:
    code, view = http_json(c.url_of_router(name) + "/v1/cluster")
    return view if code == 200 else {}


def test_a_single_router_needs_no_kafka_for_placement(start_cluster: Callable[..., LocalCluster]) -> None:
    c = start_cluster(nodes=2)
    view = views_of(c, "router")
    assert view["router"]["role"] == "single" and view["router"]["leader"] == view["router"]["id"]
    assert "--placement-kafka" not in c.procs["router"].args
