"""Independent checker of a chaos run.

Shares no code path with recovery except the wire format (``replicator.events.decode``,
and ``replicator.keys.Codec`` to open sealed records with the run's master keys, the keys
topic read whole: records of erased sessions are counted, not replayed): it reads the whole
changes topic (every partition, from offset 0 to the end) with its own aiokafka
consumer, applies the fencing rule with its own few lines (below, ``replay_partition``),
rebuilds every session from the events that count, and compares that with

- what the workload was told (acks, errors, the lists in responses and reads), and
- every session read back through the router at the end.

Fencing rule (the one the readers of a partition apply), restated here on purpose:
a claim is effective only if its epoch is higher than every earlier claim's in the
partition; a change event counts only if its (epoch, node) equals the latest effective
claim's (epoch, node) at that point; among counting events, one whose version is not
newer than the session's is a duplicate and is ignored.

Reported:
- acknowledged appends lost (per durability): acked token absent from the final read;
- appends visible that were never attempted (phantoms);
- order violations (seqs not strictly increasing, duplicates) in the final state, the
  log-rebuilt state, and every list a client was shown;
- stale reads: a list shown after an ack that lacks the acked token, or that lacks a
  token an earlier answer (completed before this request was sent) showed;
- client-visible errors by status;
- failover time per fault: fault -> first successful request of each affected session
  (one whose shard the faulted node owned), p50/p99;
- whether the log-rebuilt state agrees with the router's answer.
"""

from __future__ import annotations

import asyncio
import base64
import time
import zlib
from array import array
from bisect import bisect_right
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stickystate.chaos.workload import LIST_FIELD, Observation, compress_seqs, parse_items
from stickystate.replicator.events import decode  # the one shared piece: the wire format
from stickystate.replicator.keys import Codec, KeyErased

CLAIM_KEY = b"#claim"  # "#" never occurs in a session id: no session can collide with it
EXAMPLES = 20


def shard_of(sid: str, partitions: int) -> int:
    """CRC-32 (IEEE) of the UTF-8 id mod P: the documented placement, reimplemented."""
    return zlib.crc32(sid.encode()) % partitions


# ------------------------------------------------------------------------------ the log
@dataclass
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 0


async def _partitions_of(bootstrap: str, topic: str, deadline: float) -> list[int]:
    """The topic's partitions, from the broker's metadata (not from the cluster's settings)."""
    last: object = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="stickystate-chaos-checker-admin")
        try:
            await admin.start()
            desc = await admin.describe_topics([topic])
            parts = [int(p["partition"]) for p in (desc[0].get("partitions") or [])] if desc else []
            if parts and not desc[0].get("error_code"):
                return sorted(parts)
            last = desc
        except Exception as exc:  # broker just restarted, metadata not there yet
            last = exc
        finally:
            await admin.close()
        await asyncio.sleep(0.5)
    raise RuntimeError(f"topic {topic!r} not found on {bootstrap}: {last!r}")


async def read_topic(bootstrap: str, topic: str, timeout_s: float = 120.0) -> tuple[int, list[Record]]:
    """Every record of every partition of ``topic``, from offset 0 to the end offsets now."""
    deadline = time.monotonic() + timeout_s
    parts = await _partitions_of(bootstrap, topic, deadline)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="stickystate-chaos-checker",
                                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        out: list[Record] = []
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            if time.monotonic() > deadline:
                raise RuntimeError(f"reading {topic!r} did not finish in {timeout_s}s; left: "
                                   f"{sorted(tp.partition for tp in remaining)}")
            batches = await consumer.getmany(*remaining, timeout_ms=1000, max_records=10_000)
            for tp, recs in batches.items():
                for r in recs:
                    if r.offset < ends[tp]:
                        out.append(Record(tp.partition, r.offset, r.key, r.value, r.timestamp))
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        out.sort(key=lambda r: (r.partition, r.offset))
        return len(tps), out
    finally:
        await consumer.stop()


async def read_sealed_log(bootstrap: str, topic: str, master_keys: str,
                          timeout_s: float = 120.0) -> tuple[int, list[Record], list[Record], Codec]:
    """Every record of ``topic`` (a cluster's ``changes``) and of its ``keys`` topic, and the
    codec that opens the sealed records with the cluster's master keys (``kid:base64,...``).
    Replaying sealed records without it finds no appends at all, which the checker reports
    as every acknowledged append lost."""
    from stickystate.crypto import parse_master_keys
    from stickystate.replicator.keys import offline_codec
    from stickystate.replicator.settings import ReplicatorSettings

    partitions, records = await read_topic(bootstrap, topic, timeout_s)
    _, key_records = await read_topic(bootstrap, ReplicatorSettings(changes_topic=topic).keys_topic, timeout_s)
    return partitions, records, key_records, offline_codec(parse_master_keys(master_keys), key_records, partitions)


@dataclass
class TokenEvent:
    partition: int
    offset: int
    epoch: Any
    node: Any
    ver: Any
    verdict: str  # applied | fenced | duplicate | skipped


@dataclass
class LogReplay:
    partitions: int = 0
    records: int = 0
    sessions: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # sid -> {"version","data"}
    token_events: dict[tuple[str, int], list[TokenEvent]] = field(default_factory=lambda: defaultdict(list))
    stats: Counter = field(default_factory=Counter)
    claims: dict[int, list[tuple[int, int, str, bool]]] = field(default_factory=lambda: defaultdict(list))
    anomalies: list[dict[str, Any]] = field(default_factory=list)

    def anomaly(self, kind: str, **kw: Any) -> None:
        self.stats["anomaly_" + kind] += 1
        if sum(1 for a in self.anomalies if a["kind"] == kind) < EXAMPLES:
            self.anomalies.append({"kind": kind, **kw})


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _apply_min(state: dict[str, Any] | None, ev: dict[str, Any]) -> dict[str, Any] | None:
    """Just enough of the operations to rebuild data (the workload uses create + append)."""
    op = ev["op"]
    if op in ("create", "replace") and (op == "create" or state is None):
        return {"version": ev["ver"], "data": dict(ev.get("data") or {})}
    if state is None:
        raise KeyError("operation on an absent session")
    if op in ("delete", "expire"):
        return None
    data = state["data"]
    if op == "replace":
        data = dict(ev.get("data") or {})
    elif op == "append":
        cur = data.get(ev["field"])
        cur = list(cur) if isinstance(cur, list) else []
        cur.extend(ev.get("items") or [])
        if ev.get("max_len") is not None and len(cur) > ev["max_len"]:
            cur = cur[len(cur) - ev["max_len"]:]
        data[ev["field"]] = cur
    elif op == "patch":
        data = _merge_patch(data, ev.get("patch"))
    elif op == "set_key":
        data[ev["key"]] = ev.get("value")
    elif op == "delete_key":
        data.pop(ev["key"], None)
    else:
        raise KeyError(f"unknown op {op!r}")
    state["data"] = data
    state["version"] = ev["ver"]
    return state


def _fingerprint(ev: dict[str, Any]) -> tuple[Any, ...]:
    return (ev.get("op"), ev.get("field"), repr(ev.get("items")), repr(ev.get("data")), repr(ev.get("patch")),
            ev.get("key"), repr(ev.get("value")))


def replay(records: list[Record], partitions: int, watch: set[str] | None = None,
           codec: Codec | None = None) -> LogReplay:
    """Apply the fencing rule to every partition; rebuild sessions. ``records`` sorted by
    (partition, offset). ``watch``: session ids whose per-token event history is kept.
    ``codec``: opens sealed records (None: plaintext)."""
    out = LogReplay(partitions=partitions, records=len(records))
    by_part: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        by_part[r.partition].append(r)
    for p, recs in sorted(by_part.items()):
        replay_partition(p, recs, out, watch, codec)
    return out


def replay_partition(p: int, recs: list[Record], out: LogReplay, watch: set[str] | None,
                     codec: Codec | None = None) -> None:
    max_epoch = 0
    current: tuple[Any, Any] | None = None  # (epoch, node) of the latest effective claim
    fingerprints: dict[tuple[str, int], tuple[Any, ...]] = {}
    prev_offset = -1
    for r in recs:
        if r.offset <= prev_offset:
            out.anomaly("offset_order", partition=p, offset=r.offset)
        prev_offset = r.offset
        try:
            ev = decode(r.value) if codec is None else codec.decode_change(p, r.key, r.value)
        except KeyErased:
            out.stats["erased"] += 1  # its session was deleted or expired: its key is gone
            continue
        except (ValueError, LookupError) as exc:
            out.anomaly("undecodable", partition=p, offset=r.offset, error=str(exc))
            continue
        if ev.get("op") == "claim":
            out.stats["claims"] += 1
            if r.key != CLAIM_KEY:
                out.anomaly("claim_key", partition=p, offset=r.offset, key=repr(r.key))
            if ev.get("shard") not in (None, p):
                out.anomaly("claim_shard", partition=p, offset=r.offset, shard=ev.get("shard"))
            epoch = ev.get("epoch")
            effective = isinstance(epoch, int) and epoch > max_epoch
            out.claims[p].append((r.offset, epoch, ev.get("node"), effective))
            if effective:
                max_epoch = epoch
                current = (epoch, ev.get("node"))
                out.stats["claims_effective"] += 1
            else:
                out.stats["claims_stale"] += 1
            continue
        out.stats["change_events"] += 1
        sid = ev.get("sid")
        if not isinstance(sid, str):
            out.anomaly("no_sid", partition=p, offset=r.offset)
            continue
        if r.key != sid.encode():
            out.anomaly("key_mismatch", partition=p, offset=r.offset, sid=sid, key=repr(r.key))
        if shard_of(sid, out.partitions) != p:
            out.anomaly("wrong_partition", partition=p, offset=r.offset, sid=sid,
                        expected=shard_of(sid, out.partitions))
        tokens: list[int] = []
        if watch is not None and sid in watch and ev.get("op") == "append":
            tokens = list(parse_items(sid, ev.get("items"))[0])
        counts = current is not None and (ev.get("epoch"), ev.get("node")) == current
        verdict = "applied"
        if not counts:
            verdict = "fenced"
            out.stats["fenced_events"] += 1
        else:
            state = out.sessions.get(sid)
            ver = ev.get("ver")
            fp = _fingerprint(ev)
            if state is not None and isinstance(ver, int) and ver <= state["version"]:
                verdict = "duplicate"
                out.stats["duplicate_events"] += 1
                seen = fingerprints.get((sid, ver))
                if seen is not None and seen != fp:
                    out.anomaly("conflicting_duplicate", partition=p, offset=r.offset, sid=sid, ver=ver,
                                op=ev.get("op"), items=ev.get("items"))
            else:
                if state is not None and ver != state["version"] + 1:
                    out.anomaly("version_gap", partition=p, offset=r.offset, sid=sid, ver=ver,
                                previous=state["version"])
                if state is None and ev.get("op") not in ("create", "replace"):
                    out.anomaly("write_to_absent", partition=p, offset=r.offset, sid=sid, op=ev.get("op"), ver=ver)
                try:
                    out.sessions[sid] = _apply_min(state, ev)
                    out.stats["applied_events"] += 1
                    fingerprints[(sid, ver)] = fp
                    if ev.get("op") in ("delete", "expire"):
                        out.stats["deleted_" + ev["op"]] += 1
                except (KeyError, TypeError) as exc:
                    verdict = "skipped"
                    out.anomaly("unappliable", partition=p, offset=r.offset, sid=sid, op=ev.get("op"),
                                error=str(exc))
        for seq in tokens:
            out.token_events[(sid, seq)].append(TokenEvent(p, r.offset, ev.get("epoch"), ev.get("node"),
                                                           ev.get("ver"), verdict))


# ------------------------------------------------------------------------------ checks
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(q / 100.0 * len(v) + 0.5)) - 1))
    return round(v[k], 4)


def _status_key(o: Observation) -> str:
    if o.done is None:
        return "unknown (cancelled at end)"
    if o.status == 0:
        return f"0 {o.error}"
    return f"{o.status} {o.error or ''}".strip()


def _order_problems(seqs: Any, excused: set[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Duplicates, and adjacent pairs (a, b) with b <= a among non-excused seqs."""
    seen: set[int] = set()
    dups: list[int] = []
    for s in seqs:
        if s in seen:
            dups.append(s)
        seen.add(s)
    inversions: list[tuple[int, int]] = []
    prev = None
    for s in seqs:
        if s in excused:
            continue
        if prev is not None and s <= prev and s not in dups:
            inversions.append((prev, s))
        prev = s if prev is None else max(prev, s)
    return dups, inversions


@dataclass
class FaultInfo:
    index: int
    kind: str
    target: str
    t_fault: float
    t_ready: float | None
    t_recover: float | None
    shards: set[int]
    hold_s: float = 0.0
    detail: str = ""  # e.g. "active controller" (a broker fault that hit the KRaft leader)

    @property
    def label(self) -> str:
        return f"#{self.index} {self.kind} {self.target}" + (f" ({self.detail})" if self.detail else "")

    @property
    def group(self) -> str:
        """What the report aggregates outages by: the kind, split by detail."""
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


def _faults(faults: list[dict[str, Any]]) -> list[FaultInfo]:
    out = [FaultInfo(f["index"], f["kind"], f["target"], f["t_fault"], f.get("t_ready"), f.get("t_recover"),
                     set(f.get("shards") or ()), f.get("hold_s", 0.0), f.get("detail") or "")
           for f in faults if f.get("t_fault")]
    out.sort(key=lambda f: f.t_fault)
    return out


def _attribute(t: float, shard: int, faults: list[FaultInfo]) -> dict[str, Any] | None:
    """The latest fault that began at or before ``t``."""
    times = [f.t_fault for f in faults]
    i = bisect_right(times, t) - 1
    if i < 0:
        return None
    f = faults[i]
    return {"fault": f.label, "since_fault_s": round(t - f.t_fault, 3),
            "after_recovery_s": None if f.t_recover is None else round(t - f.t_recover, 3),
            "shard_affected": shard in f.shards}


def check(*, sessions: dict[str, str], appends: list[Observation], reads: list[Observation],
          final: dict[str, Observation], log: LogReplay, faults: list[dict[str, Any]],
          partitions: int) -> dict[str, Any]:
    """The report (a JSON-able dict). ``sessions``: sid -> durability."""
    fis = _faults(faults)
    durabilities = ("log", "memory")
    rep: dict[str, Any] = {}

    by_sid: dict[str, dict[int, Observation]] = defaultdict(dict)
    for o in appends:
        by_sid[o.sid][o.seq] = o

    # -- appends: attempted / acked / errors ---------------------------------------------
    att = Counter()
    acked = Counter()
    failed = Counter()
    unknown = Counter()
    errors_app: dict[str, Counter] = {d: Counter() for d in durabilities}
    for o in appends:
        d = sessions[o.sid]
        att[d] += 1
        if o.ok:
            acked[d] += 1
        elif o.done is None:
            unknown[d] += 1
        else:
            failed[d] += 1
        if not o.ok:
            errors_app[d][_status_key(o)] += 1
    errors_read = Counter(_status_key(o) for o in reads if not o.ok)
    rep["appends"] = {
        "attempted": {**{d: att[d] for d in durabilities}, "total": sum(att.values())},
        "acknowledged": {**{d: acked[d] for d in durabilities}, "total": sum(acked.values())},
        "failed": {**{d: failed[d] for d in durabilities}, "total": sum(failed.values())},
        "unknown_outcome": {**{d: unknown[d] for d in durabilities}, "total": sum(unknown.values())},
    }
    rep["reads"] = {"attempted": len(reads), "ok": sum(o.ok for o in reads)}
    rep["errors"] = {
        "appends": {d: dict(errors_app[d].most_common()) for d in durabilities},
        "appends_total": sum(sum(c.values()) for c in errors_app.values()),
        "reads": dict(errors_read.most_common()),
        "reads_total": sum(errors_read.values()),
        "by_status": dict(Counter(
            ("unknown" if o.done is None else str(o.status)) for o in list(appends) + list(reads) if not o.ok
        ).most_common()),
    }

    # -- final state vs acks ---------------------------------------------------------------
    final_seqs: dict[str, array | None] = {}
    final_failed: list[dict[str, Any]] = []
    for sid in sessions:
        o = final.get(sid)
        if o is None or not o.ok:
            final_seqs[sid] = None
            final_failed.append({"sid": sid, "status": None if o is None else o.status,
                                 "error": None if o is None else o.error})
        else:
            final_seqs[sid] = o.seqs
    log_seqs: dict[str, array | None] = {}
    log_foreign: dict[str, list[Any]] = {}
    for sid in sessions:
        st = log.sessions.get(sid)
        if st is None:
            log_seqs[sid] = None
        else:
            seqs, foreign = parse_items(sid, st["data"].get(LIST_FIELD))
            log_seqs[sid] = seqs
            if foreign:
                log_foreign[sid] = foreign

    def token_history(sid: str, seq: int) -> list[dict[str, Any]]:
        return [{"partition": e.partition, "offset": e.offset, "epoch": e.epoch, "node": e.node, "ver": e.ver,
                 "verdict": e.verdict} for e in log.token_events.get((sid, seq), [])]

    lost: dict[str, list[dict[str, Any]]] = {d: [] for d in durabilities}
    lost_in_log: dict[str, int] = {d: 0 for d in durabilities}
    errored_applied = Counter()
    errored_absent = Counter()
    for sid, d in sessions.items():
        fs = set(final_seqs[sid]) if final_seqs[sid] is not None else None
        ls = set(log_seqs[sid]) if log_seqs[sid] is not None else set()
        shard = shard_of(sid, partitions)
        for seq, o in sorted(by_sid[sid].items()):
            if o.ok:
                if fs is not None and seq not in fs:
                    lost[d].append({"sid": sid, "seq": seq, "shard": shard, "durability": d,
                                    "acked_at": round(o.done or 0, 4), "owner": o.owner, "epoch": o.epoch,
                                    "retries": o.retries, "in_log_state": seq in ls,
                                    "log_events": token_history(sid, seq),
                                    "fault": _attribute(o.done or o.sent, shard, fis)})
                if seq not in ls:
                    lost_in_log[d] += 1
            elif fs is not None:
                if seq in fs:
                    errored_applied[d] += 1
                else:
                    errored_absent[d] += 1
    rep["lost_acked"] = {
        **{d: len(lost[d]) for d in durabilities},
        "not_in_log_state": lost_in_log,
        "examples": {d: lost[d][:EXAMPLES] for d in durabilities},
    }
    rep["failed_appends_outcome"] = {
        "applied_anyway": dict(errored_applied), "absent": dict(errored_absent),
        "note": "an append answered with an error (or never answered) may or may not have been applied",
    }
    rep["final_reads_failed"] = final_failed

    # -- phantoms + order -----------------------------------------------------------------
    phantoms: list[dict[str, Any]] = []
    order: list[dict[str, Any]] = []
    order_count = Counter()

    def excused_of(sid: str) -> set[int]:
        # an append the client never saw answered may be applied late by a retry: its place is unknown
        return {s for s, o in by_sid[sid].items() if o.done is None or o.error == "client_timeout"}

    excused = {sid: excused_of(sid) for sid in sessions}

    def inspect(source: str, sid: str, seqs: Any, foreign: list[Any] | None, at: float | None) -> bool:
        attempted = by_sid[sid]
        bad = [s for s in seqs if s not in attempted]
        if bad or foreign:
            phantoms.append({"source": source, "sid": sid, "seqs": bad[:10], "foreign": (foreign or [])[:5],
                             "at": at})
        dups, inv = _order_problems(seqs, excused[sid])
        if dups or inv:
            order_count[source] += 1
            if len([x for x in order if x["source"] == source]) < EXAMPLES:
                order.append({"source": source, "sid": sid, "duplicates": dups[:10], "inversions": inv[:10],
                              "at": at, "list": compress_seqs(seqs)[:400]})
            return True
        return False

    for sid in sessions:
        if final_seqs[sid] is not None:
            inspect("final_read", sid, final_seqs[sid], final[sid].foreign, final[sid].done)
        if log_seqs[sid] is not None:
            inspect("log_state", sid, log_seqs[sid], log_foreign.get(sid), None)
    for o in appends:
        if o.ok and o.seqs is not None:
            inspect("append_response", o.sid, o.seqs, o.foreign, o.done)
    for o in reads:
        if o.ok and o.seqs is not None:
            inspect("read", o.sid, o.seqs, o.foreign, o.done)
    rep["phantoms"] = {"count": len(phantoms), "examples": phantoms[:EXAMPLES]}
    rep["order_violations"] = {"count": sum(order_count.values()), "by_source": dict(order_count),
                               "excused_unknown_outcome_appends": sum(len(v) for v in excused.values()),
                               "examples": order}

    # -- stale reads ---------------------------------------------------------------------
    rep["stale_reads"] = _stale_reads(sessions, by_sid, appends, reads, final, final_seqs, fis, partitions)

    # -- failover ------------------------------------------------------------------------
    rep["failover"] = _failover(sessions, appends, reads, fis, partitions)

    # -- log vs router -------------------------------------------------------------------
    mismatches: list[dict[str, Any]] = []
    compared = 0
    for sid in sessions:
        if final_seqs[sid] is None:
            continue
        compared += 1
        st = log.sessions.get(sid)
        fo = final[sid]
        lv = None if st is None else st["version"]
        if st is None or lv != fo.version or list(log_seqs[sid] or []) != list(final_seqs[sid]):
            fs, ls = list(final_seqs[sid]), list(log_seqs[sid] or [])
            mismatches.append({"sid": sid, "shard": shard_of(sid, partitions), "durability": sessions[sid],
                               "router_version": fo.version, "log_version": lv, "router_owner": fo.owner,
                               "only_in_router": sorted(set(fs) - set(ls))[:20],
                               "only_in_log": sorted(set(ls) - set(fs))[:20],
                               "router_len": len(fs), "log_len": len(ls)})
    rep["log_vs_router"] = {"compared": compared, "agree": compared - len(mismatches),
                            "disagree": len(mismatches), "examples": mismatches[:EXAMPLES]}

    # -- fenced events that carried acknowledged tokens -----------------------------------
    fenced_acked: dict[str, list[dict[str, Any]]] = {d: [] for d in durabilities}
    for (sid, seq), evs in log.token_events.items():
        if sid not in sessions:
            continue
        o = by_sid[sid].get(seq)
        if o is None or not o.ok:
            continue
        if evs and all(e.verdict == "fenced" for e in evs):
            fenced_acked[sessions[sid]].append({"sid": sid, "seq": seq, "acked_at": round(o.done or 0, 4),
                                                "owner": o.owner, "epoch": o.epoch,
                                                "log_events": token_history(sid, seq)})
    rep["acked_only_in_fenced_events"] = {
        **{d: len(fenced_acked[d]) for d in durabilities},
        "examples": {d: sorted(fenced_acked[d], key=lambda x: x["acked_at"])[:EXAMPLES] for d in durabilities},
    }

    rep["log"] = {"partitions": log.partitions, "records": log.records, **dict(log.stats),
                  "anomalies": log.anomalies,
                  "sessions_in_log": sum(1 for s in sessions if log.sessions.get(s) is not None)}

    failures = []
    if rep["lost_acked"]["log"]:
        failures.append(f"{rep['lost_acked']['log']} log-acknowledged appends lost")
    if rep["order_violations"]["count"]:
        failures.append(f"{rep['order_violations']['count']} order violations")
    if final_failed:
        failures.append(f"{len(final_failed)} sessions could not be read back at the end")
    if rep["appends"]["attempted"]["total"] == 0:
        failures.append("no append was attempted")
    rep["failures"] = failures
    rep["ok"] = not failures
    return rep


def _stale_reads(sessions: dict[str, str], by_sid: dict[str, dict[int, Observation]], appends: list[Observation],
                 reads: list[Observation], final: dict[str, Observation], final_seqs: dict[str, array | None],
                 fis: list[FaultInfo], partitions: int) -> dict[str, Any]:
    """For each list a client was shown (append responses, reads, final reads):

    - after_ack: it lacks a token whose append was acknowledged before this request was
      sent (only tokens present in the final state count: a lost token is reported as lost);
    - monotonic: it lacks a token that an earlier answer, completed before this request
      was sent, showed (``version_regressions``: its version is lower than such an answer's). ``transient``: the token is in the final state (this answer came
      from a stale copy); ``rolled_back``: it is not (an earlier answer showed data that was
      later lost, e.g. a memory-acknowledged append or one applied by a zombie owner).
    """
    obs_by_sid: dict[str, list[Observation]] = defaultdict(list)
    for o in list(appends) + list(reads) + list(final.values()):
        if o.ok and o.seqs is not None and o.done is not None:
            obs_by_sid[o.sid].append(o)
    res: dict[str, Any] = {}
    for d in ("log", "memory"):
        res[d] = {"after_ack": 0, "after_ack_tokens": 0, "monotonic_transient": 0, "monotonic_rolled_back": 0,
                  "rolled_back_tokens": 0, "version_regressions": 0, "by_kind": Counter(), "examples": []}
    own_missing: list[dict[str, Any]] = []
    for sid, d in sessions.items():
        r = res[d]
        shard = shard_of(sid, partitions)
        fs = set(final_seqs[sid]) if final_seqs[sid] is not None else set()
        acks = sorted((o.done, o.seq) for o in by_sid[sid].values() if o.ok and o.done is not None)
        obs = sorted(obs_by_sid[sid], key=lambda o: o.sent)
        by_done = sorted(obs_by_sid[sid], key=lambda o: o.done)  # type: ignore[arg-type, return-value]
        required: set[int] = set()
        seen: set[int] = set()
        seen_from: dict[int, Observation] = {}
        max_version = 0
        ai = di = 0
        for o in obs:
            while ai < len(acks) and acks[ai][0] < o.sent:
                if acks[ai][1] in fs:
                    required.add(acks[ai][1])
                ai += 1
            while di < len(by_done) and by_done[di].done < o.sent:  # type: ignore[operator]
                max_version = max(max_version, by_done[di].version or 0)
                for s in by_done[di].seqs:  # type: ignore[union-attr]
                    if s not in seen:
                        seen.add(s)
                        seen_from[s] = by_done[di]
                di += 1
            if o.version is not None and o.version < max_version:
                r["version_regressions"] += 1
            shown = set(o.seqs)  # type: ignore[arg-type]
            if o.kind == "append" and o.seq not in shown:
                own_missing.append({"sid": sid, "seq": o.seq, "owner": o.owner, "at": o.done})
            miss_ack = required - shown
            miss_seen = seen - shown
            transient = {s for s in miss_seen if s in fs}
            rolled = miss_seen - transient
            if miss_ack:
                r["after_ack"] += 1
                r["after_ack_tokens"] += len(miss_ack)
            if transient:
                r["monotonic_transient"] += 1
            if rolled:
                r["monotonic_rolled_back"] += 1
                r["rolled_back_tokens"] += len(rolled)
                seen -= rolled  # counted once per disappearance (counted again if it comes back and goes)
            if miss_ack or miss_seen:
                r["by_kind"][o.kind] += 1
                if len(r["examples"]) < EXAMPLES:
                    first = min(miss_ack | miss_seen)
                    src = seen_from.get(first)
                    r["examples"].append({
                        "sid": sid, "shard": shard, "kind": o.kind, "seq": o.seq if o.kind == "append" else None,
                        "sent": round(o.sent, 4), "done": round(o.done or 0, 4), "owner": o.owner, "epoch": o.epoch,
                        "version": o.version, "missing_acked": sorted(miss_ack)[:10],
                        "missing_seen_transient": sorted(transient)[:10], "missing_seen_rolled_back": sorted(rolled)[:10],
                        "earlier_answer": None if src is None else {"kind": src.kind, "done": round(src.done or 0, 4),
                                                                    "owner": src.owner, "epoch": src.epoch,
                                                                    "version": src.version},
                        "shown": compress_seqs(o.seqs)[-120:],
                        "fault": _attribute(o.sent, shard, fis)})
    for d in res:
        res[d]["by_kind"] = dict(res[d]["by_kind"])
    res["acked_append_response_without_its_token"] = {"count": len(own_missing), "examples": own_missing[:EXAMPLES]}
    return res


def _failover(sessions: dict[str, str], appends: list[Observation], reads: list[Observation],
              fis: list[FaultInfo], partitions: int) -> dict[str, Any]:
    """Per fault and affected session: fault time -> first successful request completed after it.

    Node faults: affected sessions are those whose shard the node owned; any request
    counts (an answer from the faulted node itself within 0.1 s of the fault was already
    on its way and is skipped). Kafka faults: every session; appends sent after the fault.
    """
    obs_by_sid: dict[str, list[Observation]] = defaultdict(list)
    for o in list(appends) + list(reads):
        if o.done is not None:
            obs_by_sid[o.sid].append(o)
    for v in obs_by_sid.values():
        v.sort(key=lambda o: o.done)  # type: ignore[arg-type, return-value]
    per_fault: list[dict[str, Any]] = []
    samples_by_kind: dict[str, list[float]] = defaultdict(list)
    outages_by_kind: dict[str, list[float]] = defaultdict(list)
    log_outages_by_kind: dict[str, list[float]] = defaultdict(list)  # `log` sessions only
    gaps_by_kind: dict[str, list[float]] = defaultdict(list)
    all_samples: list[float] = []
    never = 0
    for f in fis:
        kafka = f.target.startswith("kafka")  # the broker, or one broker of a replicated cluster
        times: list[float] = []
        outages: list[float] = []
        missing = 0
        errors = 0
        window_end = (f.t_ready or f.t_fault) + 2.0
        affected = [sid for sid in sessions if shard_of(sid, partitions) in f.shards]
        for sid in affected:
            first = None
            last_error = None
            for o in obs_by_sid.get(sid, []):
                if o.done <= f.t_fault:  # type: ignore[operator]
                    continue
                if f.t_fault <= o.sent <= window_end and not o.ok:
                    errors += 1
                    last_error = o.done
                if first is not None or not o.ok:
                    continue
                if kafka and (o.kind != "append" or o.sent < f.t_fault):
                    continue
                if not kafka and o.owner == f.target and o.done < f.t_fault + 0.1:  # type: ignore[operator]
                    continue
                first = o.done - f.t_fault  # type: ignore[operator]
            if first is None:
                missing += 1
            else:
                times.append(first)
            # outage: until the first success after the session's last error in the window
            after = [o.done for o in obs_by_sid.get(sid, []) if o.ok and o.done > max(f.t_fault, last_error or 0)
                     and (not kafka or o.kind == "append")]  # type: ignore[operator]
            if after:
                outages.append(min(after) - f.t_fault)  # type: ignore[operator]
                if sessions[sid] == "log":
                    log_outages_by_kind[f.group].append(min(after) - f.t_fault)  # type: ignore[operator]
        never += missing
        samples_by_kind[f.kind] += times
        all_samples += times
        per_fault.append({"fault": f.label, "t_fault": round(f.t_fault, 4), "hold_s": f.hold_s,
                          "shards": len(f.shards), "affected_sessions": len(affected),
                          "recovered_sessions": len(times), "never_recovered_sessions": missing,
                          "p50_s": percentile(times, 50), "p99_s": percentile(times, 99),
                          "max_s": round(max(times), 4) if times else None,
                          "client_errors_in_window": errors,
                          "outage_p50_s": percentile(outages, 50), "outage_p99_s": percentile(outages, 99),
                          "ready_after_s": None if f.t_ready is None else round(f.t_ready - f.t_fault, 3)})
        outages_by_kind[f.group] += outages
        gap = write_gap(appends, f.t_fault, window_end)
        if gap is not None:
            gaps_by_kind[f.group].append(gap)
        per_fault[-1]["write_outage_s"] = gap
    node_samples = [t for k, v in samples_by_kind.items() if not k.startswith(("kafka", "broker")) for t in v]
    return {
        "definition": "fault time -> first successful request of each affected session",
        "samples": len(all_samples), "never": never,
        "p50_s": percentile(all_samples, 50), "p99_s": percentile(all_samples, 99),
        "node_faults": {"samples": len(node_samples), "p50_s": percentile(node_samples, 50),
                        "p99_s": percentile(node_samples, 99)},
        "outage_definition": "fault time -> first success after the session's last error in the fault window "
                             "(Kafka faults: appends only)",
        "per_kind": {k: {"samples": len(v), "p50_s": percentile(v, 50), "p99_s": percentile(v, 99),
                         "max_s": round(max(v), 4) if v else None} for k, v in sorted(samples_by_kind.items())},
        "per_fault": per_fault,
        "outage_per_kind": {k: {"samples": len(v), "p50_s": percentile(v, 50), "p99_s": percentile(v, 99),
                                "max_s": round(max(v), 4) if v else None} for k, v in sorted(outages_by_kind.items())},
        "log_outage_per_kind": {k: {"samples": len(v), "p50_s": percentile(v, 50), "p99_s": percentile(v, 99),
                                    "max_s": round(max(v), 4) if v else None}
                                for k, v in sorted(log_outages_by_kind.items())},
        "write_outage_definition": "per fault: the first failed append sent after the fault -> the first "
                                   "successful append completed after that failure (0 when no append failed)",
        "write_outage_per_kind": {k: {"faults": len(v), "p50_s": percentile(v, 50), "p99_s": percentile(v, 99),
                                      "max_s": round(max(v), 4) if v else None}
                                  for k, v in sorted(gaps_by_kind.items())},
    }


def write_gap(appends: list[Observation], t_fault: float, window_end: float) -> float | None:
    """First failed append sent in [t_fault, window_end] -> first successful append completed
    after that failure; 0.0 if none failed, None if none succeeded after it."""
    failed = [o.done for o in appends if not o.ok and o.done is not None and t_fault <= o.sent <= window_end]
    if not failed:
        return 0.0
    first = min(failed)
    ok = [o.done for o in appends if o.ok and o.done is not None and o.done > first]
    return round(min(ok) - first, 4) if ok else None


# ------------------------------------------------------------------------------ text
def summary_text(rep: dict[str, Any]) -> str:
    L: list[str] = []
    a = rep["appends"]
    w = rep.get("workload", {})
    L.append(f"chaos run: {'PASS' if rep['ok'] else 'FAIL'}" + ("" if rep["ok"] else " -- " + "; ".join(rep["failures"])))
    if rep.get("run"):
        r = rep["run"]
        L.append(f"  seed {r.get('seed')}, {r.get('nodes')} nodes, {r.get('partitions')} partitions, "
                 f"standbys {r.get('standbys')}, workload {r.get('workload_s')}s, out {r.get('out')}")
    if w:
        L.append(f"  sessions: {w.get('sessions')} ({w.get('sessions_log')} log, {w.get('sessions_memory')} memory), "
                 f"rate {w.get('rate')}/s appends, {w.get('read_rate')}/s reads")
    L.append("appends   attempted {t} (log {l}, memory {m}); acknowledged {at} (log {al}, memory {am}); "
             "failed {ft}; unknown outcome {ut}".format(
                 t=a["attempted"]["total"], l=a["attempted"]["log"], m=a["attempted"]["memory"],
                 at=a["acknowledged"]["total"], al=a["acknowledged"]["log"], am=a["acknowledged"]["memory"],
                 ft=a["failed"]["total"], ut=a["unknown_outcome"]["total"]))
    L.append(f"reads     attempted {rep['reads']['attempted']}, ok {rep['reads']['ok']}")
    fl = rep.get("faults", [])
    L.append(f"faults    {len(fl)} injected" + (": " + ", ".join(
        f"{f['kind']} {f['target']}" + (f" [{f['error']}]" if f.get("error") else "") for f in fl) if fl else ""))
    lo = rep["lost_acked"]
    L.append(f"LOST acknowledged appends: log {lo['log']}, memory {lo['memory']} "
             f"(absent from log-rebuilt state: log {lo['not_in_log_state']['log']}, "
             f"memory {lo['not_in_log_state']['memory']})")
    L.append(f"phantom appends (never attempted): {rep['phantoms']['count']}")
    ov = rep["order_violations"]
    L.append(f"ORDER violations: {ov['count']} {ov['by_source'] or ''}".rstrip())
    s = rep["stale_reads"]
    for d in ("log", "memory"):
        x = s[d]
        L.append(f"stale reads [{d}]: missing an acked append {x['after_ack']}, "
                 f"missing what an earlier answer showed: transient {x['monotonic_transient']}, "
                 f"rolled back {x['monotonic_rolled_back']} ({x['rolled_back_tokens']} tokens); "
                 f"version went backwards {x['version_regressions']} {x['by_kind'] or ''}".rstrip())
    own = s["acked_append_response_without_its_token"]["count"]
    if own:
        L.append(f"acked append responses not showing their own token: {own}")
    fa = rep["acked_only_in_fenced_events"]
    L.append(f"acked appends only in fenced log events: log {fa['log']}, memory {fa['memory']}")
    e = rep["errors"]
    L.append(f"client errors: appends {e['appends_total']} {dict(e['by_status'])}; reads {e['reads_total']}")
    for d in ("log", "memory"):
        if e["appends"][d]:
            L.append(f"    appends [{d}]: " + ", ".join(f"{k}: {v}" for k, v in e["appends"][d].items()))
    if e["reads"]:
        L.append("    reads: " + ", ".join(f"{k}: {v}" for k, v in e["reads"].items()))
    f = rep["failover"]
    nf = f["node_faults"]
    L.append(f"failover (fault -> first success per affected session): p50 {f['p50_s']}s, p99 {f['p99_s']}s, "
             f"samples {f['samples']}, never {f['never']}; node faults only: p50 {nf['p50_s']}s, "
             f"p99 {nf['p99_s']}s")
    stop = f["per_kind"].get("sigstop")
    if stop:
        L.append(f"SIGSTOP (pause -> first success per affected session): p50 {stop['p50_s']}s, p99 {stop['p99_s']}s, "
                 f"max {stop['max_s']}s, samples {stop['samples']}")
    for kind, d in sorted(rep.get("detection", {}).items()):
        L.append(f"detection [{kind}] (fault -> router declares the node down): p50 {d['p50_s']}s, max {d['max_s']}s, "
                 f"noticed {d['noticed']}, ended before noticed {d['unnoticed']}")
    ff = rep.get("false_failovers")
    if ff is not None:
        L.append(f"false failovers (a node declared down that no fault hit): {ff['count']} "
                 f"in {ff.get('incidents', ff['count'])} incidents {ff.get('by_reason', {})} "
                 f"(router 'node down' events {ff['node_down_events']}, expected {ff['expected']})")
    for pf in f["per_fault"]:
        L.append(f"    {pf['fault']:<24} hold {pf['hold_s']:>5}s shards {pf['shards']:>3} sessions "
                 f"{pf['affected_sessions']:>3}: p50 {pf['p50_s']}s p99 {pf['p99_s']}s max {pf['max_s']}s; "
                 f"outage p50 {pf['outage_p50_s']}s p99 {pf['outage_p99_s']}s; "
                 f"write outage {pf.get('write_outage_s')}s; "
                 f"errors {pf['client_errors_in_window']}; cluster ready after {pf['ready_after_s']}s")
    for k, o in f.get("outage_per_kind", {}).items():
        g = f.get("write_outage_per_kind", {}).get(k, {})
        lo = f.get("log_outage_per_kind", {}).get(k, {})
        L.append(f"    outage {k:<15} all sessions: p50 {o['p50_s']}s p99 {o['p99_s']}s max {o['max_s']}s "
                 f"({o['samples']} samples; log sessions: p50 {lo.get('p50_s')}s p99 {lo.get('p99_s')}s); write outage (first failed -> first ok): p50 {g.get('p50_s')}s "
                 f"p99 {g.get('p99_s')}s max {g.get('max_s')}s ({g.get('faults', 0)} faults)")
    lv = rep["log_vs_router"]
    L.append(f"log-rebuilt state vs router: {lv['agree']}/{lv['compared']} sessions agree")
    lg = rep["log"]
    L.append(f"log: {lg['records']} records in {lg['partitions']} partitions; claims {lg.get('claims', 0)} "
             f"(stale {lg.get('claims_stale', 0)}), fenced events {lg.get('fenced_events', 0)}, "
             f"duplicates {lg.get('duplicate_events', 0)}, anomalies {len(lg['anomalies'])}")
    if rep.get("final_reads_failed"):
        L.append(f"final reads failed: {rep['final_reads_failed'][:5]}")
    if rep.get("schedule_unrecovered"):
        L.append(f"SCHEDULE: {rep['schedule_unrecovered']}")
    return "\n".join(L)


# ------------------------------------------------------------------------------ offline re-check
def dump_records(path: Any, records: list[Record]) -> None:
    """The raw topic as read (values undecoded), so a run can be re-checked offline."""
    import orjson

    with open(path, "wb") as fh:
        for r in records:
            fh.write(orjson.dumps({"p": r.partition, "o": r.offset, "ts": r.timestamp,
                                   "k": None if r.key is None else r.key.decode("utf-8", "replace"),
                                   "v64": None if r.value is None else base64.b64encode(r.value).decode()}) + b"\n")


def load_records(path: Any) -> list[Record]:
    import orjson

    out = []
    with open(path, "rb") as fh:
        for line in fh:
            d = orjson.loads(line)
            value = (base64.b64decode(d["v64"]) if d["v64"] is not None else None) if "v64" in d else (
                None if d["v"] is None else d["v"].encode())  # before sealed values: text
            out.append(Record(d["p"], d["o"], None if d["k"] is None else d["k"].encode(), value, d.get("ts", 0)))
    return out


def recheck(out_dir: Any) -> dict[str, Any]:
    """Re-run the checks of a finished run from its files (no cluster, no broker needed)."""
    from pathlib import Path

    import orjson

    d = Path(out_dir)
    meta = orjson.loads((d / "sessions.json").read_bytes())
    sessions: dict[str, str] = meta["sessions"]
    partitions = int(meta["partitions"])
    appends = [Observation.from_json(orjson.loads(x)) for x in (d / "appends.jsonl").read_bytes().splitlines()]
    reads_all = [Observation.from_json(orjson.loads(x)) for x in (d / "reads.jsonl").read_bytes().splitlines()]
    reads = [o for o in reads_all if o.kind == "read"]
    final = {o.sid: o for o in reads_all if o.kind == "final"}
    faults = orjson.loads((d / "faults.json").read_bytes())["faults"]
    codec = None
    if (d / "keys.jsonl").exists() and (d / "master.keys").exists():
        from stickystate.crypto import load_master_keys_file
        from stickystate.replicator.keys import offline_codec

        codec = offline_codec(load_master_keys_file(d / "master.keys"), load_records(d / "keys.jsonl"), partitions)
    log = replay(load_records(d / "changes.jsonl"), partitions, set(sessions), codec)
    return check(sessions=sessions, appends=appends, reads=reads, final=final, log=log, faults=faults,
                 partitions=partitions)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m stickystate.chaos.checker", description="re-check a finished chaos run offline")
    p.add_argument("out_dir")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    ns = p.parse_args(argv)
    rep = recheck(ns.out_dir)
    rep["faults"] = __import__("orjson").loads((__import__("pathlib").Path(ns.out_dir) / "faults.json")
                                               .read_bytes())["faults"]
    print(json.dumps(rep, indent=2, default=str) if ns.json else summary_text(rep))
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
