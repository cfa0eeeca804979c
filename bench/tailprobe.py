"""Where do the late answers come from? A diagnostic, not part of the benchmark.

Starts a 2-node cluster with its router (Kafka: $KAFKA_BOOTSTRAP, else a local broker),
seeds sessions, then runs fixed-rate write-heavy steps (turns with Prefer:
return=minimal, as the benchmark does), alternating between the systems given:

- ``router``       through the router (which adds an Idempotency-Key to every write)
- ``direct``       straight to the owning node
- ``direct-idem``  straight to the node, every turn with its own Idempotency-Key

For every request it records the intended send time and the completion time
(CLOCK_MONOTONIC, comparable with timestamps logged by other processes), and per step
the kernel's TCP counters (nstat), the servers' CPU per request, and groups of late
answers (over ``--late-ms``). With ``--gc-log`` every server logs its cyclic-GC passes
(bench/gcprobe/sitecustomize.py) and each step reports the nodes' full passes (count,
CPU, objects tracked) and the share of late answers outstanding while a node was in a
pass of 10 ms or more. Each system gets a fresh cluster only if run on its own.

    python -m stickystate.bench.tailprobe --systems router,direct --rate 1300 --seconds 10 --rounds 3 --gc-log
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from stickystate.bench import loadgen
from stickystate.protocol import shard_of
from stickystate.local_cluster import LocalCluster


def nstat() -> dict[str, int]:
    out = subprocess.run(["nstat", "-az"], capture_output=True, text=True).stdout
    vals = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            vals[parts[0]] = int(parts[1])
    return vals


INTERESTING = ("TcpRetransSegs", "TcpExtTCPLostRetransmit", "TcpExtTCPTimeouts", "TcpExtListenOverflows",
               "TcpExtListenDrops", "TcpExtTCPSynRetrans", "TcpExtTCPDelivered", "TcpExtDelayedACKs",
               "TcpExtTCPFastRetrans", "TcpExtTCPSlowStartRetrans", "TcpExtTCPBacklogDrop", "TcpExtTCPRcvQDrop",
               "TcpExtTCPZeroWindowDrop", "TcpExtPruneCalled", "TcpExtTCPOFOQueue", "TcpExtTCPSpuriousRTOs",
               "TcpActiveOpens", "TcpPassiveOpens", "IpExtInNoRoutes", "TcpExtTCPDSACKRecv",
               "TcpExtTCPLossProbes", "TcpExtTCPAbortOnData", "TcpOutRsts")


class TracingWorker(loadgen.Worker):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.trace: list[tuple[float, float, int]] = []
        self.sent_at: dict[int, float] = {}

    idem = False  # direct-idem: every turn carries its own Idempotency-Key (as the router adds one)

    def _request(self, method: bytes, path: bytes, target: int, body: bytes | None, extra: bytes | None = None) -> bytes:
        if self.idem and method == b"POST" and path != b"/v1/sessions":
            extra = (self.extra_headers if extra is None else extra) + b"Idempotency-Key: probe-%d\r\n" % self.counter
        return super()._request(method, path, target, body, extra)

    def build(self, op: int, idx: int, intended: float) -> loadgen.Req:
        req = super().build(op, idx, intended)
        self.sent_at[req.n] = time.monotonic()
        return req

    def complete(self, req: loadgen.Req, status: int, nbytes: int, body: bytes) -> None:
        if self.stats is not None:
            self.trace.append((req.intended, time.monotonic(), status, self.sent_at.pop(req.n, 0.0)))
        super().complete(req, status, nbytes, body)

    def fail(self, req: loadgen.Req, why: str) -> None:
        if self.stats is not None:
            self.trace.append((req.intended, time.monotonic(), -1, self.sent_at.pop(req.n, 0.0)))
        super().fail(req, why)


def groups(trace: list[tuple[float, float, int]], late_s: float) -> list[dict[str, Any]]:
    late = sorted((t0, t1) for t0, t1, *_ in trace if t1 - t0 > late_s)
    out: list[dict[str, Any]] = []
    for t0, t1 in late:
        if out and t0 - out[-1]["last_sent"] < 0.05:
            g = out[-1]
            g["n"] += 1
            g["last_sent"] = t0
            g["max_ms"] = max(g["max_ms"], (t1 - t0) * 1e3)
            g["last_done"] = max(g["last_done"], t1)
        else:
            out.append({"first_sent": t0, "last_sent": t0, "n": 1, "max_ms": (t1 - t0) * 1e3,
                        "first_done": t1, "last_done": t1})
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(vals: list[float], p: float) -> float:
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(len(vals) * p))] if vals else float("nan")


async def run(args: argparse.Namespace, cluster: LocalCluster, out_dir: Path) -> None:
    view = cluster.cluster_view()
    urls = {n["id"]: n["url"] for n in view["nodes"]}
    node_ids = sorted(urls)
    index = {nid: i for i, nid in enumerate(node_ids)}
    owners = view["shards"]
    hp = lambda u: (u.split("://")[1].rsplit(":", 1)[0], int(u.rsplit(":", 1)[1]))  # noqa: E731
    workers: dict[str, TracingWorker] = {}
    for via in args.systems:
        sids = [f"{via}-{uuid.uuid4().hex[:6]}-{i}" for i in range(args.sessions)]
        if via == "router":
            targets, target_of = [hp(cluster.router_url)], [0] * len(sids)
        else:
            targets = [hp(urls[n]) for n in node_ids]
            target_of = [index[owners[str(shard_of(s, int(view["partitions"])))]] for s in sids]
        cfg = {"wid": 0, "kind": "sticky", "targets": targets, "sessions": list(zip(sids, target_of)),
               "window": 50, "msg_bytes": 300, "durability": None, "max_conns": 256, "check_every": 50,
               "seed": 1, "ttl_s": 3600, "turn_response": "minimal"}
        w = TracingWorker(cfg)
        w.idem = via == "direct-idem"
        await w.setup()
        seeded = await w.seed(32)
        print(f"{via}: seeded {seeded['ok']}/{len(sids)}", flush=True)
        workers[via] = w
    # warm-up (Kafka JIT, connection pools)
    for via, w in workers.items():
        await w.step({"rate": 300, "duration": args.warmup_s, "read_frac": 0.0, "drain_s": 2.0,
                      "start_at": time.monotonic() + 0.2, "prewarm": 16})
    summary = []
    for rnd in range(args.rounds):
        for via in args.systems:
            w = workers[via]
            w.trace = []
            n0 = nstat()
            pids = {n: p.pid for n, p in cluster.procs.items()}
            c0 = {n: cpu_s(pid) for n, pid in pids.items()}
            spy = None
            if args.py_spy and rnd == args.rounds - 1 and via == "router":
                spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                                        str(pids["router"]), "--rate", "200", "--format", "raw", "--nonblocking",
                                        "--output", str(out_dir / f"router-{via}.collapsed"), "--duration",
                                        str(int(args.seconds))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t_start = time.monotonic() + 0.3
            res = await w.step({"rate": args.rate, "duration": args.seconds, "read_frac": 0.0,
                                "drain_s": 3.0, "start_at": t_start, "prewarm": 16})
            n1 = nstat()
            cpu = {n: round((cpu_s(pid) - c0[n]) / max(1, len(w.trace)) * 1e6, 1) for n, pid in pids.items()}
            if spy is not None:
                spy.wait()
            lat = [(t1 - t0) * 1e3 for t0, t1, *_ in w.trace]
            d = {k: n1.get(k, 0) - n0.get(k, 0) for k in INTERESTING if n1.get(k, 0) - n0.get(k, 0)}
            gs = groups(w.trace, args.late_ms / 1e3)
            row = {"round": rnd, "via": via, "rate": args.rate, "n": len(lat), "errors": res["errors"],
                   "p50": round(pct(lat, 0.5), 2), "p90": round(pct(lat, 0.9), 2), "p99": round(pct(lat, 0.99), 2),
                   "max": round(max(lat), 1) if lat else None, "late": sum(1 for v in lat if v > args.late_ms),
                   "conns": res["conns"], "cpu_us_per_req": cpu, "lag_p99": res["dispatch_lag_ms"]["p99"], "nstat": d,
                   "groups": [{"at_s": round(g["first_sent"] - t_start, 3), "n": g["n"],
                               "max_ms": round(g["max_ms"], 1),
                               "first_sent": round(g["first_sent"], 4), "last_done": round(g["last_done"], 4)}
                              for g in gs]}
            row["node_gc"] = gc_summary(out_dir, w.trace, args.late_ms / 1e3)
            summary.append(row)
            short = {k: v for k, v in row.items() if k != "groups"}
            short["late_groups"] = len(gs)
            short["biggest_groups"] = sorted(row["groups"], key=lambda g: -g["n"])[:3]
            print(json.dumps(short), flush=True)
            (out_dir / f"trace-{via}-{rnd}.json").write_text(json.dumps(w.trace))
            await asyncio.sleep(1.0)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


GC_PROBE = Path(__file__).with_name("gcprobe")


def gc_env(prefix: Path, enabled: bool) -> dict[str, str]:
    """With --gc-log, the servers log their GC passes (bench/gcprobe/sitecustomize.py)."""
    if not enabled:
        return {}
    return {"PYTHONPATH": str(GC_PROBE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "STICKYSTATE_GC_LOG": str(prefix)}


def gc_passes(out_dir: Path, pattern: str) -> list[list[float]]:
    rows = []
    for f in out_dir.glob(pattern):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line]
    return sorted(rows)


def gc_summary(out_dir: Path, trace: list[tuple[float, ...]], late_s: float) -> dict[str, Any]:
    """The nodes' GC passes during a step, and how many late answers were outstanding during one."""
    if not trace:
        return {}
    lo, hi = min(t[0] for t in trace), max(t[1] for t in trace)
    passes = [r for r in gc_passes(out_dir, "gc-node.*") if lo <= r[0] <= hi]
    slow = [(r[0], r[0] + r[1] / 1e3) for r in passes if r[1] >= 10]
    late = [t for t in trace if t[1] - t[0] > late_s]
    hit = sum(1 for t in late if any(a <= t[1] and b >= t[0] for a, b in slow))
    full = [r for r in passes if r[2] == 2]
    return {"full_passes": len(full), "full_wall_ms": round(sum(r[1] for r in full)),
            "full_cpu_ms_max": max((r[5] for r in full), default=0),
            "tracked_max": max((r[4] for r in full), default=0),
            "late_during_slow_pass_pct": round(100 * hit / len(late)) if late else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1300)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--late-ms", type=float, default=20)
    ap.add_argument("--warmup-s", type=float, default=5)
    ap.add_argument("--systems", default="router,direct")
    ap.add_argument("--out", default="")
    ap.add_argument("--gc-log", action="store_true", help="the servers log their GC passes (bench/gcprobe)")
    ap.add_argument("--repl-off", action="store_true", help="nodes without replication (no Kafka needed)")
    ap.add_argument("--py-spy", action="store_true", help="py-spy record the router during the last round")
    ap.add_argument("--kafka-bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", ""))
    args = ap.parse_args()
    args.systems = args.systems.split(",")
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="tailprobe-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"out: {out_dir}", flush=True)
    kafka = None
    bootstrap = args.kafka_bootstrap
    if not bootstrap and not args.repl_off:
        from stickystate.kafka_local import LocalKafka, ensure_jars

        ensure_jars()
        kafka = LocalKafka(out_dir / "kafka", log_file=out_dir / "kafka.log")
        kafka.start()
        bootstrap = kafka.bootstrap
    cluster = LocalCluster(out_dir / "cluster", nodes=2, partitions=64, kafka_bootstrap=bootstrap,
                           topic=f"probe-{uuid.uuid4().hex[:8]}",
                           router_env=gc_env(out_dir / "gc-router", args.gc_log),
                           node_env={**gc_env(out_dir / "gc-node", args.gc_log),
                                     **({"STICKYSTATE_REPLICATION": "off"} if args.repl_off else {})})
    cluster.start()
    print("pids: " + json.dumps({n: p.pid for n, p in cluster.procs.items()}), flush=True)
    try:
        import uvloop

        uvloop.run(run(args, cluster, out_dir))
    finally:
        cluster.stop()
        if kafka is not None:
            kafka.stop()


if __name__ == "__main__":
    sys.exit(main())
