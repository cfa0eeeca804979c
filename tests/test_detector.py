"""The router's failure detector (router/detector.py), pure: the clock is an argument."""

from __future__ import annotations

import math
import random

import pytest

from stickystate.router.detector import PhiAccrual, phi


def fed(intervals: list[float], **kw: float) -> tuple[PhiAccrual, float]:
    d = PhiAccrual(**kw)
    t = 100.0
    d.heartbeat(t)
    for i in intervals:
        t += i
        d.heartbeat(t)
    return d, t


def silence_until_suspected(d: PhiAccrual, last: float, step: float = 0.001) -> float:
    t = last
    while not d.suspect(t):
        t += step
    return t - last


def test_phi_is_the_normal_tail_in_log10() -> None:
    assert phi(1.0, 1.0, 0.1) == pytest.approx(-math.log10(0.5), abs=1e-3)
    # 3 standard deviations: P = 0.00135
    assert phi(1.3, 1.0, 0.1) == pytest.approx(-math.log10(0.00135), abs=0.05)  # logistic approximation
    values = [phi(1.0 + k / 100, 1.0, 0.1) for k in range(-200, 300)]
    assert values == sorted(values) and all(v >= 0 for v in values)


def test_a_regular_node_is_suspected_soon_after_it_falls_silent() -> None:
    d, last = fed([0.1] * 50)  # probed every 0.1 s, answers at once
    assert not d.suspect(last + 0.5)
    took = silence_until_suspected(d, last)
    assert 0.52 <= took <= 0.62, took  # mean 0.1 + pause 0.1 + ~5.3 x 0.07


def test_a_busy_node_with_irregular_answers_gets_more_time() -> None:
    rng = random.Random(7)
    busy = [0.1 + rng.expovariate(1 / 0.25) for _ in range(200)]  # answers late, now and then much later
    d, last = fed(busy)
    assert max(busy) > 0.9  # it was silent longer than a regular node may be, and answered
    regular, rlast = fed([0.1] * 200)
    assert silence_until_suspected(d, last) > silence_until_suspected(regular, rlast) + 0.5


def test_before_two_answers_the_first_interval_estimate_is_used() -> None:
    d = PhiAccrual(first_interval_s=0.1, min_samples=0)
    assert d.phi(5.0) == 0.0  # never heard from: nothing to judge
    d.heartbeat(10.0)
    assert d.stats() == (0.1, 0.025)
    assert d.suspect(11.0) and not d.suspect(10.4)


def test_nobody_is_judged_before_enough_intervals_were_learned() -> None:
    d, last = fed([0.1] * 9)
    assert d.phi(last + 5) > d.threshold and not d.suspect(last + 5)
    d.heartbeat(last + 0.1)
    assert d.suspect(last + 5)


def test_forgetting_and_excusing_silence() -> None:
    d, last = fed([0.1] * 20)
    d.excuse(2.0)  # the observer stalled for 2 s: not the node's silence
    assert not d.suspect(last + 2.5)
    assert d.suspect(last + 3.0)
    d.forget_last()  # declared down: no judgement until it answers again
    assert d.phi(last + 100) == 0.0
    d.watch_from(last + 100)
    assert d.silence_s(last + 100.5) == pytest.approx(0.5)
    assert len(d.intervals) == 20  # neither the stall nor the silence was learned


def test_only_the_last_window_of_intervals_counts() -> None:
    d, last = fed([2.0] * 10 + [0.1] * 30, window=30)
    assert d.stats()[0] == pytest.approx(0.1)
    assert len(d.intervals) == 30


# -- the chaos run's count of false failovers and detection times (chaos/failovers.py) ---------

def test_a_node_down_no_fault_explains_is_a_false_failover() -> None:
    from stickystate.chaos.failovers import detection, false_failovers, node_down_events

    lines = [b'{"ts": 10.9, "level": "warning", "msg": "node down", "peer": "n1", "reason": "no answer"}',
             b'{"ts": 30.0, "level": "warning", "msg": "node down", "peer": "n2", "reason": "no answer"}',
             b'{"ts": 40.0, "level": "info", "msg": "node up", "peer": "n2"}', b"not json: node down"]
    events = node_down_events(lines)
    assert [e["node"] for e in events] == ["n1", "n2"]
    faults = [{"kind": "sigstop", "target": "n1", "t_fault": 10.0, "t_recover": 14.0, "t_ready": 16.0},
              {"kind": "kafka_kill", "target": "kafka", "t_fault": 29.0, "t_recover": 31.0, "t_ready": 35.0},
              {"kind": "sigstop", "target": "n3", "t_fault": 50.0, "t_recover": 50.5, "t_ready": 51.0}]
    report = false_failovers(events, faults)
    assert (report["count"], report["expected"]) == (1, 1)  # n2 was never hit: a broker fault excuses nothing
    assert report["examples"][0]["node"] == "n2"
    assert detection(events, faults)["sigstop"] == {"noticed": 1, "unnoticed": 1, "p50_s": 0.9, "max_s": 0.9}


def test_false_failovers_seen_by_several_routers_are_one_incident_each() -> None:
    from stickystate.chaos.failovers import false_failovers, node_down_events

    def down(ts: float, router: str, node: str, reason: str) -> bytes:
        return (f'{{"ts": {ts}, "msg": "node down", "node": "{router}", "peer": "{node}", '
                f'"reason": "{reason}"}}').encode()

    events = node_down_events([
        down(100.0, "router", "n1", "process silent: no liveness echo for 0.6s"),
        down(100.1, "router2", "n1", "no answer for 0.7s"),  # the same stall, the other router
        down(101.0, "router2", "n2", "process silent: no liveness echo for 0.6s"),  # another node
        down(110.0, "router", "n1", "no answer for 0.7s"),  # n1 again, later: a second incident
    ])
    assert [e["router"] for e in events] == ["router", "router2", "router2", "router"]
    report = false_failovers(events, [])
    assert (report["count"], report["incidents"]) == (4, 3)
    assert report["by_reason"] == {"liveness echo silent": 2, "other": 2}
