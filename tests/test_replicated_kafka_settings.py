"""The replicated-Kafka settings without a broker: what replication factor and
min.insync.replicas the nodes create topics with, the quorum a LocalKafkaCluster would
run, the chaos options for broker faults and the write-outage figure of the report.
(tests/test_brokers3.py runs them against three real brokers.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from stickystate.chaos import checker
from stickystate.chaos.cli import _resolve, build_parser
from stickystate.chaos.schedule import BROKER_KINDS, KAFKA_KINDS, NODE_KINDS
from stickystate.chaos.workload import Observation
from stickystate.kafka_cluster import LocalKafkaCluster
from stickystate.replicator.settings import ReplicatorSettings
from stickystate.replicator.topics import replication, topic_specs


@pytest.mark.parametrize(("brokers", "rf", "min_isr", "want"), [
    (1, 0, 0, (1, 1)), (2, 0, 0, (2, 1)), (3, 0, 0, (3, 2)), (5, 0, 0, (3, 2)),
    (5, 5, 0, (5, 2)), (3, 3, 3, (3, 3)), (1, 3, 2, (3, 2)),  # asked for: Kafka refuses it with one broker
])
def test_replication_defaults_follow_the_broker_count(brokers: int, rf: int, min_isr: int,
                                                      want: tuple[int, int]) -> None:
    assert replication(ReplicatorSettings(replication_factor=rf, min_insync_replicas=min_isr), brokers) == want


def test_every_topic_refuses_unclean_leaders_and_carries_min_insync() -> None:
    specs = topic_specs(ReplicatorSettings(), min_isr=2)
    assert set(specs) == {"changes", "snapshots", "keys"}  # keys: the sessions' data keys (issue 14)
    for configs in specs.values():
        assert configs["min.insync.replicas"] == "2" and configs["unclean.leader.election.enable"] == "false"


@pytest.mark.parametrize("bad", [dict(replication_factor=-1), dict(min_insync_replicas=-1),
                                 dict(replication_factor=2, min_insync_replicas=3)])
def test_bad_replication_settings_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ReplicatorSettings(**bad)  # type: ignore[arg-type]


def test_a_three_broker_cluster_is_one_static_quorum(tmp_path: Path) -> None:
    kc = LocalKafkaCluster(tmp_path, brokers=3)  # not started
    props = [n.server_properties() for n in kc.nodes]
    assert [p["node.id"] for p in props] == [1, 2, 3]
    voters = {p["controller.quorum.voters"] for p in props}
    assert len(voters) == 1
    assert sorted(v.split("@")[0] for v in voters.pop().split(",")) == ["1", "2", "3"]
    assert len({n.port for n in kc.nodes} | {n.controller_port for n in kc.nodes}) == 6
    for p in props:
        assert (p["default.replication.factor"], p["min.insync.replicas"]) == (3, 2)
        assert p["unclean.leader.election.enable"] == "false" and p["offsets.topic.replication.factor"] == 3
    assert kc.bootstrap.split(",") == [n.bootstrap for n in kc.nodes]
    assert not kc.is_running()


def _resolved(*args: str) -> argparse.Namespace:
    ns = build_parser().parse_args(list(args))
    _resolve(ns)
    return ns


def test_chaos_with_three_brokers_hits_one_broker_at_a_time() -> None:
    assert _resolved("--brokers", "3").kinds == NODE_KINDS + BROKER_KINDS
    assert _resolved("--brokers", "3", "--kinds", "kafka_kill,broker_kill").kinds == ("broker_kill",)
    assert _resolved().kinds == NODE_KINDS + KAFKA_KINDS
    with pytest.raises(SystemExit):
        _resolved("--kinds", "broker_kill")  # one broker: no replicated cluster to hit
    assert _resolved("--brokers", "3", "--kafka-bootstrap", "k:9092", "--kinds", "kill9,broker_kill").kinds == ("kill9",)


def _append(sent: float, done: float, ok: bool) -> Observation:
    o = Observation("append", "s", sent, seq=1)
    o.done = done
    o.status = 200 if ok else 503
    return o


def test_write_outage_runs_from_the_first_failure_to_the_next_success() -> None:
    appends = [_append(9.0, 9.5, True), _append(10.2, 10.4, False), _append(10.5, 11.0, False),
               _append(11.1, 11.9, True), _append(12.0, 12.1, True)]
    assert checker.write_gap(appends, t_fault=10.0, window_end=20.0) == pytest.approx(1.5)
    assert checker.write_gap(appends[:1] + appends[3:], t_fault=10.0, window_end=20.0) == 0.0
    assert checker.write_gap(appends[:3], t_fault=10.0, window_end=20.0) is None


def test_the_active_controller_is_the_running_node_whose_last_raft_state_is_leader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kc = LocalKafkaCluster(tmp_path, brokers=3)
    line = "[2026-12-02 07:{t},000] INFO [RaftManager id={i}] Completed transition to {s}(epoch=1) (x)\n"
    logs = {1: [("17:22", "Leader"), ("21:38", "ResignedState"), ("21:40", "FollowerState")],
            2: [("17:20", "FollowerState"), ("21:19", "Leader")],
            3: [("17:20", "FollowerState")]}
    for i, states in logs.items():
        kc.node(i).log_file.parent.mkdir(parents=True, exist_ok=True)
        kc.node(i).log_file.write_text("".join(line.format(t=t, i=i, s=s) for t, s in states))
    running = {1, 2, 3}
    for n in kc.nodes:
        monkeypatch.setattr(n, "is_running", lambda n=n: n.node_id in running)
    assert kc.active_controller() == 2
    running.discard(2)  # killed: its log still says Leader, but it is not running
    assert kc.active_controller() is None


def test_outages_are_reported_apart_for_a_killed_controller() -> None:
    base = {"kind": "broker_kill", "t_ready": 12.0, "t_recover": 11.0, "shards": [0], "hold_s": 1.0}
    faults = [dict(base, index=1, target="kafka1", t_fault=10.0, detail="active controller"),
              dict(base, index=2, target="kafka2", t_fault=30.0, t_ready=32.0)]
    appends = [_append(9.0, 13.0, True), _append(29.5, 30.5, True)]
    for o in appends:
        o.sid = "cxr-000-L"
    rep = checker._failover({"cxr-000-L": "log"}, appends, [], checker._faults(faults), partitions=1)
    assert rep["log_outage_per_kind"]["broker_kill (active controller)"]["max_s"] == pytest.approx(3.0)
    assert rep["log_outage_per_kind"]["broker_kill"]["max_s"] == pytest.approx(0.5)
    assert [f["fault"] for f in rep["per_fault"]] == ["#1 broker_kill kafka1 (active controller)", "#2 broker_kill kafka2"]
