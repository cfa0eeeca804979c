"""Snapshots: the pure choice of what to load, the owner's bookkeeping, and a rebuild
against the real broker that reads snapshots + a short tail instead of the history."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from stickystate.node.ops import apply
from stickystate.node.shard import Shard
from stickystate.replicator import snapshots as snap
from stickystate.replicator.settings import ReplicatorSettings
from stickystate.protocol import shard_of
from stickystate.local_cluster import LocalCluster, http_json
from tests.helpers import Api, codec_for, owned_shard, read_records, wait_for, wait_until


# -- pure: which records a rebuild uses -------------------------------------------------
def _state(sid: str, items: list[str], version: int) -> dict[str, Any]:
    return {"id": sid, "version": version, "data": {"m": items}, "created_at": 0.0, "updated_at": 0.0,
            "expires_at": 9e9, "ttl_s": 3600.0, "key_expiry": {}}


def _snap(sid: str, items: list[str], version: int, offset: int, epoch: int, node: str) -> bytes:
    return snap.encode_snapshot(sid, _state(sid, items, version), offset, epoch, node, 0.0)


def test_keys_round_trip_and_never_collide_with_session_ids() -> None:
    assert snap.parse_key(snap.session_key("a:b.c-d_e", 7)) == ("a:b.c-d_e", 7)
    assert snap.parse_key(snap.checkpoint_key(3)) == (snap.CHECKPOINT, 3)
    assert snap.parse_key(b"no-epoch") is None and snap.parse_key(b"x@") is None and snap.parse_key(None) is None


def test_choose_uses_the_highest_epoch_with_a_checkpoint() -> None:
    latest: dict[bytes, bytes | None] = {
        snap.session_key("s1", 1): _snap("s1", ["a"], 1, 10, 1, "n1"),
        snap.checkpoint_key(1): snap.encode_checkpoint(1, "n1", 11, 0.0),
        snap.session_key("s1", 2): _snap("s1", ["a", "b"], 2, 20, 2, "n2"),
        snap.session_key("s2", 2): _snap("s2", ["x"], 1, 21, 2, "n2"),
        snap.checkpoint_key(2): snap.encode_checkpoint(2, "n2", 25, 0.0),
        # epoch 3 started snapshotting but never wrote its checkpoint: not usable
        snap.session_key("s1", 3): _snap("s1", ["a", "b", "c"], 3, 30, 3, "n3"),
    }
    got = snap.choose(latest)
    assert (got.epoch, got.node, got.replay_from) == (2, "n2", 25)
    assert {sid: s["state"]["data"]["m"] for sid, s in got.snapshots.items()} == {"s1": ["a", "b"], "s2": ["x"]}
    assert sorted(got.other_epoch_keys) == sorted([snap.session_key("s1", 1), snap.checkpoint_key(1),
                                                   snap.session_key("s1", 3)])


def test_a_zombies_late_snapshot_cannot_shadow_the_new_owners() -> None:
    """Compaction keeps the last record per key. The paused old owner (epoch 1) writes
    after the new owner (epoch 2) took over: its record has its own key, so the new
    owner's snapshot survives compaction and is the one used."""
    log = [
        (snap.session_key("s", 1), _snap("s", ["a"], 1, 5, 1, "old")),
        (snap.checkpoint_key(1), snap.encode_checkpoint(1, "old", 6, 0.0)),
        (snap.session_key("s", 2), _snap("s", ["a", "new"], 2, 9, 2, "new")),
        (snap.checkpoint_key(2), snap.encode_checkpoint(2, "new", 10, 0.0)),
        # the zombie resumes: a stale snapshot, a tombstone and a checkpoint of its epoch
        (snap.session_key("s", 1), _snap("s", ["a", "zombie"], 2, 7, 1, "old")),
        (snap.session_key("s", 1), None),
        (snap.checkpoint_key(1), snap.encode_checkpoint(1, "old", 8, 0.0)),
    ]
    compacted: dict[bytes, bytes | None] = {}
    for key, value in log:
        compacted[key] = value
    got = snap.choose(compacted)
    assert got.epoch == 2 and got.replay_from == 10
    assert got.snapshots["s"]["state"]["data"]["m"] == ["a", "new"]


def test_no_checkpoint_means_replay_from_the_start() -> None:
    got = snap.choose({snap.session_key("s", 1): _snap("s", ["a"], 1, 3, 1, "n1")})
    assert (got.epoch, got.replay_from, got.snapshots) == (0, 0, {})


def test_settings_name_the_snapshots_topic_next_to_the_changes_topic() -> None:
    assert ReplicatorSettings().snapshots_topic == "snapshots"
    assert ReplicatorSettings(changes_topic="t1").snapshots_topic == "t1-snapshots"
    with pytest.raises(ValueError):
        ReplicatorSettings(changes_topic="x", snapshots_topic="x")


# -- pure: the owner's bookkeeping ------------------------------------------------------
def _own_write(shard: Shard, op: dict[str, Any], now: float = 1.0) -> dict[str, Any]:
    new, event = apply(shard.sessions.get(op["sid"]), op, now)
    event["node"], event["epoch"] = "n1", shard.my_epoch
    shard.commit(event, new)
    return event


def test_only_changes_read_back_from_the_log_make_a_session_snapshottable() -> None:
    shard = owned_shard()
    e1 = _own_write(shard, {"op": "create", "sid": "s", "data": {}, "ttl_s": 60})
    e2 = _own_write(shard, {"op": "append", "sid": "s", "field": "m", "items": [1]})
    assert shard.snapshot_due(1, 999, 0.0) == []  # nothing read back yet: not even dirty
    assert shard.apply_record(1, e1, "n1", now=0.0) == "own"
    assert shard.snapshot_due(1, 999, 0.0) == []  # version 2 live, only version 1 in the log: wait
    assert shard.replay_from() == 1
    shard.apply_record(2, e2, "n1", now=0.0)
    assert shard.snapshot_due(1, 999, 0.0) == ["s"]
    assert shard.snapshot_due(3, 999, 0.0) == []  # 2 changes < 3, and not old enough
    assert shard.snapshot_due(3, 5.0, 1e12) == ["s"]  # old enough
    assert shard.last_offset["s"] == 2
    shard.snapshot_taken("s")
    assert shard.replay_from() == 3 and shard.marks.dirty == {}


def test_a_deleted_session_gets_a_tombstone_once_its_delete_is_read_back() -> None:
    shard = owned_shard()
    events = [_own_write(shard, {"op": "create", "sid": "s", "data": {}, "ttl_s": 60}),
              _own_write(shard, {"op": "delete", "sid": "s"})]
    for i, e in enumerate(events, start=1):
        shard.apply_record(i, e, "n1", now=0.0)
    assert "s" not in shard.sessions and shard.snapshot_due(1, 999, 0.0) == ["s"]


def test_a_loaded_shard_skips_events_its_snapshots_hold() -> None:
    shard = Shard(0)
    shard.load(2, "n2", 10, {"s": {"state": _state("s", ["a", "b"], 2), "offset": 12, "epoch": 2},
                             "t": {"state": _state("t", ["x"], 1), "offset": 4, "epoch": 2}})
    assert shard.position == 10 and (shard.epoch, shard.owner) == (2, "n2")
    # offset 11 is an event of s already in its snapshot (offset 12): skipped
    assert shard.apply_record(11, {"op": "append", "sid": "s", "field": "m", "items": ["b"], "ver": 2, "at": 1,
                                   "node": "n2", "epoch": 2}, "me", now=0.0) == "covered"
    assert shard.apply_record(13, {"op": "append", "sid": "s", "field": "m", "items": ["c"], "ver": 3, "at": 1,
                                   "node": "n2", "epoch": 2}, "me", now=0.0) == "applied"
    assert shard.apply_record(14, {"op": "append", "sid": "t", "field": "m", "items": ["y"], "ver": 2, "at": 1,
                                   "node": "n2", "epoch": 2}, "me", now=0.0) == "applied"
    # a zombie's event from an older epoch is fenced as before
    assert shard.apply_record(15, {"op": "append", "sid": "t", "field": "m", "items": ["z"], "ver": 3, "at": 1,
                                   "node": "n1", "epoch": 1}, "me", now=0.0) == "stale"
    assert shard.sessions["s"]["data"]["m"] == ["a", "b", "c"] and shard.sessions["t"]["data"]["m"] == ["x", "y"]


# -- against the broker ------------------------------------------------------------------
SNAP_ENV = {"STICKYSTATE_SNAPSHOT_EVERY_EVENTS": "50", "STICKYSTATE_SNAPSHOT_MAX_AGE_S": "1"}


async def snapshot_backlog(http: aiohttp.ClientSession, c: LocalCluster) -> int:
    """Over every node: change records not yet covered by an acknowledged checkpoint
    (records after the last checkpoint, plus anything, checkpoints included, still queued
    for Kafka)."""
    total = 0
    for nid in c.node_ids():
        async with http.get(c.node_url(nid) + "/metrics") as resp:
            assert resp.status == 200, nid
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith(("stickystate_snapshot_tail_events ", "stickystate_replication_queue_depth ")):
                total += int(float(line.split()[1]))
    return total


@pytest.mark.kafka
async def test_rebuild_reads_snapshots_and_a_short_tail_after_many_changes(
        start_cluster: Any) -> None:
    c: LocalCluster = start_cluster(standbys=0, node_env=SNAP_ENV)
    prefix = "snap-" + uuid.uuid4().hex[:6]
    sessions, changes = 12, 150
    async with aiohttp.ClientSession() as http:
        api = Api(http, c.router_url)
        sids = [f"{prefix}-{i}" for i in range(sessions)]
        for sid in sids:
            status, _, _ = await api.call("POST", "/v1/sessions", {"id": sid, "data": {"m": []}})
            assert status == 201

        async def turns(sid: str) -> None:
            for j in range(changes):
                status, body, _ = await api.call("POST", f"/v1/sessions/{sid}/lists/m",
                                                 {"items": [j], "max_len": 1000}, headers={"Durability": "log"})
                assert status == 200, body

        await asyncio.gather(*(turns(sid) for sid in sids))
        # Within snapshot_max_age_s every session is snapshotted and a checkpoint written
        # after them; wait until every node says so (and Kafka has acknowledged it all).
        async def all_checkpointed() -> bool:
            return await snapshot_backlog(http, c) == 0

        await wait_until(all_checkpointed, timeout_s=30, interval_s=0.2,
                         what="every change to be covered by an acknowledged checkpoint")

        view = c.cluster_view()
        victim = view["shards"][str(shard_of(sids[0], c.partitions))]
        _, _, before = await api.call("GET", f"/v1/sessions/{sids[0]}")
        old_epoch = int(before["X-Stickystate-Epoch"])  # 1 unless placement moved at start-up
        moved = [sid for sid in sids if view["shards"][str(shard_of(sid, c.partitions))] == victim]
        victim_shards = {shard_of(sid, c.partitions) for sid in moved}
        c.kill_node(victim)
        wait_for(lambda: c.cluster_view()["settled"] and all(
            c.cluster_view()["shards"][str(s)] != victim for s in victim_shards), what="takeover")
        results = {sid: await api.call("GET", f"/v1/sessions/{sid}") for sid in sids}
        new_epoch = int(results[sids[0]][2]["X-Stickystate-Epoch"])

    assert {sid: r[0] for sid, r in results.items() if r[0] != 200} == {}
    assert all(r[1]["data"]["m"] == list(range(changes)) for r in results.values())
    recoveries = []
    for nid in c.node_ids():
        if nid != victim:
            recoveries += [r for r in http_json(c.node_url(nid) + "/internal/status")[1]["recoveries"]
                           if r["shard"] in victim_shards]
    assert {r["shard"] for r in recoveries} >= victim_shards
    rebuilt = [r for r in recoveries if r["shard"] in victim_shards]
    moved_events = len(moved) * (changes + 1)
    tail = sum(r["tail_records"] for r in rebuilt)
    loaded = sum(r["snapshot_sessions"] for r in rebuilt)
    assert loaded >= len(moved)
    # The tail (claims included) is a small fraction of the history of the moved sessions.
    assert tail <= max(10, moved_events // 10), (tail, moved_events, rebuilt)

    # The topic holds what the owners wrote: the victim's snapshots (key sid@epoch) and
    # checkpoints; after the takeover the new owner's full set, then the old epoch's keys
    # are tombstoned (cleanup).
    topic, part = f"{c.topic}-snapshots", shard_of(sids[0], c.partitions)
    old_key = snap.session_key(sids[0], old_epoch)
    for _ in range(50):
        records = [(k, v) for _, k, v in await read_records(c.kafka_bootstrap, topic, part)]
        latest = dict(records)
        if latest.get(old_key, b"") is None:
            break
        await asyncio.sleep(0.2)
    codec = await codec_for(c.kafka_bootstrap, c.topic, c.master_keys, part)
    victim_snaps = [codec.decode_snapshot(part, sids[0], v) for k, v in records if k == old_key and v is not None]
    assert victim_snaps and all(s["node"] == victim for s in victim_snaps), (old_epoch, new_epoch, sorted(latest))
    assert latest[old_key] is None, "old epoch's key not cleaned up"
    new_key = snap.session_key(sids[0], new_epoch)
    assert codec.decode_snapshot(part, sids[0], latest[new_key])["state"]["data"]["m"] == list(range(changes))
    assert any(snap.parse_key(k) == (snap.CHECKPOINT, new_epoch) for k, v in records if v is not None)


# -- pure: the compact standby form ------------------------------------------------------
def _random_ops(rng: Any, sids: list[str], n: int) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    for i in range(n):
        sid = rng.choice(sids)
        kind = rng.choice(["create", "append", "append", "append", "patch", "set_key", "delete_key", "replace",
                           "delete"])
        if kind == "create":
            ops.append({"op": "create", "sid": sid, "data": {"m": []}, "ttl_s": 600.0})
        elif kind == "append":
            ops.append({"op": "append", "sid": sid, "field": "m", "items": [{"n": i}], "max_len": 5})
        elif kind == "patch":
            ops.append({"op": "patch", "sid": sid, "patch": {"p": i, "q": None}})
        elif kind == "set_key":
            ops.append({"op": "set_key", "sid": sid, "key": f"k{i % 3}", "value": i, "ttl_s": rng.choice([None, 50.0])})
        elif kind == "delete_key":
            ops.append({"op": "delete_key", "sid": sid, "key": f"k{i % 3}"})
        elif kind == "replace":
            ops.append({"op": "replace", "sid": sid, "data": {"m": [i]}, "ttl_s": 600.0})
        else:
            ops.append({"op": "delete", "sid": sid})
    return ops


@pytest.mark.parametrize("seed", range(5))
def test_a_packed_standby_unpacks_to_exactly_the_owners_state(seed: int) -> None:
    import random

    from stickystate.errors import StickyError

    rng = random.Random(seed)
    owner = owned_shard()
    standby = Shard(0)
    standby.apply_record(0, {"op": "claim", "shard": 0, "epoch": 1, "node": "n1", "at": 0}, "n2", now=0.0)
    offset = 1
    for i, op in enumerate(_random_ops(rng, [f"s{j}" for j in range(6)], 600)):
        try:
            event = _own_write(owner, op, now=1000.0 + i)
        except StickyError:
            continue  # refused on the owner: never logged
        owner.apply_record(offset, event, "n1", now=0.0)
        standby.apply_record(offset, event, "n2", now=0.0)
        if rng.random() < 0.05:  # a re-sent duplicate after a producer rebuild
            standby.apply_record(offset + 1, event, "n2", now=0.0)
            offset += 1
        offset += 1
    assert standby.sessions == {} and standby.session_count() == len(owner.sessions)
    standby.unpack_all()
    assert orjson.dumps(standby.sessions, option=orjson.OPT_SORT_KEYS) == \
        orjson.dumps(owner.sessions, option=orjson.OPT_SORT_KEYS)
    assert standby.data_bytes == owner.data_bytes
