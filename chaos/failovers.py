"""False failovers: the router declared a node down although the schedule had not killed,
paused or stopped it (a busy node taken for a dead one). Pure: the router's log lines and
the schedule's faults in, counts out.

The router logs ``node down`` (``peer``, ``reason``, ``ts``) each time it stops routing to a
node and moves its shards to their standbys (router/cluster.py ``mark_dead``). One is
*expected* when its node is the target of a node fault (kill9, sigstop, graceful) between
the fault (``t_fault``, less ``slack_s``) and the cluster being ready again after it
(``t_ready``, else the recovery, plus ``slack_s``). Every other one is a false failover.
Broker faults excuse nothing: a node that cannot reach Kafka still answers its health checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

NODE_KINDS = ("kill9", "sigstop", "graceful")


def node_down_events(lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """``{"t", "node", "reason"}`` of every ``node down`` line of a router log."""
    out = []
    for line in lines:
        if b"node down" not in (line if isinstance(line, bytes) else line.encode()):
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and doc.get("msg") == "node down":
            out.append({"t": float(doc.get("ts", 0.0)), "node": doc.get("peer"), "reason": doc.get("reason"),
                        "router": doc.get("node")})
    return out


def false_failovers(events: list[dict[str, Any]], faults: list[dict[str, Any]], slack_s: float = 1.0,
                    end: float | None = None, incident_gap_s: float = 3.0) -> dict[str, Any]:
    """Split the routers' ``node down`` events into expected (a node fault of that node covers
    it) and false ones. With several routers each logs its own: false events of one node less
    than ``incident_gap_s`` apart are one incident (one stall, seen by every router)."""
    windows: dict[str, list[tuple[float, float]]] = {}
    for f in faults:
        if f.get("kind") not in NODE_KINDS or not f.get("t_fault"):
            continue
        until = f.get("t_ready") or f.get("t_recovered") or f.get("t_recover") or end or float("inf")
        windows.setdefault(f["target"], []).append((f["t_fault"] - slack_s, until + slack_s))
    false = [e for e in events if not any(a <= e["t"] <= b for a, b in windows.get(e["node"], ()))]
    incidents = 0
    last: dict[Any, float] = {}
    for e in sorted(false, key=lambda e: e["t"]):
        if e["t"] - last.get(e["node"], float("-inf")) >= incident_gap_s:
            incidents += 1
        last[e["node"]] = e["t"]
    by_reason: dict[str, int] = {}
    for e in false:
        cause = "liveness echo silent" if str(e.get("reason") or "").startswith("process silent") else "other"
        by_reason[cause] = by_reason.get(cause, 0) + 1
    return {"definition": "router 'node down' (shards moved away) for a node that no kill9/sigstop/graceful "
                          "fault of the schedule had hit at that time",
            "node_down_events": len(events), "expected": len(events) - len(false), "count": len(false),
            "incidents": incidents, "incident_gap_s": incident_gap_s, "by_reason": by_reason,
            "examples": false[:20]}


def detection(events: list[dict[str, Any]], faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Per node fault kind: fault -> the router's first ``node down`` for its target (before
    the target was back). A pause that ended before the router noticed counts as
    ``unnoticed``: its sessions waited the pause out instead."""
    out: dict[str, Any] = {}
    for kind in NODE_KINDS:
        times, unnoticed = [], 0
        for f in faults:
            if f.get("kind") != kind or not f.get("t_fault"):
                continue
            back = f.get("t_recover") or float("inf")
            hits = [e["t"] for e in events if e["node"] == f["target"] and f["t_fault"] <= e["t"] <= back + 0.05]
            if hits:
                times.append(min(hits) - f["t_fault"])
            else:
                unnoticed += 1
        if times or unnoticed:
            times.sort()
            out[kind] = {"noticed": len(times), "unnoticed": unnoticed,
                         "p50_s": round(times[len(times) // 2], 3) if times else None,
                         "max_s": round(times[-1], 3) if times else None}
    return out

