"""``stickystate chaos`` / ``python -m stickystate.chaos``: workload + faults on a local cluster, then check.

Starts its own LocalCluster (Kafka from ``--kafka-bootstrap`` / KAFKA_BOOTSTRAP if set,
else its own broker, which then may also be restarted as a fault), runs the workload
and the fault schedule concurrently, lets the cluster settle, runs the checker and
writes into ``--out``:

    report.json    the checker's report (plus run parameters and the faults)
    summary.txt    the readable summary (also printed)
    faults.json    the schedule: every fault with its times
    appends.jsonl  every append: token seq, send/ack times, status, owner/epoch, list shown
    reads.jsonl    every read (and the final reads)
    cluster/       the cluster's data dir: n1.log ... router.log (and kafka/ if own broker)

Exit status: 0 pass; 1 a log-acknowledged append was lost, an order violation was found,
or a session could not be read back; 2 the run itself failed (cluster did not start ...).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from stickystate.chaos import checker, failovers, placement
from stickystate.chaos.schedule import (ALL_KINDS, BROKER_KINDS, KAFKA_KINDS, NODE_KINDS, ROUTER_KINDS, FaultSchedule,
                                        ScheduleConfig)
from stickystate.chaos.watchers import Watchers, check as watch_check, summary_line as watch_summary
from stickystate.chaos.workload import Workload, WorkloadConfig
from stickystate.crypto import write_master_keys_file
from stickystate.local_cluster import LocalCluster, http_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stickystate chaos",
                                description="Faults (kill -9, SIGSTOP, graceful restart, broker restart) under a "
                                            "unique-append workload, then an independent check against the log.")
    p.add_argument("--duration-s", type=float, default=None, help="workload duration (default 120; quick 30)")
    p.add_argument("--faults", type=int, default=None, help="minimum number of faults (default 3; quick 2)")
    p.add_argument("--seed", type=int, default=None, help="seed of the schedule and workload (default: from the clock)")
    p.add_argument("--nodes", type=int, default=3, help="node processes (default 3)")
    p.add_argument("--brokers", type=int, default=1,
                   help="own Kafka brokers (default 1); 3: a replicated KRaft cluster (topics at RF 3, "
                        "min.insync.replicas 2) whose brokers the broker_kill/broker_restart faults hit one at a time")
    p.add_argument("--routers", type=int, default=1,
                   help="routers (default 1); 2 or more elect a placement leader through Kafka, the workload "
                        "spreads over them, and router_kill/router_pause faults apply")
    p.add_argument("--standbys", type=int, default=1, help="standby replicas per shard (default 1, as the router)")
    p.add_argument("--partitions", type=int, default=16, help="shards = partitions of the changes topic (default 16)")
    p.add_argument("--sessions", type=int, default=40, help="sessions, half log, half memory (default 40)")
    p.add_argument("--rate", type=float, default=80.0, help="appends per second, all sessions (default 80)")
    p.add_argument("--read-rate", type=float, default=20.0, help="reads per second (default 20)")
    p.add_argument("--min-gap-s", type=float, default=None, help="minimum gap between faults (default 5; quick 3)")
    p.add_argument("--kinds", default=None,
                   help=f"comma list of fault kinds from {','.join(ALL_KINDS)} (default: all that apply; quick: "
                        "kill9,sigstop,graceful). Broker faults only with the run's own broker.")
    p.add_argument("--kafka-bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", ""),
                   help="use this Kafka (default: $KAFKA_BOOTSTRAP, else start one; then broker faults apply)")
    p.add_argument("--out", default=None, help="output directory (default results/chaos-<timestamp>/)")
    p.add_argument("--quick", action="store_true",
                   help="short run (~30 s of workload): a kill -9 and a SIGSTOP, then more if time permits")
    return p


def _resolve(ns: argparse.Namespace) -> None:
    ns.duration_s = ns.duration_s if ns.duration_s is not None else (30.0 if ns.quick else 120.0)
    ns.faults = ns.faults if ns.faults is not None else (2 if ns.quick else 3)
    ns.min_gap_s = ns.min_gap_s if ns.min_gap_s is not None else (3.0 if ns.quick else 5.0)
    ns.seed = ns.seed if ns.seed is not None else int(time.time() * 1000) % 1_000_000
    if ns.kinds:
        kinds = tuple(k.strip() for k in ns.kinds.split(",") if k.strip())
        bad = [k for k in kinds if k not in ALL_KINDS]
        if bad:
            raise SystemExit(f"unknown fault kinds {bad}; choose from {ALL_KINDS}")
    else:
        kinds = NODE_KINDS if ns.quick else NODE_KINDS + (BROKER_KINDS if ns.brokers > 1 else KAFKA_KINDS)
        if ns.routers > 1 and not ns.quick:
            kinds += ROUTER_KINDS
    if ns.brokers > 1:
        dropped = [k for k in kinds if k in KAFKA_KINDS]  # the whole Kafka down: that is not this run's point
        kinds = tuple(k for k in kinds if k not in KAFKA_KINDS)
        if dropped and ns.kinds:
            print(f"chaos: {ns.brokers} brokers: skipping {dropped} (use broker_kill/broker_restart)", file=sys.stderr)
    elif any(k in BROKER_KINDS for k in kinds):
        raise SystemExit("broker_kill/broker_restart need --brokers 3 (a replicated cluster)")
    if ns.routers < 2 and any(k in ROUTER_KINDS for k in kinds):
        raise SystemExit("router_kill/router_pause need --routers 2 or more")
    if ns.kafka_bootstrap:
        dropped = [k for k in kinds if k in KAFKA_KINDS + BROKER_KINDS]
        kinds = tuple(k for k in kinds if k not in KAFKA_KINDS + BROKER_KINDS)
        if dropped and ns.kinds:
            print(f"chaos: not our broker ({ns.kafka_bootstrap}): skipping {dropped}", file=sys.stderr)
    ns.kinds = kinds
    if ns.nodes < 2:
        raise SystemExit("--nodes must be >= 2 (a fault needs somewhere to fail over to)")
    if not kinds:
        raise SystemExit("no fault kinds left")
    if ns.out is None:
        ns.out = f"results/chaos-{time.strftime('%Y%m%d-%H%M%S')}"


def _write_jsonl(path: Path, rows: Any) -> None:
    with open(path, "wb") as fh:
        for r in rows:
            fh.write(orjson.dumps(r) + b"\n")


def _queues_empty(cluster: LocalCluster) -> bool:
    for nid in cluster.node_ids():
        if not cluster.procs[nid].alive():
            continue
        code, status = http_json(cluster.node_url(nid) + "/internal/status")
        if code != 200 or status.get("replication_queue", 1) != 0:
            return False
    return True


async def _settle(cluster: LocalCluster, timeout_s: float = 120.0) -> dict[str, Any]:
    """Cluster ready, and every node's replication queue empty (so the log has it all)."""
    t0 = time.time()
    info: dict[str, Any] = {}
    try:
        await asyncio.to_thread(cluster.wait_ready, timeout_s)
        info["ready_after_s"] = round(time.time() - t0, 3)
    except Exception as exc:
        info["ready_error"] = str(exc)[:2000]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if await asyncio.to_thread(_queues_empty, cluster):
            info["queues_empty"] = True
            break
        await asyncio.sleep(0.2)
    else:
        info["queues_empty"] = False
    return info


async def _run(ns: argparse.Namespace, cluster: LocalCluster, out: Path, run_id: str) -> dict[str, Any]:
    import aiohttp

    wcfg = WorkloadConfig(sessions=ns.sessions, rate=ns.rate, read_rate=ns.read_rate, seed=ns.seed, run_id=run_id)
    scfg = ScheduleConfig(seed=ns.seed, duration_s=ns.duration_s, min_faults=ns.faults, min_gap_s=ns.min_gap_s,
                          warmup_s=3.0 if ns.quick else 5.0, kinds=ns.kinds,
                          first_kinds=("kill9", "sigstop") if ns.quick else (),
                          hold_overrides={"kill9": 2.0, "sigstop": 4.0} if ns.quick else {})
    schedule = FaultSchedule(cluster, scfg)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector) as http:
        workload = Workload(cluster.router_url, wcfg, routers=cluster.router_urls)
        await workload.setup(http)
        watching = Watchers(cluster.router_urls, [s.sid for s in workload.sessions])  # chaos/watchers.py
        watching.start(http)
        print(f"chaos: {len(workload.sessions)} sessions created; workload {ns.duration_s:.0f}s, faults >= {ns.faults} "
              f"of {','.join(schedule.kinds)}, seed {ns.seed}", flush=True)
        wl_task = asyncio.create_task(workload.run(http), name="workload")
        thread = threading.Thread(target=schedule.run, name="fault-schedule", daemon=True)
        started = time.time()
        thread.start()
        hard_deadline = started + ns.duration_s + 300 + 120 * ns.faults
        seen_faults = 0
        try:
            while True:
                await asyncio.sleep(0.25)
                while seen_faults < len(schedule.faults):
                    f = schedule.faults[seen_faults]
                    print(f"chaos: t+{(f.t_fault or time.time()) - started:5.1f}s fault {f.describe()}", flush=True)
                    seen_faults += 1
                if wl_task.done():
                    break  # crashed: surfaced below
                if schedule.done and time.time() >= started + ns.duration_s:
                    break
                if time.time() > hard_deadline:
                    print("chaos: hard deadline reached, aborting the schedule", file=sys.stderr, flush=True)
                    schedule.abort()
                    break
            await asyncio.to_thread(schedule.wait, 180)
            if not wl_task.done():
                # let the last recovery be observed under load for a moment
                await asyncio.sleep(3.0)
        finally:
            schedule.abort()
            workload.stop()
            await asyncio.gather(wl_task, return_exceptions=True)
        if wl_task.exception() is not None:
            raise wl_task.exception()  # type: ignore[misc]
        workload_s = round(workload.ended_at - workload.started_at, 1)
        print(f"chaos: workload done after {workload_s}s ({len(workload.appends)} appends, "
              f"{len(workload.reads)} reads, {len(schedule.faults)} faults); settling ...", flush=True)
        settle = await _settle(cluster)
        final = await workload.read_all(http)
        caught_up = await watching.caught_up(final, 60)
        await watching.stop()
        settle2 = await _settle(cluster, 60)
        views = {name: v for name in cluster.router_names()
                 if (v := (await asyncio.to_thread(http_json, cluster.url_of_router(name) + "/v1/cluster"))[1])}
        maps = await placement.read_maps(cluster.kafka_bootstrap, f"{cluster.topic}-placement") \
            if cluster.routers > 1 else []

    # raw records first: a failing checker still leaves everything needed to look into the run
    sched = schedule.summary()
    (out / "faults.json").write_bytes(orjson.dumps(sched, option=orjson.OPT_INDENT_2))
    _write_jsonl(out / "appends.jsonl", (o.to_json() for o in workload.appends))
    _write_jsonl(out / "reads.jsonl", [o.to_json() for o in workload.reads] + [o.to_json() for o in final.values()])
    watch = {s.sid for s in workload.sessions}
    # The sealed records open with the run's master keys and its keys topic (kept with the
    # dump, the key file 0600, so `python -m stickystate.chaos.checker` can re-check offline).
    partitions, records, key_records, codec = await checker.read_sealed_log(cluster.kafka_bootstrap, cluster.topic,
                                                                            cluster.master_keys)
    checker.dump_records(out / "changes.jsonl", records)
    checker.dump_records(out / "keys.jsonl", key_records)
    write_master_keys_file(out / "master.keys", cluster.master_keys)
    (out / "sessions.json").write_bytes(orjson.dumps({"sessions": workload.durability_of, "partitions": partitions,
                                                      "topic": cluster.topic}))
    replay = checker.replay(records, partitions, watch, codec)
    report = checker.check(sessions=workload.durability_of, appends=workload.appends, reads=workload.reads,
                           final=final, log=replay, faults=sched["faults"], partitions=partitions)
    report["watch"] = watch_check(watching, workload.durability_of, workload.appends, caught_up)
    if report["watch"]["failures"]:
        report["failures"] += report["watch"]["failures"]
        report["ok"] = False
    if partitions != cluster.partitions:
        report["failures"].append(f"topic has {partitions} partitions, cluster says {cluster.partitions}")
        report["ok"] = False
    if len(schedule.faults) < ns.faults:
        report.setdefault("warnings", []).append(f"only {len(schedule.faults)} faults injected (< {ns.faults})")
    if schedule.unrecovered:
        report["schedule_unrecovered"] = schedule.unrecovered
        report.setdefault("warnings", []).append(schedule.unrecovered)
    report["run"] = {"run_id": run_id, "seed": ns.seed, "nodes": ns.nodes, "standbys": ns.standbys,
                     "partitions": cluster.partitions, "topic": cluster.topic,
                     "kafka": cluster.kafka_bootstrap, "brokers": ns.brokers,
                     "own_broker": cluster.kafka is not None or cluster.kafka_cluster is not None,
                     "duration_s": ns.duration_s, "workload_s": workload_s, "quick": ns.quick,
                     "out": str(out), "cluster_dir": str(cluster.data_dir), "settle": [settle, settle2]}
    report["workload"] = workload.summary()
    report["faults"] = sched["faults"]
    report["schedule_events"] = sched["events"]
    report["faults_injected"] = len(schedule.faults)
    if cluster.routers > 1:
        report["placement"] = placement.agreement(placement.followed_maps(maps), replay.claims, partitions, views)
        if not report["placement"]["routers_agree"]:
            report["failures"].append("the routers' maps disagree after the run")
            report["ok"] = False
        if report["placement"]["unexplained_claims"]:
            report.setdefault("warnings", []).append("claims that match no ownership change (shard: count): "
                                                     f"{report['placement']['unexplained_claims']}")
    lines: list[bytes] = []
    for name in cluster.router_names():  # every router's: a follower also stops routing to a node it finds dead
        router_log = cluster.procs[name].log_path
        lines += router_log.read_bytes().splitlines() if router_log.exists() else []
    events = failovers.node_down_events(lines)
    report["false_failovers"] = failovers.false_failovers(events, sched["faults"], end=time.time())
    report["detection"] = failovers.detection(events, sched["faults"])
    if report["false_failovers"]["count"]:
        report.setdefault("warnings", []).append(f"{report['false_failovers']['count']} false failovers")

    return report


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally that stops the cluster


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    _resolve(ns)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:6]
    topic = f"changes-chaos-{run_id}" if ns.kafka_bootstrap else "changes"
    cluster = LocalCluster(out / "cluster", nodes=ns.nodes, partitions=ns.partitions, standbys=ns.standbys,
                           kafka_bootstrap=ns.kafka_bootstrap, topic=topic, brokers=ns.brokers, routers=ns.routers,
                           leader_session_timeout_ms=0 if ns.kafka_bootstrap else 3000)
    print(f"chaos: starting {ns.nodes} nodes + {ns.routers} router{'s' if ns.routers > 1 else ''}"
          + ("" if ns.kafka_bootstrap else f" + Kafka ({ns.brokers} broker{'s' if ns.brokers > 1 else ''})")
          + f" in {cluster.data_dir} ...", flush=True)
    t0 = time.time()
    try:
        try:
            cluster.start()
        except Exception as exc:
            print(f"chaos: cluster did not start: {exc}", file=sys.stderr, flush=True)
            return 2
        print(f"chaos: cluster up in {time.time() - t0:.1f}s (routers {','.join(cluster.router_urls)}, Kafka "
              f"{cluster.kafka_bootstrap}, topic {cluster.topic})", flush=True)
        try:
            report = asyncio.run(_run(ns, cluster, out, run_id))
        except Exception:
            err = traceback.format_exc()
            (out / "error.txt").write_text(err)
            print(f"chaos: run failed:\n{err}", file=sys.stderr, flush=True)
            return 2
    finally:
        cluster.stop()
    report["run"]["total_s"] = round(time.time() - t0, 1)
    text = checker.summary_text(report)
    if "watch" in report:
        text += "\n" + watch_summary(report["watch"])
    if "placement" in report:
        text += "\n" + placement.summary_line(report["placement"])
    (out / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
                                                   default=str))
    (out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    print(f"chaos: report in {out / 'report.json'}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
