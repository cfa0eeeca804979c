"""Orchestration: start each system under test, seed sessions, sweep arrival rates.

Environments are started one at a time, so only the system being measured (plus the
load generator) uses the machine's cores:

- ``redis``   redis-server (no persistence) + the baseline server (naive, then atomic)
- ``client``  the client-side-state server
- ``cluster`` Kafka + stickystate nodes + router (replication on): router, direct (the
              Python client, ``AsyncClient``), direct-raw (the load generator's own
              placement-aware raw HTTP), direct-raw with ``Durability: log``
- ``cluster-off`` nodes with ``STICKYSTATE_REPLICATION=off`` + router: direct-raw
- ``cluster-plain`` nodes with ``STICKYSTATE_ENCRYPTION=off`` + router: direct-raw (what
              sealing every record under its session's key costs: direct-plain vs direct-raw)

Kafka (when needed) is started once, after the baselines ran, and shared by both
clusters (each cluster gets its own topic).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stickystate.bench import loadgen
from stickystate.bench import jfr
from stickystate.bench import profile as pyspy
from stickystate.bench.procs import CpuMeter, HiccupMeter, RedisServer, ServerGroup
from stickystate.protocol import shard_of
from stickystate.local_cluster import LocalCluster


@dataclass(frozen=True)
class SystemDef:
    name: str
    label: str
    kind: str  # sticky | redis | client  (request shapes the generator builds)
    env: str  # redis-naive | redis-atomic | client | cluster | cluster-off | cluster-plain
    via: str  # router | client (AsyncClient, straight to the owner) | direct (raw, straight to the owner) | server
    durability: str | None = None


SYSTEMS: dict[str, SystemDef] = {s.name: s for s in (
    SystemDef("router", "stickystate via router", "sticky", "cluster", "router"),
    SystemDef("direct", "stickystate straight to node, through stickystate.client.AsyncClient", "sticky", "cluster",
              "client"),
    SystemDef("direct-raw", "straight to node, the load generator's raw HTTP", "sticky", "cluster", "direct"),
    SystemDef("redis-naive", "aiohttp + Redis, GET/SET read-modify-write", "redis", "redis-naive", "server"),
    SystemDef("redis-atomic", "aiohttp + Redis, Lua script (atomic)", "redis", "redis-atomic", "server"),
    SystemDef("client-side", "client-side state (whole history each turn)", "client", "client", "server"),
    SystemDef("direct-log", "straight to node, Durability: log", "sticky", "cluster", "direct", "log"),
    SystemDef("direct-repl-off", "straight to node, replication off", "sticky", "cluster-off", "direct"),
    SystemDef("direct-plain", "straight to node, encryption off", "sticky", "cluster-plain", "direct"),
)}
# A profile step lasts at least this long: JFR samples each running broker thread every 10-20 ms,
# and a 3 s step gave it a few dozen samples.
PROFILE_MIN_STEP_S = 10.0
MAIN_SYSTEMS = ("router", "direct", "direct-raw", "redis-naive", "redis-atomic", "client-side")
# the replication cost: the same raw requests at three durabilities
REPLICATION_SYSTEMS = ("direct-repl-off", "direct-raw", "direct-log", "direct-plain")
ENV_ORDER = ("redis-naive", "redis-atomic", "client", "cluster", "cluster-plain", "cluster-off")

# read fraction of each named mix; a "turn" reads the state and appends one message
MIXES = {"write-heavy": 0.0, "read-heavy": 0.9, "mixed": 0.5}


@dataclass
class Config:
    out: Path
    systems: list[str]
    mixes: list[str]
    replication_mixes: list[str]
    sessions: int = 1000
    window: int = 50
    msg_bytes: int = 300
    nodes: int = 2
    partitions: int = 64
    server_procs: int = 2
    gen_procs: int = 1
    max_conns: int = 256
    rates: list[float] = field(default_factory=list)
    step_s: float = 4.0
    drain_s: float = 3.0
    pause_s: float = 0.5
    warmup_s: float = 2.0
    warmup_rate: float = 300.0
    kafka_warmup_s: float = 10.0  # extra warm-up of the first system on a fresh Kafka
    refine: int = 2
    slo_p99_ms: float = 20.0
    saturation_p99_ms: float = 1000.0
    arrivals: str = "uniform"
    kafka_bootstrap: str = ""
    kafka_props: dict[str, str] = field(default_factory=dict)  # --kafka-prop: the local broker's settings
    seed_concurrency: int = 32
    seed: int = 1
    quick: bool = False
    check_every: int = 50
    turn_response: str = "minimal"
    # --profile: "system", "system@rate" or "system@rate@mix"; an extra step per entry,
    # sampled with py-spy, kept apart from the sweep's steps
    profiles: list[str] = field(default_factory=list)
    profile_rate_hz: int = 100
    profile_native: bool = False  # minimal: turns send Prefer: return=minimal; full: they get the window back
    noisy_pct: float = 25.0  # other processes above this (% of one core) make a step "noisy"
    noisy_retries: int = 2
    stall_pct: float = 0.8  # the idle probe stalled (> 2 ms oversleeps) more than this % of a step: noisy
    quiet_wait_s: float = 0.0  # before each step, wait up to this long for other processes to calm down
    quiet_budget_s: float = 180.0  # ... and at most this long over the whole run


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- environments


class Env:
    name = ""
    kafka_pid: int | None = None  # the broker the harness started for this system, if any

    def targets(self, sysdef: SystemDef, sids: list[str]) -> tuple[list[tuple[str, int]], list[int]]:
        raise NotImplementedError

    def cpu_components(self) -> dict[str, list[int]]:
        return {}

    def python_procs(self) -> dict[str, int]:
        """The Python server processes, by name (what ``--profile`` samples)."""
        return {}

    def stop(self) -> None:
        pass


def _hostport(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1]
    host, port = rest.rsplit(":", 1)
    return host, int(port)


class ServerEnv(Env):
    def __init__(self, name: str, group: ServerGroup, redis: RedisServer | None = None) -> None:
        self.name = name
        self.group = group
        self.redis = redis

    def targets(self, sysdef: SystemDef, sids: list[str]) -> tuple[list[tuple[str, int]], list[int]]:
        return [_hostport(self.group.url)], [0] * len(sids)

    def cpu_components(self) -> dict[str, list[int]]:
        comps = {"server": self.group.pids}
        if self.redis is not None and self.redis.pid:
            comps["redis-server"] = [self.redis.pid]
        return comps

    def python_procs(self) -> dict[str, int]:
        return {f"server-{i}": pid for i, pid in enumerate(self.group.pids)}

    def stop(self) -> None:
        self.group.stop()


class ClusterEnv(Env):
    def __init__(self, name: str, cluster: LocalCluster, kafka_pid: int | None) -> None:
        self.name = name
        self.cluster = cluster
        self.kafka_pid = kafka_pid
        self.view = cluster.cluster_view()

    def targets(self, sysdef: SystemDef, sids: list[str]) -> tuple[list[tuple[str, int]], list[int]]:
        if sysdef.via in ("router", "client"):  # the client reads the shard map itself
            return [_hostport(self.cluster.router_url)], [0] * len(sids)
        # a placement-aware client: shard_of(id) + the router's /v1/cluster shard map
        view = self.cluster.cluster_view()
        urls = {n["id"]: n["url"] for n in view["nodes"]}
        node_ids = sorted(urls)
        index = {nid: i for i, nid in enumerate(node_ids)}
        partitions = int(view["partitions"])
        owners = view["shards"]
        return ([_hostport(urls[n]) for n in node_ids],
                [index[owners[str(shard_of(sid, partitions))]] for sid in sids])

    def cpu_components(self) -> dict[str, list[int]]:
        procs = self.cluster.procs
        comps = {"router": [procs["router"].pid],
                 "nodes": [p.pid for n, p in procs.items() if n != "router"]}
        if self.kafka_pid:
            comps["kafka"] = [self.kafka_pid]
        return comps

    def python_procs(self) -> dict[str, int]:
        return {name: p.pid for name, p in sorted(self.cluster.procs.items()) if p.pid}

    def stop(self) -> None:
        self.cluster.stop()


# --------------------------------------------------------------------------- generator


class Generator:
    """``gen_procs`` loadgen worker processes sharing the sessions of one system."""

    def __init__(self, cfg: Config, sysdef: SystemDef, targets: list[tuple[str, int]], sids: list[str],
                 target_of: list[int]) -> None:
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        n = cfg.gen_procs
        for wid in range(n):
            mine = [(sids[i], target_of[i]) for i in range(wid, len(sids), n)]
            wcfg = {"wid": wid, "kind": sysdef.kind, "targets": targets, "sessions": mine,
                    "window": cfg.window, "msg_bytes": cfg.msg_bytes, "durability": sysdef.durability,
                    "max_conns": max(1, cfg.max_conns // n), "check_every": cfg.check_every,
                    "seed": cfg.seed, "ttl_s": 3600, "turn_response": cfg.turn_response,
                    "client": sysdef.via == "client",
                    "router_url": "http://%s:%d" % targets[0] if sysdef.via == "client" else None}
            parent, child = ctx.Pipe()
            p = ctx.Process(target=loadgen.worker_main, args=(child, wcfg), name=f"loadgen-{wid}", daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.call("setup", None)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]

    def call(self, cmd: str, arg: Any, args: list[Any] | None = None) -> list[dict[str, Any]]:
        for i, c in enumerate(self.conns):
            c.send((cmd, args[i] if args is not None else arg))
        out = []
        for c in self.conns:
            status, payload = c.recv()
            if status != "ok":
                raise RuntimeError(f"load generator failed on {cmd}: {payload}")
            out.append(payload)
        return out

    def stop(self) -> None:
        try:
            self.call("stop", None)
        except (OSError, EOFError, RuntimeError):
            pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)


# --------------------------------------------------------------------------- aggregation


def _hist_summary(h: Any) -> dict[str, float]:
    if h is None or h.get_total_count() == 0:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "p99_9": None, "max": None, "mean": None}
    ms = lambda v: round(v / 1000.0, 3)  # noqa: E731
    return {"count": h.get_total_count(), "p50": ms(h.get_value_at_percentile(50)),
            "p90": ms(h.get_value_at_percentile(90)), "p99": ms(h.get_value_at_percentile(99)),
            "p99_9": ms(h.get_value_at_percentile(99.9)), "max": ms(h.get_max_value()),
            "mean": ms(h.get_mean_value())}


def combine(parts: list[dict[str, Any]], target_rate: float, duration: float) -> dict[str, Any]:
    from hdrh.histogram import HdrHistogram

    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    all_h = HdrHistogram(1, loadgen.HIST_MAX_US, 3)
    ops: dict[str, Any] = {}
    for op in ("read", "turn"):
        h = HdrHistogram(1, loadgen.HIST_MAX_US, 3)
        sent = ok = req_b = resp_b = 0
        for p in parts:
            o = p["ops"][op]
            sent += o["sent"]
            ok += o["ok"]
            req_b += o["req_bytes"]
            resp_b += o["resp_bytes"]
            if o["hdr"]:
                h.add(HdrHistogram.decode(o["hdr"]))
        if ok:
            all_h.add(h)
        ops[op] = {"sent": sent, "ok": ok, "latency_ms": _hist_summary(h),
                   "bytes_per_op": round((req_b + resp_b) / ok, 1) if ok else None,
                   "req_bytes_per_op": round(req_b / ok, 1) if ok else None,
                   "resp_bytes_per_op": round(resp_b / ok, 1) if ok else None}
    sent = sum(p["sent"] for p in parts)
    ok = sum(p["ok"] for p in parts)
    n_err = sum(errors.values())
    wall = max(p["wall_s"] for p in parts)
    gen_cpu = sum(p["cpu_s"] for p in parts)
    checks_fail = sum(p["checks"]["fail"] for p in parts)
    return {
        "target_rate": round(target_rate, 1),
        "achieved_rate": round(sum(p["in_window"] for p in parts) / duration, 1),
        "duration_s": duration,
        "sent": sent, "ok": ok, "errors": n_err, "error_kinds": errors,
        "error_rate": round(n_err / sent, 6) if sent else 0.0,
        "latency_ms": _hist_summary(all_h),
        "hdr": all_h.encode().decode() if all_h.get_total_count() else "",
        "ops": ops,
        "bytes_per_turn": ops["turn"]["bytes_per_op"],
        "generator": {"procs": len(parts), "cpu_pct": round(100.0 * gen_cpu / wall, 1) if wall else 0.0,
                      # the load generator's CPU per answered request (for direct: the client's cost)
                      "cpu_us_per_ok": round(1e6 * gen_cpu / ok, 1) if ok else None,
                      "cpu_pct_max_proc": round(max(100.0 * p["cpu_s"] / p["wall_s"] for p in parts), 1),
                      "dispatch_lag_ms_p99": max(p["dispatch_lag_ms"]["p99"] for p in parts),
                      "dispatch_lag_ms_max": max(p["dispatch_lag_ms"]["max"] for p in parts),
                      "max_outstanding": sum(p["max_outstanding"] for p in parts),
                      "connections": sum(p["conns"] for p in parts)},
        "checks": {"ok": sum(p["checks"]["ok"] for p in parts), "fail": checks_fail,
                   "examples": [e for p in parts for e in p["checks"]["examples"]][:5]},
    }


def ladder_rates(rates: list[float]) -> list[float]:
    """The rates every system climbs: every other rate of the grid (all of a short grid)."""
    return list(rates) if len(rates) < 4 else list(rates[::2])


def passes(step: dict[str, Any], slo_ms: float) -> bool:
    p99 = step["latency_ms"]["p99"]
    return (p99 is not None and p99 <= slo_ms and step["achieved_rate"] >= 0.95 * step["target_rate"]
            and step["error_rate"] <= 0.001)


def saturated(step: dict[str, Any], cfg: Config) -> bool:
    p99 = step["latency_ms"]["p99"]
    return (p99 is None or p99 > cfg.saturation_p99_ms or step["achieved_rate"] < 0.9 * step["target_rate"]
            or step["error_rate"] > 0.05)


# --------------------------------------------------------------------------- the run


class Runner:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.steps: list[dict[str, Any]] = []
        self.systems: dict[str, dict[str, Any]] = {}
        self.envs: dict[str, dict[str, Any]] = {}
        self.kafka: Any = None
        self.kafka_bootstrap = cfg.kafka_bootstrap
        self.redis: RedisServer | None = None
        self.logs = cfg.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results_path = cfg.out / "results.json"
        self.meta: dict[str, Any] = {}
        self._kafka_warm = False
        self.quiet_waited_s = 0.0
        self.hiccups: HiccupMeter | None = None
        self.profiles: list[dict[str, Any]] = []

    # -- environments ------------------------------------------------------------------
    def _ensure_kafka(self) -> str:
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        from stickystate.kafka_local import LocalKafka, ensure_jars

        ensure_jars()
        t0 = time.monotonic()
        log("starting Kafka (KRaft, one broker) ...")
        self.kafka = LocalKafka(self.logs / "kafka", log_file=self.logs / "kafka.log",
                                extra_props=dict(self.cfg.kafka_props))
        self.kafka.start()
        self.kafka_bootstrap = self.kafka.bootstrap
        log(f"Kafka ready at {self.kafka_bootstrap} in {time.monotonic() - t0:.1f}s")
        return self.kafka_bootstrap

    def _ensure_redis(self) -> RedisServer:
        if self.redis is None:
            self.redis = RedisServer(self.logs / "redis").start()
            log(f"redis-server on 127.0.0.1:{self.redis.port} (no persistence)")
        self.redis.command("FLUSHALL")
        return self.redis

    def start_env(self, name: str) -> Env:
        cfg = self.cfg
        t0 = time.monotonic()
        env: Env
        if name in ("redis-naive", "redis-atomic"):
            redis = self._ensure_redis()
            mode = name.split("-")[1]
            group = ServerGroup(name, ["redis", "--redis-port", str(redis.port), "--mode", mode], self.logs,
                                procs=cfg.server_procs).start()
            env = ServerEnv(name, group, redis)
        elif name == "client":
            group = ServerGroup(name, ["client"], self.logs, procs=cfg.server_procs).start()
            env = ServerEnv(name, group)
        else:
            bootstrap = self._ensure_kafka()
            node_env = ({"STICKYSTATE_REPLICATION": "off"} if name == "cluster-off" else
                        {"STICKYSTATE_ENCRYPTION": "off"} if name == "cluster-plain" else {})
            cluster = LocalCluster(self.logs / name, nodes=cfg.nodes, partitions=cfg.partitions,
                                   kafka_bootstrap=bootstrap, topic=f"bench-{uuid.uuid4().hex[:10]}",
                                   node_env=node_env)
            cluster.start()
            env = ClusterEnv(name, cluster, self.kafka.pid if self.kafka is not None else None)
        took = time.monotonic() - t0
        self.envs[name] = {"start_s": round(took, 2)}
        log(f"{name}: up in {took:.1f}s")
        return env

    # -- systems -------------------------------------------------------------------------
    def mixes_for(self, name: str) -> list[str]:
        mixes = list(self.cfg.mixes) if name in MAIN_SYSTEMS else []
        if name in REPLICATION_SYSTEMS:
            mixes += [m for m in self.cfg.replication_mixes if m not in mixes]
        return mixes

    def run_system(self, sysdef: SystemDef, env: Env) -> None:
        cfg = self.cfg
        prefix = f"{sysdef.name}-{uuid.uuid4().hex[:6]}"
        sids = [f"{prefix}-{i}" for i in range(cfg.sessions)]
        targets, target_of = env.targets(sysdef, sids)
        info: dict[str, Any] = {"label": sysdef.label, "kind": sysdef.kind, "env": env.name, "via": sysdef.via,
                                "durability": sysdef.durability or ("none" if env.name == "cluster-off" else
                                                                    ("memory" if sysdef.kind == "sticky" else None)),
                                "targets": len(targets)}
        self.systems[sysdef.name] = info
        gen = Generator(cfg, sysdef, targets, sids, target_of)
        comps = env.cpu_components()
        comps["generator"] = gen.pids
        if self.hiccups is not None and self.hiccups.pid:
            comps["probe"] = [self.hiccups.pid]
        try:
            t0 = time.monotonic()
            seeded = gen.call("seed", max(1, cfg.seed_concurrency // cfg.gen_procs))
            ok = sum(s["ok"] for s in seeded)
            errs: dict[str, int] = {}
            for s in seeded:
                for k, v in s["errors"].items():
                    errs[k] = errs.get(k, 0) + v
            info["seed"] = {"sessions": cfg.sessions, "ok": ok, "errors": errs, "s": round(time.monotonic() - t0, 2),
                            "check_failures": sum(s["checks_fail"] for s in seeded)}
            if ok != cfg.sessions or info["seed"]["check_failures"]:
                examples = [e for s in seeded for e in s["examples"]]
                raise RuntimeError(f"{sysdef.name}: seeding failed: {info['seed']} {examples}")
            log(f"{sysdef.name}: {cfg.sessions} sessions seeded with full {cfg.window}-message windows "
                f"in {time.monotonic() - t0:.1f}s")
            warmup_s = cfg.warmup_s
            if env.name == "cluster" and not self._kafka_warm:
                # a freshly started JVM compiles for a while: warm Kafka up once, longer
                warmup_s += cfg.kafka_warmup_s
                self._kafka_warm = True
            warm = self._step(gen, comps, sysdef.name, "warm-up", cfg.warmup_rate, warmup_s, 0.0, record=False)
            info["warmup"] = {k: warm[k] for k in ("target_rate", "achieved_rate", "sent", "ok", "errors")}
            for mix in self.mixes_for(sysdef.name):
                self.sweep(gen, comps, sysdef, mix)
            for spec in cfg.profiles:
                if spec.split("@")[0] == sysdef.name:
                    self.profile_step(gen, comps, sysdef, spec, env)
        finally:
            gen.stop()

    def _wait_quiet(self, comps: dict[str, list[int]]) -> float:
        """Wait (up to ``quiet_wait_s``) until other processes use less than ``noisy_pct`` of a core.
        Returns the other load last seen, in % of one core."""
        cfg = self.cfg
        budget = max(0.0, cfg.quiet_budget_s - self.quiet_waited_s)
        t0 = time.monotonic()
        deadline = t0 + min(cfg.quiet_wait_s, budget)
        waited = False
        while True:
            meter = CpuMeter(comps)
            meter.start()
            time.sleep(0.5)
            other = meter.stop()["other_pct"]
            if other <= cfg.noisy_pct or time.monotonic() >= deadline:
                self.quiet_waited_s += time.monotonic() - t0
                if waited:
                    log(f"  (waited for the machine: other load now {other:.0f}% of a core)")
                return other
            if not waited:
                log(f"  (machine busy with other work: {other:.0f}% of a core; waiting up to {cfg.quiet_wait_s:.0f}s)")
            waited = True
            time.sleep(1.0)

    def _step(self, gen: Generator, comps: dict[str, list[int]], system: str, mix: str, rate: float,
              duration: float, read_frac: float, record: bool = True, phase: str = "sweep") -> dict[str, Any]:
        """One measured rate. A step is *noisy* when, meanwhile, other processes took more
        than ``noisy_pct`` of a core or the idle probe spent more than ``stall_pct`` of the
        time stalled (machine-wide pauses). A noisy step is measured again, up to
        ``noisy_retries`` times, and the cleanest attempt kept (all are recorded)."""
        cfg = self.cfg
        attempts: list[dict[str, Any]] = []
        while True:
            if cfg.quiet_wait_s > 0:
                self._wait_quiet(comps)
            step = self._measure(gen, comps, system, mix, rate, duration, read_frac, phase)
            stalled = (step.get("hiccups") or {}).get("stalled_pct") or 0.0
            longest = (step.get("hiccups") or {}).get("max_ms") or 0.0
            step["noisy_cpu"] = step["cpu_pct"]["other_pct"] > cfg.noisy_pct
            # On a busy machine the probe also waits for a core now and then: that is the
            # load itself, part of the result. A pause as long as the SLO is not.
            busy = step["cpu_pct"]["machine_busy_pct"] >= 70.0
            step["noisy_stalls"] = stalled > cfg.stall_pct and (not busy or longest >= cfg.slo_p99_ms)
            step["noisy"] = step["noisy_cpu"] or step["noisy_stalls"]
            attempts.append(step)
            if not step["noisy"] or len(attempts) > cfg.noisy_retries or not record or saturated(step, cfg):
                break
            why = (f"other processes used {step['cpu_pct']['other_pct']:.0f}% of a core" if step["noisy_cpu"]
                   else f"the machine stalled {stalled:.1f}% of the time")
            log(f"  ({why}: measuring again)")
        best = min(attempts, key=lambda a: (a["noisy"], (a.get("hiccups") or {}).get("stalled_pct") or 0.0,
                                            a["cpu_pct"]["other_pct"]))
        best["attempts"] = [{k: a[k] for k in ("achieved_rate", "latency_ms", "errors", "cpu_pct", "hiccups",
                                               "noisy")} for a in attempts]
        if record:
            self.steps.append(best)
            self.save()
        time.sleep(cfg.pause_s if not saturated(best, cfg) else max(cfg.pause_s, 2.0))
        return best

    def _measure(self, gen: Generator, comps: dict[str, list[int]], system: str, mix: str, rate: float,
                 duration: float, read_frac: float, phase: str) -> dict[str, Any]:
        cfg = self.cfg
        n = cfg.gen_procs
        start_at = time.monotonic() + 0.3
        arg = {"rate": rate / n, "duration": duration, "read_frac": read_frac, "drain_s": cfg.drain_s,
               "start_at": start_at, "arrivals": cfg.arrivals, "prewarm": 16}
        meter = CpuMeter(comps, kernel=tuple(comps))
        meter.start()
        if self.hiccups is not None:
            self.hiccups.reset()
        parts = gen.call("step", arg)
        cpu = meter.stop()
        hiccups = self.hiccups.read() if self.hiccups is not None else {}
        step = combine(parts, rate, duration)
        step.update({"system": system, "mix": mix, "phase": phase, "cpu_pct": cpu, "hiccups": hiccups})
        lat = step["latency_ms"]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        verdict = "ok " if passes(step, cfg.slo_p99_ms) else ("SAT" if saturated(step, cfg) else "slo")
        log(f"  {system:16s} {mix:11s} {rate:8.0f}/s -> {step['achieved_rate']:8.0f}/s {verdict} "
            f"p50 {fmt(lat['p50'])} p99 {fmt(lat['p99'])} p99.9 {fmt(lat['p99_9'])} max {fmt(lat['max'])} ms  "
            f"err {step['errors']}  B/turn {step['bytes_per_turn'] or '-'}  "
            f"cpu: gen {step['generator']['cpu_pct']:.0f}% other {cpu['other_pct']:.0f}% "
            f"machine {cpu['machine_busy_pct']:.0f}%  stalls: max {hiccups.get('max_ms', 0) or 0:.0f} ms, "
            f"{hiccups.get('stalled_pct', 0) or 0:.1f}% of time")
        if step["sent"] != step["ok"] + step["errors"]:
            raise AssertionError(f"counting bug: sent {step['sent']} != ok {step['ok']} + errors {step['errors']}")
        return step

    def sweep(self, gen: Generator, comps: dict[str, list[int]], sysdef: SystemDef, mix: str) -> None:
        """Climb a ladder of rates (every other grid rate, the same for every system, so
        latencies can be compared at equal rates) until saturation or two clean SLO
        misses in a row; then measure the grid rate skipped between the last pass and
        the first miss, and bisect further (``refine`` steps) for the highest rate that
        meets the SLO."""
        cfg = self.cfg
        read_frac = MIXES[mix]
        log(f"{sysdef.name} / {mix} ({int(read_frac * 100)}% reads): sweeping up to saturation")
        last_pass: float | None = None
        first_fail: float | None = None  # the first failing rate above the last passing one
        fails_in_row = 0
        headline = mix == (cfg.mixes or [mix])[0]
        ladder = ladder_rates(cfg.rates)
        for rate in ladder:
            step = self._step(gen, comps, sysdef.name, mix, rate, cfg.step_s, read_frac)
            if passes(step, cfg.slo_p99_ms):
                last_pass, first_fail, fails_in_row = rate, None, 0
            else:
                first_fail = rate if first_fail is None else first_fail
                # a miss during machine-wide stalls says little about the system: keep going
                fails_in_row += 0 if step["noisy"] else 1
            if saturated(step, cfg) or fails_in_row >= 2:
                break
        if last_pass is None or first_fail is None or first_fail <= last_pass:
            return
        lo, hi = last_pass, first_fail
        for rate in [r for r in cfg.rates if lo < r < hi]:
            step = self._step(gen, comps, sysdef.name, mix, rate, cfg.step_s, read_frac, phase="fill")
            if passes(step, cfg.slo_p99_ms):
                lo = rate
            else:
                hi = rate
                break
        # full resolution for the headline (first) mix, which the targets use
        for _ in range(cfg.refine if headline else min(cfg.refine, 1)):
            mid = round(math.sqrt(lo * hi), -1)
            if mid <= lo or mid >= hi:
                break
            step = self._step(gen, comps, sysdef.name, mix, mid, cfg.step_s, read_frac, phase="refine")
            if passes(step, cfg.slo_p99_ms):
                lo = mid
            else:
                hi = mid

    def best_rate(self, system: str, mix: str) -> float | None:
        good = [s["target_rate"] for s in self.steps
                if s["system"] == system and s["mix"] == mix and passes(s, self.cfg.slo_p99_ms)]
        return max(good) if good else None

    def profile_step(self, gen: Generator, comps: dict[str, list[int]], sysdef: SystemDef, spec: str,
                     env: Env) -> None:
        """One more step (not part of the sweep) with py-spy sampling every Python server
        process: at the rate given, else the highest rate that met the SLO."""
        cfg = self.cfg
        parts = spec.split("@")
        mix = parts[2] if len(parts) > 2 else self.mixes_for(sysdef.name)[0]
        rate = float(parts[1]) if len(parts) > 1 and parts[1] else (self.best_rate(sysdef.name, mix)
                                                                    or min(cfg.rates))
        out_dir = cfg.out / "profiles" / f"{sysdef.name}-{mix}-{rate:g}"
        n = 2
        while out_dir.exists():  # the same system and rate profiled twice
            out_dir = cfg.out / "profiles" / f"{sysdef.name}-{mix}-{rate:g}-{n}"
            n += 1
        log(f"{sysdef.name} / {mix}: profiling one step at {rate:g}/s with py-spy -> {out_dir}")
        if cfg.quiet_wait_s > 0:
            self._wait_quiet(comps)
        targets = env.python_procs()
        recs = [pyspy.start(name, pid, out_dir, cfg.profile_rate_hz, cfg.profile_native)
                for name, pid in targets.items()]
        kafka_pid = env.kafka_pid
        jfr_on = kafka_pid is not None and jfr.start(kafka_pid)  # the broker's side, when the bench runs it
        per_proc = CpuMeter({name: [pid] for name, pid in targets.items()})
        per_proc.start()
        seconds = cfg.step_s if cfg.quick else max(cfg.step_s, PROFILE_MIN_STEP_S)
        t0 = time.monotonic()
        try:
            step = self._measure(gen, {**comps, "py-spy": [r.popen.pid for r in recs]}, sysdef.name, mix, rate,
                                 seconds, MIXES[mix], phase="profile")
        finally:
            wall = time.monotonic() - t0
            cpu = per_proc.stop()
            procs = {r.name: pyspy.finish(r, wall, cfg.profile_rate_hz, f"{sysdef.name} {mix} {rate:g}/s",
                                          cpu.get(r.name))
                     for r in recs}
            recording = jfr.stop(kafka_pid, out_dir) if jfr_on and kafka_pid is not None else None
        self.profiles.append({
            "system": sysdef.name, "mix": mix, "rate": rate, "dir": str(out_dir),
            "step": {k: step[k] for k in ("target_rate", "achieved_rate", "latency_ms", "errors", "cpu_pct",
                                          "hiccups", "bytes_per_turn")},
            "procs": procs,
            "kafka_jfr": str(recording) if recording else None,
        })
        self.save()

    # -- top level -----------------------------------------------------------------------
    def save(self) -> None:
        doc = {"meta": self.meta, "config": _config_doc(self.cfg), "systems": self.systems, "envs": self.envs,
               "steps": self.steps, "profiles": self.profiles}
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.results_path)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.monotonic()
        from stickystate.bench.report import machine_info

        self.meta = machine_info()
        self.meta["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        wanted = [SYSTEMS[s] for s in cfg.systems]
        self.hiccups = HiccupMeter()
        try:
            for env_name in ENV_ORDER:
                here = [s for s in wanted if s.env == env_name]
                if not here:
                    continue
                env = self.start_env(env_name)
                try:
                    # keep the order of ``cfg.systems`` inside one environment
                    for sysdef in here:
                        self.run_system(sysdef, env)
                finally:
                    env.stop()
        finally:
            self.hiccups.stop()
            if self.redis is not None:
                self.redis.stop()
            if self.kafka is not None:
                self.kafka.stop()
            self.meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
            self.meta["quiet_waited_s"] = round(self.quiet_waited_s, 1)
            self.meta["noisy_steps"] = sum(1 for s in self.steps if s.get("noisy"))
            if self.redis is not None:
                self.meta.setdefault("versions", {})["redis-server"] = self.redis.version()
            self.save()
        return json.loads(self.results_path.read_text())


def _config_doc(cfg: Config) -> dict[str, Any]:
    d = dict(cfg.__dict__)
    d["out"] = str(cfg.out)
    return d
