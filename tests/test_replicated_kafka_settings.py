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


def test_both_topics_refuse_unclean_leaders_and_carry_min_insync() -> None:
    specs = topic_specs(ReplicatorSettings(), min_isr=2)
    assert set(specs) == {"changes", "snapshots"}
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
