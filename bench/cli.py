"""``python -m stickystate.bench`` / ``stickystate bench``: the issue 4 benchmark harness.

One invocation measures the same conversation workload against stickystate (through
the router, and straight to the owning node), an aiohttp server keeping sessions in
Redis (naive read-modify-write, and an atomic Lua variant) and a client-side-state
server, plus stickystate with replication off / Durability memory / Durability log.
Results go to ``results/bench-<timestamp>/``: results.json, report.md, PNG plots.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from stickystate.bench.runner import MAIN_SYSTEMS, MIXES, SYSTEMS, Config, Runner, log

DEFAULT_SYSTEMS = ["redis-naive", "redis-atomic", "client-side", "router", "direct", "direct-raw", "direct-log",
                   "direct-plain", "direct-repl-off"]
# offered rates (requests/s) swept in order until the system saturates; shared by every
# system so p99 can be compared at equal rates
DEFAULT_RATES = [200, 400, 650, 1000, 1300, 1600, 2000, 2500, 3200, 4000, 5000, 6500, 8000, 10000, 13000, 16000,
                 20000]
QUICK_RATES = [200]


def _kafka_prop(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stickystate.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="harness check in well under a minute: 100 sessions, one short step per system and mix")
    p.add_argument("--out", type=Path, default=None, help="results folder (default results/bench-<timestamp>)")
    p.add_argument("--systems", type=_csv, default=DEFAULT_SYSTEMS,
                   help=f"comma-separated, from {','.join(SYSTEMS)}")
    p.add_argument("--mixes", type=_csv, default=["write-heavy", "read-heavy"],
                   help=f"mixes for the main systems ({', '.join(f'{k}={int(v * 100)}%% reads' for k, v in MIXES.items())})")
    p.add_argument("--replication-mixes", type=_csv, default=["write-heavy"],
                   help="mixes for direct-log / direct-repl-off")
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--window", type=int, default=50, help="messages kept per session (max_len)")
    p.add_argument("--message-bytes", type=int, default=300, help="size of one message as JSON")
    p.add_argument("--nodes", type=int, default=2, help="stickystate nodes (the machine's cores are shared by all)")
    p.add_argument("--partitions", type=int, default=64)
    p.add_argument("--server-procs", type=int, default=None,
                   help="processes per baseline server (default: --nodes, so both sides get as many processes)")
    p.add_argument("--gen-procs", type=int, default=1, help="load generator processes")
    p.add_argument("--max-conns", type=int, default=256, help="connections per target (over all generator procs)")
    p.add_argument("--rates", type=lambda v: [float(x) for x in _csv(v)], default=None,
                   help="offered rates swept in order until saturation")
    p.add_argument("--step-seconds", type=float, default=None, help="measured seconds per rate (default 3, quick 1)")
    p.add_argument("--drain-seconds", type=float, default=3.0, help="wait this long after a step for answers")
    p.add_argument("--refine", type=int, default=None,
                   help="extra bisection steps for the highest rate meeting the SLO (default 2, quick 0)")
    p.add_argument("--turn-response", choices=["minimal", "full"], default="minimal",
                   help="what a turn gets back: 'minimal' = Prefer: return=minimal, a small acknowledgement "
                        "(every system); 'full' = the whole new window (the turn definition of the first runs)")
    p.add_argument("--profile", type=_csv, default=[], metavar="SYSTEM[@RATE[@MIX]],...",
                   help="after a system's sweep, run one more step (not counted in the results) with py-spy "
                        "sampling every Python server process (router, nodes, baseline servers); RATE defaults "
                        "to the highest rate that met the SLO, MIX to the system's first. Writes "
                        "profiles/<system>-<mix>-<rate>/<process>.{txt,svg,collapsed} and a report section")
    p.add_argument("--profile-rate-hz", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--profile-native", action="store_true",
                   help="py-spy --native: also sample C/Cython frames (uvloop, orjson, aiohttp's parser)")
    p.add_argument("--slo-p99-ms", type=float, default=20.0)
    p.add_argument("--arrivals", choices=["uniform", "poisson"], default="uniform")
    p.add_argument("--kafka-bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", ""),
                   help="use this Kafka (default: $KAFKA_BOOTSTRAP, else start a local broker once)")
    p.add_argument("--kafka-prop", action="append", default=[], metavar="KEY=VALUE", type=_kafka_prop,
                   help="a server.properties setting of the broker the harness starts (repeatable; e.g. "
                        "num.io.threads=2), to measure the broker's own settings")
    p.add_argument("--noisy-pct", type=float, default=25.0,
                   help="a step during which other processes used more than this %% of one core is noisy")
    p.add_argument("--stall-pct", type=float, default=0.8,
                   help="a step during which an idle probe process was stalled (oversleeps > 2 ms) more than "
                        "this %% of the time is noisy (machine-wide pauses, e.g. from the hypervisor)")
    p.add_argument("--noisy-retries", type=int, default=None,
                   help="measure a noisy step again up to this many times, keep the cleanest (default 2, quick 0)")
    p.add_argument("--quiet-wait-seconds", type=float, default=None,
                   help="before each step wait up to this long for other processes to go below --noisy-pct "
                        "(default 20, quick 0)")
    p.add_argument("--quiet-budget-seconds", type=float, default=180.0,
                   help="the most time spent waiting for the machine to calm down over the whole run")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    return p


def config_from_args(ns: argparse.Namespace) -> Config:
    for s in ns.systems:
        if s not in SYSTEMS:
            raise SystemExit(f"unknown system {s!r}; known: {', '.join(SYSTEMS)}")
    for m in ns.mixes + ns.replication_mixes:
        if m not in MIXES:
            raise SystemExit(f"unknown mix {m!r}; known: {', '.join(MIXES)}")
    for spec in ns.profile:
        parts = spec.split("@")
        if parts[0] not in ns.systems or len(parts) > 3 or (len(parts) > 2 and parts[2] not in MIXES):
            raise SystemExit(f"bad --profile entry {spec!r}: SYSTEM[@RATE[@MIX]] with a system being run")
        try:
            float(parts[1]) if len(parts) > 1 and parts[1] else None
        except ValueError:
            raise SystemExit(f"bad --profile rate in {spec!r}") from None
    if ns.profile:
        from stickystate.bench.profile import py_spy_path

        if py_spy_path() is None:
            raise SystemExit("--profile needs py-spy: pip install -e '.[bench]'")
    out = ns.out or Path("results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if ns.quick else ''}"
    quick = ns.quick
    return Config(
        out=out,
        systems=list(ns.systems),
        mixes=list(ns.mixes),
        replication_mixes=list(ns.replication_mixes),
        sessions=ns.sessions if not quick or ns.sessions != 1000 else 100,
        window=ns.window,
        msg_bytes=ns.message_bytes,
        nodes=ns.nodes,
        partitions=ns.partitions if not quick or ns.partitions != 64 else 8,
        server_procs=ns.server_procs or ns.nodes,
        gen_procs=ns.gen_procs,
        max_conns=ns.max_conns,
        rates=ns.rates or (QUICK_RATES if quick else DEFAULT_RATES),
        step_s=ns.step_seconds or (1.0 if quick else 3.0),
        drain_s=ns.drain_seconds,
        pause_s=0.2 if quick else 0.5,
        warmup_s=0.5 if quick else 2.0,
        warmup_rate=100.0 if quick else 300.0,
        kafka_warmup_s=0.0 if quick else 10.0,
        refine=ns.refine if ns.refine is not None else (0 if quick else 2),
        slo_p99_ms=ns.slo_p99_ms,
        arrivals=ns.arrivals,
        kafka_bootstrap=ns.kafka_bootstrap,
        kafka_props=dict(ns.kafka_prop),
        seed=ns.seed,
        quick=quick,
        check_every=10 if quick else 50,
        turn_response=ns.turn_response,
        profiles=list(ns.profile),
        profile_rate_hz=ns.profile_rate_hz,
        profile_native=ns.profile_native,
        noisy_pct=ns.noisy_pct,
        noisy_retries=ns.noisy_retries if ns.noisy_retries is not None else (0 if quick else 2),
        stall_pct=ns.stall_pct,
        quiet_wait_s=ns.quiet_wait_seconds if ns.quiet_wait_seconds is not None else (0.0 if quick else 20.0),
        quiet_budget_s=ns.quiet_budget_seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    cfg = config_from_args(ns)
    cfg.out.mkdir(parents=True, exist_ok=True)
    log(f"results in {cfg.out}/ ; systems: {', '.join(cfg.systems)} ; mixes: {', '.join(cfg.mixes)}")
    cmd = "python -m stickystate.bench " + " ".join(sys.argv[1:] if argv is None else list(argv))
    runner = Runner(cfg)
    try:
        doc = runner.run()
    except KeyboardInterrupt:
        log("interrupted; partial results kept in results.json")
        return 130
    from stickystate.bench import report

    doc["meta"]["command"] = cmd
    doc = report.write_all(doc, cfg.out, make_plots=not ns.no_plots)
    log(f"done in {doc['meta']['elapsed_s']:.0f}s: {cfg.out}/report.md")
    for t in doc["targets"]:
        res = "info" if t.get("info") else ("n/a" if t["met"] is None else ("met" if t["met"] else "MISSED"))
        val = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  [{res:6s}] {t['target']}: {t['measured']} -> {val} (goal {t['goal']})")
    missing = [s for s in MAIN_SYSTEMS if s in cfg.systems and not any(
        st["system"] == s and st["ok"] > 0 for st in doc["steps"])]
    if missing:
        log(f"systems that never answered: {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
