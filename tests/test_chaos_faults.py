"""The chaos schedule's fault actions, without a cluster: each kind does its fault, holds,
then recovers the same target; a pause is resumed even when the hold is cut short (a
stopped process must not outlive the run), a kill is not restarted then."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from stickystate.chaos.schedule import Fault, FaultSchedule, ScheduleConfig


class FakeProc:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def signal(self, sig: int) -> None:
        self.calls.append(f"{signal.Signals(sig).name} {self.name}")

    def stop(self) -> None:
        self.calls.append(f"stop {self.name}")

    def alive(self) -> bool:
        return True


class FakeCluster:
    """What FaultSchedule touches of a LocalCluster: actions are recorded, the view is settled."""

    kafka = None
    kafka_cluster = None
    routers = 2

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.procs = {n: FakeProc(n, self.calls) for n in ("n1", "n2", "router", "router2")}

    def node_ids(self) -> list[str]:
        return ["n1", "n2"]

    def is_router(self, name: str) -> bool:
        return name.startswith("router")

    def cluster_view(self) -> dict[str, Any]:
        return {"shards": {"0": "n1", "1": "n2"}, "generation": 7, "settled": True, "router": {"leader": "router"},
                "nodes": [{"id": n, "healthy": True, "generation": 7} for n in self.node_ids()]}

    def wait_ready(self, timeout_s: float) -> None:
        pass

    def kill_node(self, n: str) -> None:
        self.calls.append(f"kill {n}")

    def restart_node(self, n: str) -> None:
        self.calls.append(f"restart {n}")

    def signal_node(self, n: str, sig: int) -> None:
        self.procs[n].signal(sig)

    def kill_router(self, n: str) -> None:
        self.calls.append(f"kill {n}")

    def start_router(self, n: str) -> None:
        self.calls.append(f"start {n}")


def schedule(cluster: FakeCluster) -> FaultSchedule:
    return FaultSchedule(cluster, ScheduleConfig(kinds=("kill9", "sigstop", "graceful", "router_kill", "router_pause")))  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "target", "calls"), [
    ("kill9", "n1", ["kill n1", "restart n1"]),
    ("sigstop", "n2", ["SIGSTOP n2", "SIGCONT n2"]),
    ("graceful", "n1", ["stop n1", "restart n1"]),
    ("router_kill", "router", ["kill router", "start router"]),
    ("router_pause", "router2", ["SIGSTOP router2", "SIGCONT router2"]),
])
def test_each_fault_hits_its_target_then_recovers_it_in_order(kind: str, target: str, calls: list[str]) -> None:
    cluster = FakeCluster()
    sched = schedule(cluster)
    f = Fault(0, kind, target, hold_s=0.0)
    sched._inject(f)
    assert cluster.calls == calls
    assert f.error is None, f.error
    assert f.t_fault <= (f.t_fault_done or 0) <= (f.t_recover or 0) <= (f.t_recovered or 0) <= (f.t_ready or 0)
    assert f.detail == ("placement leader" if target == "router" else "")


class CutShort:
    def wait(self, timeout: float | None = None) -> bool:
        raise KeyboardInterrupt


@pytest.mark.parametrize(("kind", "target", "calls"), [
    ("sigstop", "n1", ["SIGSTOP n1", "SIGCONT n1"]),
    ("router_pause", "router", ["SIGSTOP router", "SIGCONT router"]),
    ("kill9", "n1", ["kill n1"]),
])
def test_a_pause_is_resumed_when_the_hold_is_cut_short_a_kill_is_left(kind: str, target: str,
                                                                     calls: list[str]) -> None:
    cluster = FakeCluster()
    sched = schedule(cluster)
    sched._abort = CutShort()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        sched._inject(Fault(0, kind, target, hold_s=5.0))
    assert cluster.calls == calls
