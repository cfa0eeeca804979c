"""Watch fan-out: ``python -m stickystate.bench.fanout``.

A local cluster (its own broker unless ``--kafka-bootstrap``), ``--sessions`` sessions,
and an open-loop writer offering ``--rate`` appends per second over them through the
router, first without watchers, then with ``--watchers`` watch streams spread evenly over
the sessions (``?changes_only=1``, through the router, read by a separate process). For
each phase: the appends acknowledged per second, their latency, the nodes' and the
router's CPU (% of one core); with watchers, the delivery latency of each event to each
watcher (the writer's acknowledgement -> the watcher's reception, both ``time.time()`` on
this machine), p50/p99, and how many deliveries and resets there were.

Goals (issue 13): delivery p99 at most 50 ms; throughput at the SLO at most 10% lower with
the watchers. Results: ``<out>/fanout.json`` and a line per phase on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from stickystate.bench.procs import CpuMeter
from stickystate.local_cluster import LocalCluster


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _write_phase(base: str, sids: list[str], rate: float, seconds: float,
                       acks: dict[tuple[str, int], float] | None) -> dict[str, Any]:
    """Open loop: one append every 1/rate s, round-robin over the sessions."""
    latencies: list[float] = []
    errors = 0
    inflight: set[asyncio.Task[None]] = set()
    conn = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=conn) as http:
        async def one(sid: str, n: int) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                async with http.post(f"{base}/v1/sessions/{sid}/lists/turns",
                                     data=orjson.dumps({"items": [n], "max_len": 20}),
                                     headers={"Prefer": "return=minimal"}) as resp:
                    body = await resp.read()
                    now = time.time()
                    if resp.status != 200:
                        errors += 1
                        return
                    latencies.append(time.perf_counter() - started)
                    if acks is not None:
                        acks[(sid, orjson.loads(body)["version"])] = now
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1

        start = time.perf_counter()
        n = 0
        while True:
            due = start + n / rate
            now = time.perf_counter()
            if now - start >= seconds:
                break
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.create_task(one(sids[n % len(sids)], n))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            n += 1
        await asyncio.gather(*inflight)
        elapsed = time.perf_counter() - start
    return {"offered_per_s": rate, "sent": n, "acknowledged": len(latencies), "errors": errors,
            "acknowledged_per_s": round(len(latencies) / elapsed, 1),
            "latency_ms": {"p50": _ms(_pct(latencies, 0.5)), "p99": _ms(_pct(latencies, 0.99))}}


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def _watch_main(base: str, sids: list[str], per_session: int, out_path: str, ready: Any, stop: Any) -> None:
    """A separate process: the watchers. Writes ``(sid, version, received)`` triples and counts."""
    asyncio.run(_watch_all(base, sids, per_session, out_path, ready, stop))


async def _watch_all(base: str, sids: list[str], per_session: int, out_path: str, ready: Any, stop: Any) -> None:
    received: list[tuple[str, int, float]] = []
    counts = {"streams": 0, "resets": 0, "refused": 0, "events": 0}
    opened = 0
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        async def watch(sid: str) -> None:
            nonlocal opened
            async with http.get(f"{base}/v1/sessions/{sid}/watch?changes_only=1",
                                timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
                if resp.status != 200:
                    counts["refused"] += 1
                    return
                counts["streams"] += 1
                opened += 1
                kind = ""
                async for line in resp.content:
                    if line.startswith(b"event: "):
                        kind = line[7:].strip().decode()
                    elif line.startswith(b"data: "):
                        now = time.time()
                        counts["events"] += 1
                        if kind == "change":
                            doc = orjson.loads(line[6:])
                            received.append((sid, doc["version"], now))
                        elif kind == "reset":
                            counts["resets"] += 1

        tasks = [asyncio.create_task(watch(sid)) for sid in sids for _ in range(per_session)]
        while opened + counts["refused"] < len(tasks) and not all(t.done() for t in tasks):
            await asyncio.sleep(0.05)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    Path(out_path).write_bytes(orjson.dumps({"received": received, "counts": counts}))


def run(ns: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="fanout-"))
    cluster = LocalCluster(data_dir, nodes=ns.nodes, partitions=ns.partitions, kafka_bootstrap=ns.kafka_bootstrap,
                           topic=f"fanout-{int(time.time())}",
                           node_env={"STICKYSTATE_WATCH_MAX_PER_NODE": str(ns.watchers + 100)})
    cluster.start()
    try:
        base = cluster.router_url
        sids = [f"fan-{i}" for i in range(ns.sessions)]

        async def create() -> None:
            async with aiohttp.ClientSession() as http:
                for sid in sids:
                    async with http.post(f"{base}/v1/sessions", data=orjson.dumps({"id": sid})) as resp:
                        assert resp.status == 201, await resp.text()

        asyncio.run(create())
        pids = {"nodes": [cluster.procs[n].pid for n in cluster.node_ids()], "router": [cluster.procs["router"].pid]}
        report: dict[str, Any] = {"config": vars(ns) | {"kafka_bootstrap": cluster.kafka_bootstrap}}

        meter = CpuMeter(pids)
        meter.start()
        report["without_watchers"] = asyncio.run(_write_phase(base, sids, ns.rate, ns.seconds, None))
        report["without_watchers"]["cpu_pct"] = meter.stop()

        ctx = multiprocessing.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        out_path = str(data_dir / "watch.json")
        proc = ctx.Process(target=_watch_main, args=(base, sids, ns.watchers // ns.sessions, out_path, ready, stop))
        proc.start()
        if not ready.wait(120):
            raise RuntimeError("watchers did not open in 120 s")
        acks: dict[tuple[str, int], float] = {}
        meter = CpuMeter(pids | {"watchers": [proc.pid or 0]})
        meter.start()
        phase = asyncio.run(_write_phase(base, sids, ns.rate, ns.seconds, acks))
        deadline = time.monotonic() + 10
        time.sleep(ns.drain_s)  # let the last events arrive (a bench's drain time, not a synchronisation)
        phase["cpu_pct"] = meter.stop()
        stop.set()
        proc.join(60)
        while not Path(out_path).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        watched = orjson.loads(Path(out_path).read_bytes())
        delays = [recv - acks[(sid, ver)] for sid, ver, recv in watched["received"] if (sid, ver) in acks]
        expected = len(acks) * (ns.watchers // ns.sessions)
        phase["delivery"] = {"deliveries": len(delays), "expected": expected, **watched["counts"],
                             "latency_ms": {"p50": _ms(_pct(delays, 0.5)), "p99": _ms(_pct(delays, 0.99)),
                                            "max": _ms(max(delays) if delays else None)},
                             "early_pct": round(100.0 * sum(d < 0 for d in delays) / max(1, len(delays)), 2)}
        report["with_watchers"] = phase
        without, with_ = report["without_watchers"]["acknowledged_per_s"], phase["acknowledged_per_s"]
        report["throughput_drop_pct"] = round(100.0 * (without - with_) / without, 1) if without else None
        return report
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stickystate.bench.fanout", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--watchers", type=int, default=1000, help="spread evenly over the sessions")
    p.add_argument("--rate", type=float, default=2000.0, help="appends offered per second")
    p.add_argument("--seconds", type=float, default=20.0, help="per phase")
    p.add_argument("--drain-s", type=float, default=3.0, help="after the writes, before the watchers stop")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--partitions", type=int, default=16)
    p.add_argument("--kafka-bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", ""))
    p.add_argument("--out", type=Path, default=Path("results") / f"fanout-{time.strftime('%Y%m%d-%H%M%S')}")
    ns = p.parse_args(argv)
    report = run(ns)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "fanout.json").write_text(json.dumps(report, indent=2, default=str))
    for phase in ("without_watchers", "with_watchers"):
        r = report[phase]
        print(f"{phase}: {r['acknowledged_per_s']}/s acknowledged of {r['offered_per_s']}/s offered, "
              f"append p50 {r['latency_ms']['p50']} ms p99 {r['latency_ms']['p99']} ms, cpu {r['cpu_pct']}")
    d = report["with_watchers"]["delivery"]
    print(f"delivery: {d['deliveries']} of {d['expected']} expected, p50 {d['latency_ms']['p50']} ms, "
          f"p99 {d['latency_ms']['p99']} ms, resets {d['resets']}, refused {d['refused']}; "
          f"throughput drop {report['throughput_drop_pct']}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
