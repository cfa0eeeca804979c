"""Watch fan-out: ``python -m stickystate.bench.fanout``.

A local cluster (its own broker unless ``--kafka-bootstrap``; 2 nodes, 16 partitions, a
router) or, with ``--router URL``, a running one (its API key from ``$STICKYSTATE_API_KEY``;
its processes' CPU is then not measured); ``--sessions`` sessions, and an open-loop writer
(raw keep-alive HTTP/1.1, as bench/loadgen.py: latency from each append's intended send
time) offering appends over them through the router at each of ``--rates``, each rate twice
back to back: without watchers, and with ``--watchers`` watch streams spread evenly over the
sessions (``?changes_only=1``, through the router unless ``--watch-via owner``, opened and
read by a separate process at the byte level). For each phase: the appends acknowledged per
second, their latency, the CPU (% of one core) of the nodes (and of that, their time in the
kernel), the router, the broker, the writer and the watcher process, and the nodes' and the
router's CPU per turn (what serves the watchers); with watchers, the
delivery latency of each event to each watcher (the writer's acknowledgement -> the
watcher's reception, both ``time.time()`` on this machine), p50/p99, and how many
deliveries and resets there were.

Goals (issue 13): turn throughput at the SLO (append p99 <= ``--slo-ms``, everything
offered acknowledged) at most 10% lower with the watchers; delivery p99 at most 50 ms.
With ``--pin`` (the default on 2+ CPUs) the nodes and the router get CPUs of their own
and the writer, the watcher process and the broker share the first: on a small machine the
measuring processes would otherwise take the CPU the watchers are said to cost. The
``--watch-via owner`` watchers connect straight to the owners, as the Python client does.
Results: ``<out>/fanout.json``, a line per phase on stderr, a table and the summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from stickystate.bench.loadgen import Pool, Req
from stickystate.bench.procs import CpuMeter
from stickystate.client.core import API_KEY_ENV, ClusterMap
from stickystate.local_cluster import LocalCluster
from stickystate.protocol import AUTHORIZATION_HEADER


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _write_phase(base: str, sids: list[str], rate: float, seconds: float,
                       acks: dict[tuple[str, int], float] | None, auth: bytes = b"") -> dict[str, Any]:
    """Open loop: one append every 1/rate s, round-robin over the sessions (the cyclic
    garbage collector off meanwhile, as in bench/loadgen.py: the writer's own pauses are
    not the cluster's latency)."""
    gc.collect()
    gc.disable()
    try:
        return await _open_loop(base, sids, rate, seconds, acks, auth)
    finally:
        gc.enable()


class _Writer:
    """The open-loop writer's side of bench/loadgen.py's keep-alive ``Pool`` (raw HTTP/1.1,
    one request in flight per connection, a new connection when all are busy): what the
    measuring process costs the shared machine per append is a fraction of an HTTP
    client library's, and a request's latency runs from its intended send time."""

    def __init__(self, acks: dict[tuple[str, int], float] | None) -> None:
        self.acks = acks
        self.latencies: list[float] = []
        self.errors = 0
        self.errors_by: dict[str, int] = {}  # http_<status>, conn_lost, connect, timeout
        self.outstanding = 0
        self.done: asyncio.Event | None = None
        self.sids: list[str] = []

    def complete(self, req: Req, status: int, nbytes: int, body: bytes, doc: Any = None) -> None:
        now = time.monotonic()
        if status != 200:
            self.fail(req, f"http_{status}")
            return
        self.latencies.append(now - req.intended)
        if self.acks is not None:
            self.acks[(self.sids[req.sess], orjson.loads(body)["version"])] = time.time()
        self._settled()

    def fail(self, req: Req, why: str) -> None:
        self.errors += 1
        self.errors_by[why] = self.errors_by.get(why, 0) + 1
        self._settled()

    def _settled(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0 and self.done is not None:
            self.done.set()


async def _open_loop(base: str, sids: list[str], rate: float, seconds: float,
                     acks: dict[tuple[str, int], float] | None, auth: bytes) -> dict[str, Any]:
    url = urlsplit(base)
    writer = _Writer(acks)
    writer.sids = sids
    pool = Pool(writer, url.hostname or "127.0.0.1", url.port or 80, 512)
    await pool.prewarm(32)
    heads = [(f"POST /v1/sessions/{sid}/lists/turns HTTP/1.1\r\nHost: {url.netloc}\r\n"
              "Content-Type: application/json\r\nPrefer: return=minimal\r\n").encode() + auth for sid in sids]
    start = time.monotonic()
    n = 0
    while True:
        due = start + n / rate
        now = time.monotonic()
        if now - start >= seconds:
            break
        if due > now:
            # uvloop's timers have 1 ms resolution: sleep at least that (the lateness counts
            # in the latency, which runs from the intended send time)
            await asyncio.sleep(max(0.001, due - now))
            continue
        body = orjson.dumps({"items": [n], "max_len": 20})
        idx = n % len(sids)
        writer.outstanding += 1
        pool.submit(Req(1, idx, n, due, heads[idx] + b"Content-Length: %d\r\n\r\n" % len(body) + body, True))
        n += 1
    if writer.outstanding:  # the answers still due (the event exists only from here: set when they are in)
        writer.done = asyncio.Event()
        try:
            await asyncio.wait_for(writer.done.wait(), 30)
        except asyncio.TimeoutError:
            pass
    for req in pool.abort_all():
        writer.fail(req, "timeout")
    for conn in list(pool.conns):
        if conn.tr is not None:
            conn.tr.close()
    latencies = writer.latencies
    return {"offered_per_s": rate, "sent": n, "acknowledged": len(latencies), "errors": writer.errors,
            "errors_by": writer.errors_by,
            "acknowledged_per_s": round(len(latencies) / (time.monotonic() - start), 1),
            "latency_ms": {"p50": _ms(_pct(latencies, 0.5)), "p99": _ms(_pct(latencies, 0.99))}}


def _run(coro: Any) -> Any:
    """The measuring processes run on uvloop, as bench/loadgen.py's workers."""
    import uvloop

    return uvloop.run(coro)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def _watch_main(bases: dict[str, str], sids: list[str], per_session: int, out_path: str, ready: Any,
                stop: Any, auth: bytes = b"") -> None:
    """A separate process: the watchers. Writes ``(sid, version, received)`` triples and counts.
    The cyclic garbage collector is off (as in bench/loadgen.py): its full collections over
    the growing list of receptions would stall this process and count as delivery latency."""
    gc.disable()
    _run(_watch_all(bases, sids, per_session, out_path, ready, stop, auth))


class _Watcher(asyncio.Protocol):
    """One watch stream, read at the byte level (no HTTP client, no per-line coroutine):
    the measuring side of the bench should cost the shared machine as little as it can.
    Records ``(sid, version, received)`` for every ``change`` and counts resets."""

    def __init__(self, sid: str, received: list[tuple[str, int, float]], counts: dict[str, int],
                 opened: asyncio.Future[bool]) -> None:
        self.sid = sid
        self.received = received
        self.counts = counts
        self.opened = opened
        self.buf = b""
        self.head = True

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf + data
        if self.head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            ok = buf.startswith(b"HTTP/1.1 200")
            if not self.opened.done():
                self.opened.set_result(ok)
            self.head = False
            buf = buf[end + 4:]
        frames = buf.split(b"\n\n")
        self.buf = frames.pop()
        for f in frames:
            if b"\nevent: change\n" in f:
                at = f.index(b'"version":') + 10
                self.received.append((self.sid, int(f[at:f.index(b",", at)]), now))
                self.counts["events"] += 1
            elif b"\nevent: reset\n" in f:
                self.counts["resets"] += 1
                self.counts["events"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(False)


async def _watch_all(bases: dict[str, str], sids: list[str], per_session: int, out_path: str, ready: Any,
                     stop: Any, auth: bytes) -> None:
    received: list[tuple[str, int, float]] = []
    counts = {"streams": 0, "resets": 0, "refused": 0, "events": 0}
    loop = asyncio.get_running_loop()
    transports = []

    async def watch(sid: str) -> None:
        url = urlsplit(bases[sid])
        host, port = url.hostname or "127.0.0.1", url.port or 80
        opened: asyncio.Future[bool] = loop.create_future()
        transport, _ = await loop.create_connection(lambda: _Watcher(sid, received, counts, opened), host, port)
        transports.append(transport)
        transport.write(f"GET /v1/sessions/{sid}/watch?changes_only=1 HTTP/1.1\r\nHost: {url.netloc}\r\n"
                        f"Accept: text/event-stream\r\n".encode() + auth + b"\r\n")
        counts["streams" if await opened else "refused"] += 1

    for i in range(0, len(sids) * per_session, 100):  # opened 100 at a time
        await asyncio.gather(*(watch(sids[j % len(sids)]) for j in range(i, min(i + 100, len(sids) * per_session))))
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for t in transports:
        t.close()
    Path(out_path).write_bytes(orjson.dumps({"received": received, "counts": counts}))


def _watched_phase(base: str, bases: dict[str, str], sids: list[str], per_session: int, rate: float,
                   seconds: float, drain_s: float, pids: dict[str, list[int]], out_path: Path,
                   auth: bytes = b"") -> dict[str, Any]:
    """One phase with the watchers: a separate process opens them, the writer offers
    ``rate`` for ``seconds``, the watchers get ``drain_s`` more for the last events."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    out_path.unlink(missing_ok=True)
    proc = ctx.Process(target=_watch_main, args=(bases, sids, per_session, str(out_path), ready, stop, auth))
    proc.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("watchers did not open in 120 s")
        acks: dict[tuple[str, int], float] = {}
        meter = CpuMeter(pids | {"watchers": [proc.pid or 0]}, kernel=("nodes",))
        meter.start()
        phase = _run(_write_phase(base, sids, rate, seconds, acks, auth))
        phase["cpu_pct"] = meter.stop()  # over the writes, as without the watchers
        time.sleep(drain_s)  # let the last events arrive (a bench's drain time, not a synchronisation)
    finally:
        stop.set()
        proc.join(60)
    if proc.exitcode != 0:
        raise RuntimeError(f"the watcher process failed (exit code {proc.exitcode})")
    watched = orjson.loads(out_path.read_bytes())
    delays = [recv - acks[(sid, ver)] for sid, ver, recv in watched["received"] if (sid, ver) in acks]
    phase["delivery"] = {"deliveries": len(delays), "expected": len(acks) * per_session, **watched["counts"],
                         "latency_ms": {"p50": _ms(_pct(delays, 0.5)), "p99": _ms(_pct(delays, 0.99)),
                                        "max": _ms(max(delays) if delays else None)},
                         "early_pct": round(100.0 * sum(d < 0 for d in delays) / max(1, len(delays)), 2)}
    return phase


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` on ``cpus`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that ended meanwhile


def _meets_slo(phase: dict[str, Any], slo_ms: float) -> bool:
    """Within the SLO: append p99 at most ``slo_ms``, no errors, and (nearly) everything
    offered acknowledged (an open-loop writer falling behind is not within it)."""
    p99 = phase["latency_ms"]["p99"]
    return (p99 is not None and p99 <= slo_ms and phase["errors"] == 0
            and phase["acknowledged_per_s"] >= 0.95 * phase["offered_per_s"])


def run(ns: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="fanout-"))
    per_session = max(1, ns.watchers // ns.sessions)
    cluster: LocalCluster | None = None
    if ns.router:
        # a cluster running elsewhere (the clients then do not share its machine): no CPU
        # figures of its processes, only the rates, latencies and deliveries measured here
        base = ns.router.rstrip("/")
    else:
        cluster = LocalCluster(data_dir, nodes=ns.nodes, partitions=ns.partitions,
                               kafka_bootstrap=ns.kafka_bootstrap, topic=f"fanout-{int(time.time())}",
                               node_env={"STICKYSTATE_WATCH_MAX_PER_NODE": str(ns.watchers + 100)})
        cluster.start()
        base = cluster.router_url
    api_key = os.environ.get(API_KEY_ENV) or None  # never on the command line
    headers = {AUTHORIZATION_HEADER: f"Bearer {api_key}"} if api_key else {}
    auth = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
    try:
        run_id = int(time.time())
        sids = [f"fan-{run_id}-{i}" for i in range(ns.sessions)]

        async def create() -> None:
            async with aiohttp.ClientSession(headers=headers) as http:
                for sid in sids:
                    async with http.post(f"{base}/v1/sessions", data=orjson.dumps({"id": sid})) as resp:
                        if resp.status != 201:
                            raise RuntimeError(f"creating session {sid} at {base}: {resp.status} {await resp.text()}")

        async def view() -> ClusterMap:
            async with aiohttp.ClientSession(headers=headers) as http:
                async with http.get(f"{base}/v1/cluster") as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"the shard map of {base}: {resp.status} {await resp.text()}")
                    return ClusterMap.from_view(await resp.json())

        asyncio.run(create())
        pids: dict[str, list[int]] = {"writer": [os.getpid()]}
        if cluster is not None:
            pids |= {"nodes": [cluster.procs[n].pid for n in cluster.node_ids()],
                     "router": [cluster.procs["router"].pid]}
            if cluster.kafka is not None and cluster.kafka.pid:
                pids["kafka"] = [cluster.kafka.pid]
        report: dict[str, Any] = {"config": vars(ns) | {"kafka_bootstrap": cluster.kafka_bootstrap if cluster else None,
                                                        "watchers_per_session": per_session},
                                  "steps": []}
        if ns.pin and cluster is not None:
            # The processes that serve the watchers (nodes, router) on CPUs of their own; the
            # measuring processes (this writer, the watcher process it spawns) and the broker
            # (which a watch does not touch) on CPU 0. What the watchers cost the serving
            # processes is then not mixed up with what their own client costs the machine.
            cpus = sorted(os.sched_getaffinity(0))
            server_cpus = set(cpus[1:])
            for name, ps in pids.items():
                for pid in ps:
                    _pin(pid, server_cpus if name in ("nodes", "router") else {cpus[0]})
            report["pinned"] = {"writer, watchers, broker": [cpus[0]], "nodes, router": sorted(server_cpus)}

        def watch_bases() -> dict[str, str]:
            """Where each session is watched: the router, or (``--watch-via owner``, as the
            Python client does) its owner as the router's shard map says now."""
            if ns.watch_via == "router":
                return dict.fromkeys(sids, base)
            cmap = asyncio.run(view())
            return {sid: cmap.urls[cmap.owner(sid) or ""] for sid in sids}

        if ns.warmup_s > 0:  # JIT of the broker, the nodes' first batches: not in any step
            _run(_write_phase(base, sids, ns.rates[0], ns.warmup_s, None, auth))
        for rate in ns.rates:
            # the two conditions of a rate back to back, so that the machine's drift
            # between them is small; which goes first alternates between rates
            step: dict[str, Any] = {"offered_per_s": rate}
            order = ("without", "with") if len(report["steps"]) % 2 == 0 else ("with", "without")
            for cond in order:
                if cond == "without":
                    meter = CpuMeter(pids, kernel=("nodes",))
                    meter.start()
                    phase = _run(_write_phase(base, sids, rate, ns.seconds, None, auth))
                    phase["cpu_pct"] = meter.stop()
                else:
                    phase = _watched_phase(base, watch_bases(), sids, per_session, rate, ns.seconds, ns.drain_s,
                                           pids, data_dir / "watch.json", auth)
                phase["within_slo"] = _meets_slo(phase, ns.slo_ms)
                step[cond] = phase
                log(f"{rate:.0f}/s {cond} watchers: {_line(phase)}")
            report["steps"].append(step)
        report["summary"] = summarise(report["steps"], ns.slo_ms)
        return report
    finally:
        if cluster is not None:
            cluster.stop()


def server_us_per_turn(phase: dict[str, Any]) -> float | None:
    """CPU of the processes that serve the watchers (nodes, router) per acknowledged append,
    µs (the broker's is in the report too: a watch does not touch it)."""
    cpu = phase["cpu_pct"]
    if not phase["acknowledged_per_s"] or "nodes" not in cpu:
        return None  # a remote cluster (--router): its processes are not measured here
    return round((cpu["nodes"] + cpu["router"]) * 1e4 / phase["acknowledged_per_s"], 1)


def summarise(steps: list[dict[str, Any]], slo_ms: float) -> dict[str, Any]:
    """The highest rate within the SLO without and with the watchers, their ratio, the
    delivery latency at the highest rate within the SLO with watchers, and the median over
    the unsaturated steps (every offered append acknowledged in both conditions) of the
    nodes' and the router's CPU per turn with the watchers over without: what the watchers
    cost the serving processes per turn, the figure a machine of its own would turn into
    lost throughput."""
    def best(cond: str) -> float | None:
        ok = [s["offered_per_s"] for s in steps if s[cond]["within_slo"]]
        return max(ok) if ok else None

    without, with_ = best("without"), best("with")
    at = next((s["with"] for s in steps if s["offered_per_s"] == with_), None)
    ratios = sorted(
        with_us / without_us for s in steps
        if all(s[c]["acknowledged_per_s"] >= 0.95 * s["offered_per_s"] and s[c]["errors"] == 0
               for c in ("without", "with"))
        and (with_us := server_us_per_turn(s["with"])) is not None
        and (without_us := server_us_per_turn(s["without"])))
    return {"slo_ms": slo_ms, "rate_at_slo_without": without, "rate_at_slo_with": with_,
            "throughput_drop_pct": (round(100.0 * (without - with_) / without, 1) if without and with_ is not None
                                    else None),
            "delivery_at_slo_ms": at["delivery"]["latency_ms"] if at else None,
            "server_cpu_per_turn_ratio_median": round(ratios[len(ratios) // 2], 3) if ratios else None,
            "unsaturated_steps": len(ratios)}


def log(msg: str) -> None:
    print(f"[fanout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _line(phase: dict[str, Any]) -> str:
    out = (f"{phase['acknowledged_per_s']}/s acknowledged, append p50 {phase['latency_ms']['p50']} ms "
           f"p99 {phase['latency_ms']['p99']} ms, {phase['errors']} errors {phase.get('errors_by') or ''}, cpu {phase['cpu_pct']}")
    if "delivery" in phase:
        d = phase["delivery"]
        out += (f"; delivered {d['deliveries']} of {d['expected']}, p50 {d['latency_ms']['p50']} ms "
                f"p99 {d['latency_ms']['p99']} ms, resets {d['resets']}, refused {d['refused']}")
    return out


def table(report: dict[str, Any]) -> str:
    rows = ["| offered/s | acknowledged/s without → with | append p99 ms without → with | delivery p50 / p99 ms "
            "| delivered of expected | resets | nodes + router CPU µs per turn without → with "
            "| of which nodes / router / broker % of a core, with | nodes in the kernel % without → with "
            "| watcher process % |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["steps"]:
        wo, wi = s["without"], s["with"]
        d = wi["delivery"]
        mark = lambda p: "" if p["within_slo"] else " ✗"  # noqa: E731
        cpu = wi["cpu_pct"]
        rows.append(f"| {s['offered_per_s']:.0f} | {wo['acknowledged_per_s']} → {wi['acknowledged_per_s']} "
                    f"| {wo['latency_ms']['p99']}{mark(wo)} → {wi['latency_ms']['p99']}{mark(wi)} "
                    f"| {d['latency_ms']['p50']} / {d['latency_ms']['p99']} | {d['deliveries']} of {d['expected']} "
                    f"| {d['resets']} | {server_us_per_turn(wo)} → {server_us_per_turn(wi)} "
                    f"| {cpu.get('nodes', '-')} / {cpu.get('router', '-')} / {cpu.get('kafka', '-')} "
                    f"| {wo['cpu_pct'].get('nodes_sys', '-')} → {cpu.get('nodes_sys', '-')} | {cpu.get('watchers')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stickystate.bench.fanout", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--watchers", type=int, default=1000, help="spread evenly over the sessions")
    p.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",")],
                   default=[250.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0],
                   help="appends offered per second, one step each (comma-separated, ascending)")
    p.add_argument("--seconds", type=float, default=10.0, help="per phase")
    p.add_argument("--warmup-s", type=float, default=20.0,
                   help="writes at the first rate before the first step (the broker's JIT settles: its CPU "
                        "at a given rate fell by half over its first ~20 s)")
    p.add_argument("--slo-ms", type=float, default=20.0, help="append p99 of the SLO")
    p.add_argument("--drain-s", type=float, default=2.0, help="after the writes, before the watchers stop")
    p.add_argument("--watch-via", choices=("router", "owner"), default="router",
                   help="where the watchers connect: the router, or each session's owner (as the Python client)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=len(os.sched_getaffinity(0)) >= 2,
                   help="the writer, the watcher process and the broker on the first CPU, the nodes and the "
                        "router on the others (default: on with two CPUs or more)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--partitions", type=int, default=16)
    p.add_argument("--kafka-bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", ""))
    p.add_argument("--router", default="",
                   help="a running cluster's router URL instead of a local cluster (the writer and the "
                        "watchers then need not share its machine; its API key, if any, from $"
                        + API_KEY_ENV + "); no CPU figures of the cluster's processes")
    p.add_argument("--out", type=Path, default=Path("results") / f"fanout-{time.strftime('%Y%m%d-%H%M%S')}")
    ns = p.parse_args(argv)
    report = run(ns)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "fanout.json").write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    s = report["summary"]
    print(f"\nrate at the SLO (append p99 <= {s['slo_ms']:g} ms): {s['rate_at_slo_without']}/s without watchers, "
          f"{s['rate_at_slo_with']}/s with {ns.watchers}: throughput drop {s['throughput_drop_pct']}% (goal <= 10%); "
          f"delivery at that rate {s['delivery_at_slo_ms']} (goal p99 <= 50 ms); nodes + router CPU per turn with "
          f"the watchers / without, median of {s['unsaturated_steps']} unsaturated steps: "
          f"{s['server_cpu_per_turn_ratio_median']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
