"""Chaos smoke test: the quick chaos run (kill -9 and SIGSTOP under a unique-append
workload) passes the independent checker; plus the checker's own fencing replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from array import array
from pathlib import Path

import orjson
import pytest

from stickystate.chaos.checker import Record, check, replay, shard_of
from stickystate.chaos.workload import Observation

REPO = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT_S = 120


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(QUICK_TIMEOUT_S + 60)
def test_quick_chaos_run_loses_no_log_acknowledged_append_and_keeps_order(
        tmp_path: Path, kafka_bootstrap: str) -> None:
    out = tmp_path / "chaos"
    env = dict(os.environ, KAFKA_BOOTSTRAP=kafka_bootstrap)  # shared broker: no broker restarts
    proc = subprocess.Popen([sys.executable, "-m", "stickystate.chaos", "--quick", "--seed", "11", "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=QUICK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the run stops its cluster on SIGTERM
        try:
            output, _ = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"quick chaos run did not finish in {QUICK_TIMEOUT_S}s:\n{output[-4000:]}")

    report_path = out / "report.json"
    assert report_path.exists(), f"no report (exit {proc.returncode}):\n{output[-4000:]}"
    rep = json.loads(report_path.read_text())
    summary = (out / "summary.txt").read_text()
    assert rep["lost_acked"]["log"] == 0, summary
    assert rep["order_violations"]["count"] == 0, summary
    assert rep["phantoms"]["count"] == 0, summary
    assert not rep["final_reads_failed"], summary
    # the checker checked something real
    assert rep["appends"]["attempted"]["total"] > 0
    assert rep["appends"]["acknowledged"]["log"] > 0 and rep["appends"]["acknowledged"]["memory"] > 0
    assert rep["faults_injected"] >= 2, summary
    kinds = [f["kind"] for f in rep["faults"]]
    assert kinds[:2] == ["kill9", "sigstop"], kinds
    assert not any(k.startswith("kafka") for k in kinds), "the shared broker must not be restarted"
    assert rep["log"]["records"] > rep["appends"]["acknowledged"]["log"]
    assert rep["log_vs_router"]["compared"] == rep["workload"]["sessions"]
    # every session was watched through the faults: nothing acknowledged at `log` went unseen,
    # no duplicate, no silent gap (resets are allowed: announced, with their cause)
    watch = rep["watch"]
    assert watch["watchers"] == rep["workload"]["sessions"] and watch["events"] > 0, summary
    assert watch["lost"]["log"] == 0 and watch["duplicates"] == 0 and watch["order_violations"] == 0, summary
    assert watch["caught_up"], summary
    assert watch["streams"] > watch["watchers"], summary  # the faults ended streams and they resumed
    assert rep["failover"]["samples"] > 0
    assert proc.returncode == 0, f"{summary}\n{output[-2000:]}"


# -- the checker's own replay: fencing, duplicates, reconstruction (no broker) -------------
def _rec(p: int, o: int, key: bytes, ev: dict) -> Record:
    return Record(p, o, key, orjson.dumps(ev))


def test_checker_replay_applies_fencing_and_drops_duplicates() -> None:
    P = 4
    sid = "cxT-000-L"
    p = shard_of(sid, P)
    k = sid.encode()

    def app(seq: int, ver: int, node: str, epoch: int) -> dict:
        return {"op": "append", "sid": sid, "field": "items", "items": [f"{sid}:{seq}"], "max_len": None,
                "ver": ver, "at": 0.0, "node": node, "epoch": epoch}

    evs = [
        (b"#claim", {"op": "claim", "shard": p, "epoch": 1, "node": "n1", "at": 0}),
        (k, {"op": "create", "sid": sid, "data": {"items": []}, "ttl_s": 60, "ver": 1, "at": 0, "node": "n1",
             "epoch": 1}),
        (k, app(1, 2, "n1", 1)),
        (k, app(2, 3, "n2", 1)),                      # right epoch, wrong node: does not count
        (b"#claim", {"op": "claim", "shard": p, "epoch": 2, "node": "n2", "at": 0}),
        (k, app(3, 3, "n1", 1)),                      # fenced: written by the old owner after the claim
        (k, app(4, 3, "n2", 2)),
        (k, app(4, 3, "n2", 2)),                      # re-send: duplicate by version
        (b"#claim", {"op": "claim", "shard": p, "epoch": 2, "node": "n3", "at": 0}),  # not higher: stale
        (k, app(5, 4, "n3", 2)),                      # under the stale claim: does not count
        (k, app(6, 4, "n2", 2)),
    ]
    log = replay([_rec(p, i, key, ev) for i, (key, ev) in enumerate(evs)], P, {sid})
    assert log.sessions[sid] == {"version": 4, "data": {"items": [f"{sid}:1", f"{sid}:4", f"{sid}:6"]}}
    assert log.stats["fenced_events"] == 3 and log.stats["duplicate_events"] == 1
    assert log.stats["claims_effective"] == 2 and log.stats["claims_stale"] == 1
    assert [e.verdict for e in log.token_events[(sid, 3)]] == ["fenced"]
    assert not log.anomalies

    # an acked token that only a fenced event carries is lost; an out-of-order read is flagged
    appends = []
    for seq in range(1, 7):
        o = Observation("append", sid, float(seq), seq=seq, done=seq + 0.5, status=200)
        o.seqs, o.foreign = array("l", range(1, seq + 1)), []
        appends.append(o)
    read = Observation("read", sid, 10.0, done=10.1, status=200)
    read.seqs, read.foreign = array("l", [1, 4, 2]), []
    final = Observation("final", sid, 20.0, done=20.1, status=200, version=4)
    final.seqs, final.foreign = array("l", [1, 4, 6]), []
    rep = check(sessions={sid: "log"}, appends=appends, reads=[read], final={sid: final}, log=log, faults=[],
                partitions=P)
    assert rep["lost_acked"]["log"] == 3  # seqs 2, 3, 5
    assert rep["order_violations"]["by_source"] == {"read": 1}
    assert rep["log_vs_router"]["agree"] == 1
    assert not rep["ok"]
