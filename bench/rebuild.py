"""``python -m stickystate.bench.rebuild`` / ``stickystate bench-rebuild``: shard rebuild time vs history length.

For each history length (default 20 and 2,000 changes per session) and with snapshots
on and off, it starts a fresh 2-node stickystate cluster (no standbys, so a takeover
is a rebuild from Kafka, not a promotion), gives every session a 50-message window
(~300-byte messages, the bench workload) and then the given number of appends, waits
until every change is acknowledged by Kafka and (with snapshots) covered by a
checkpoint (the nodes' ``stickystate_snapshot_tail_events`` is 0), kills the node
owning the first session with SIGKILL and reads, from the survivor, how long rebuilding
the victim's shards took and what it read: snapshot records, tail records of ``changes``.

Prints a markdown table and writes ``results/rebuild-<timestamp>.json``. Times are
from the survivor's "shard acquired" records (assignment -> serving), so dead-node
detection is not included. Compare rows of one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from stickystate.protocol import shard_of
from stickystate import kafka_local
from stickystate.local_cluster import LocalCluster, http_json


def log(msg: str) -> None:
    print(f"[rebuild {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _wait(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def _backlog(node_url: str, snapshots: bool) -> int:
    """Events a node has not yet had acknowledged by Kafka, plus (with snapshots) the
    records after its shards' last checkpoint (node metrics)."""
    names = ("stickystate_replication_queue_depth ",) + (("stickystate_snapshot_tail_events ",) if snapshots else ())
    with urllib.request.urlopen(node_url + "/metrics", timeout=2.0) as resp:  # noqa: S310 - loopback only
        text = resp.read().decode()
    return sum(int(float(line.split()[1])) for line in text.splitlines() if line.startswith(names))


def _epochs(recoveries: list[dict[str, Any]], shards: set[int]) -> dict[int, int]:
    """The highest epoch at which each of ``shards`` was acquired, from /internal/status's recoveries."""
    out: dict[int, int] = {}
    for r in recoveries:
        if r["shard"] in shards:
            out[r["shard"]] = max(out.get(r["shard"], 0), r["epoch"])
    return out


async def _load(router: str, sids: list[str], changes: int, window: int, message_bytes: int, concurrency: int) -> int:
    pad = "x" * max(0, message_bytes - 40)
    sem = asyncio.Semaphore(concurrency)
    errors = 0

    async with aiohttp.ClientSession() as http:
        async def call(path: str, body: dict[str, Any]) -> None:
            nonlocal errors
            async with sem:
                for _ in range(5):
                    async with http.post(router + path, data=orjson.dumps(body),
                                         headers={"Content-Type": "application/json"}) as resp:
                        await resp.read()
                        if resp.status < 300:
                            return
                    await asyncio.sleep(0.2)
                errors += 1

        await asyncio.gather(*(call("/v1/sessions", {"id": sid, "data": {"messages": []}}) for sid in sids))
        first = [{"role": "user", "n": i, "text": pad} for i in range(window)]
        await asyncio.gather(*(call(f"/v1/sessions/{sid}/lists/messages", {"items": first, "max_len": window})
                               for sid in sids))

        async def session_turns(sid: str) -> None:
            for n in range(changes):
                await call(f"/v1/sessions/{sid}/lists/messages",
                           {"items": [{"role": "user", "n": window + n, "text": pad}], "max_len": window})

        await asyncio.gather(*(session_turns(sid) for sid in sids))
    return errors


def run_case(kafka: str, data_dir: Path, changes: int, snapshots: bool, args: argparse.Namespace) -> dict[str, Any]:
    env = {"STICKYSTATE_SNAPSHOT_EVERY_EVENTS": str(args.snapshot_every_events if snapshots else 0),
           "STICKYSTATE_SNAPSHOT_MAX_AGE_S": str(args.snapshot_max_age_s)}
    c = LocalCluster(data_dir, nodes=2, partitions=args.partitions, standbys=0, kafka_bootstrap=kafka,
                     topic=f"rebuild-{uuid.uuid4().hex[:8]}", node_env=env)
    c.start()
    try:
        sids = [f"rb-{i}" for i in range(args.sessions)]
        t0 = time.monotonic()
        errors = asyncio.run(_load(c.router_url, sids, changes, args.window, args.message_bytes, args.concurrency))
        log(f"  wrote {args.sessions} sessions x ({changes} + 1 window) changes in {time.monotonic() - t0:.1f}s"
            f" ({errors} errors)")
        # Every change is in Kafka and, with snapshots on, covered by an acknowledged
        # checkpoint (no record after the last checkpoint, nothing queued): waited for,
        # not slept on, so that a late snapshot on a loaded machine cannot leave a
        # session outside the checkpoint the rebuild starts from.
        _wait(lambda: all(_backlog(c.node_url(n), snapshots) == 0 for n in c.node_ids()), 120,
              "replication queues to drain and the snapshots to cover every change")
        view = c.cluster_view()
        victim = view["shards"][str(shard_of(sids[0], c.partitions))]
        survivor = next(n for n in c.node_ids() if n != victim)
        moved = {int(s) for s, owner in view["shards"].items() if owner == victim}
        moved_sessions = [sid for sid in sids if shard_of(sid, c.partitions) in moved]
        # The victim's epoch of each moved shard: the takeover's recovery is the survivor's
        # record of a later epoch (the survivor may hold older records of these shards
        # from start-up, when shards moved between the two nodes).
        before = _epochs(http_json(c.node_url(victim) + "/internal/status")[1]["recoveries"], moved)
        c.kill_node(victim)
        _wait(lambda: c.cluster_view()["settled"]
              and all(c.cluster_view()["shards"][str(s)] == survivor for s in moved), 180, "takeover")

        def takeovers() -> dict[int, dict[str, Any]]:
            last: dict[int, dict[str, Any]] = {}
            for r in http_json(c.node_url(survivor) + "/internal/status")[1]["recoveries"]:
                if r["shard"] in moved and r["epoch"] > before.get(r["shard"], 0):
                    last[r["shard"]] = r
            return last

        _wait(lambda: set(takeovers()) == moved, 180, "recovery records")
        recs = list(takeovers().values())
        return {
            "changes_per_session": changes, "snapshots": snapshots, "sessions_moved": len(moved_sessions),
            "shards_moved": len(moved), "log_events_moved": len(moved_sessions) * (changes + 2),
            "snapshot_records_read": sum(r.get("snapshot_records", 0) for r in recs),
            "snapshot_sessions_loaded": sum(r.get("snapshot_sessions", 0) for r in recs),
            "tail_records": sum(r.get("tail_records", 0) for r in recs),
            "events_applied": sum(r.get("events_applied", 0) for r in recs),
            "rebuild_s_max_shard": max(r["duration_s"] for r in recs),
            "rebuild_s_sum": round(sum(r["duration_s"] for r in recs), 4),
            "snapshot_load_s_sum": round(sum(r.get("snapshot_load_s", 0.0) for r in recs), 4),
            "write_errors": errors,
        }
    finally:
        c.stop()


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| changes/session | snapshots | sessions moved | events in their history | snapshot records read "
            "| tail records replayed | rebuild s (sum over shards) | slowest shard s |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['changes_per_session']} | {'on' if r['snapshots'] else 'off'} | {r['sessions_moved']} "
                     f"| {r['log_events_moved']} | {r['snapshot_records_read']} | {r['tail_records']} "
                     f"| {r['rebuild_s_sum']:.3f} | {r['rebuild_s_max_shard']:.3f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stickystate.bench.rebuild", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--changes", type=lambda v: [int(x) for x in v.split(",")], default=[20, 2000],
                   help="appends per session, one case each")
    p.add_argument("--sessions", type=int, default=40)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--message-bytes", type=int, default=300)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight while loading")
    p.add_argument("--snapshot-every-events", type=int, default=100)
    p.add_argument("--snapshot-max-age-s", type=float, default=5.0)
    p.add_argument("--no-baseline", action="store_true", help="skip the snapshots-off cases")
    p.add_argument("--kafka-bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", ""))
    p.add_argument("--out", type=Path, default=None, help="JSON file (default results/rebuild-<timestamp>.json)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or Path("results") / f"rebuild-{time.strftime('%Y%m%d-%H%M%S')}.json"
    with tempfile.TemporaryDirectory(prefix="stickystate-rebuild-") as tmp:
        broker = None
        kafka = args.kafka_bootstrap
        if not kafka:
            kafka_local.ensure_jars()
            broker = kafka_local.LocalKafka(Path(tmp) / "kafka", log_file=Path(tmp) / "kafka.log")
            broker.start()
            kafka = broker.bootstrap
        try:
            rows: list[dict[str, Any]] = []
            for changes in args.changes:
                for snapshots in (True,) if args.no_baseline else (True, False):
                    log(f"case: {changes} changes/session, snapshots {'on' if snapshots else 'off'}")
                    rows.append(run_case(kafka, Path(tmp) / f"c{len(rows)}", changes, snapshots, args))
                    log(f"  rebuilt: {rows[-1]}")
        finally:
            if broker is not None:
                broker.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows},
                              indent=2, default=str))
    print(table(rows))
    print(f"\n(written {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
