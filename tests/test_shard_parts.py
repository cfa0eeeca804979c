"""The parts a Shard holds (node/idempotency.py, node/packed.py, node/acks.py,
node/snapshot_marks.py), pure: each part's reset leaves it equal to a fresh one, the
Shard's reset resets every part, and the time the owner's bookkeeping records is the
time passed in."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from stickystate.node.acks import AckTracker
from stickystate.node.idempotency import (DELIVERY, IDEM_PER_SESSION_SNAPSHOT, IDEM_PER_SHARD, STATE,
                                          IdempotencyCache)
from stickystate.node.ops import apply
from stickystate.node.packed import FOLD_EVERY, PackedSessions
from stickystate.node.shard import DELETED, Shard
from stickystate.node.snapshot_marks import SnapshotMarks
from tests.helpers import owned_shard


def _event(sid: str, ver: int, key: str | None = None, op: str = "append") -> dict[str, Any]:
    event: dict[str, Any] = {"op": op, "sid": sid, "ver": ver, "epoch": 1, "node": "n1", "at": 1.0}
    if op == "append":
        event.update(field="m", items=[ver])
    if op in ("create", "replace"):
        event.update(data={"m": []}, ttl_s=60.0)
    if key is not None:
        event["idem"] = [key, "fp-" + key]
    return event


def _state(sid: str, version: int) -> dict[str, Any]:
    return {"id": sid, "data": {"m": list(range(version))}, "version": version, "created_at": 0.0,
            "updated_at": 0.0, "expires_at": 100.0, "ttl_s": 100.0, "key_expiry": {}}


# -- each part's reset ---------------------------------------------------------------
def test_a_reset_idempotency_cache_equals_a_fresh_one() -> None:
    cache = IdempotencyCache()
    cache.remember(_event("s", 1, "k1", op="create"), _state("s", 1))
    cache.remember(_event("s", 2, "router-1"), _state("s", 2))
    cache.load("t", [["k9", "fp", 200]], _state("t", 3))
    assert cache != IdempotencyCache()
    cache.reset()
    assert cache == IdempotencyCache()


def test_a_reset_packed_form_equals_a_fresh_one() -> None:
    packed = PackedSessions()
    packed.pack("s", _state("s", 1))
    packed.add("s", _event("s", 2))
    packed.add("t", _event("t", 1, op="create"))
    assert packed != PackedSessions()
    packed.reset()
    assert packed == PackedSessions()


def test_a_reset_ack_tracker_equals_a_fresh_one() -> None:
    acks = AckTracker()
    acks.start(3)
    acks.read_to = 9
    acks.track([(5, ("s", 1)), (6, None)], position=4)
    assert acks != AckTracker() and acks.hole
    acks.reset()
    assert acks == AckTracker() and not acks.hole


def test_reset_snapshot_marks_equal_fresh_ones() -> None:
    marks = SnapshotMarks()
    marks.floor["s"] = 4
    marks.own(5, "s", 2, now=1.0)
    marks.own(6, "t", DELETED, now=2.0)
    assert marks != SnapshotMarks()
    marks.reset()
    assert marks == SnapshotMarks()


def test_a_reset_shard_holds_nothing_but_its_cumulative_counters() -> None:
    shard = owned_shard()
    shard.acks.start(1)
    for i, op in enumerate([{"op": "create", "sid": "s", "data": {"m": []}, "ttl_s": 60, "idem": ["k", "fp"]},
                            {"op": "append", "sid": "s", "field": "m", "items": [1]}], start=1):
        new, event = apply(shard.sessions.get(op["sid"]), op, 1.0)
        event["node"], event["epoch"] = "n1", 1
        shard.commit(event, new)
        shard.own_acked([(i, ("s", new["version"]))], now=5.0)
    shard.acks.track([(9, None)], shard.position)  # a hole
    shard.pack("p", _state("p", 2))
    shard.marks.floor["p"] = 1
    shard.covered = 1
    assert shard.sessions and shard.idem.records and shard.packed.raw and shard.acks.acked and shard.marks.dirty
    shard.reset()
    fresh = Shard(0, applied=shard.applied, read_records=shard.read_records, ignored_stale=shard.ignored_stale,
                  loaded=shard.loaded)
    assert shard == fresh
    assert shard.read_records == 1  # the claim owned_shard() read


def test_load_starts_from_a_reset_shard() -> None:
    shard = owned_shard()
    shard.acks.start(1)
    new, event = apply(None, {"op": "create", "sid": "old", "data": {}, "ttl_s": 60, "idem": ["k", "fp"]}, 1.0)
    event["node"], event["epoch"] = "n1", 1
    shard.commit(event, new)
    shard.load(2, "n2", 10, {"s": {"state": _state("s", 2), "offset": 8, "epoch": 2, "idem": [["k2", "fp2", 200]]}},
               packed=True)
    assert shard.sessions == {} and list(shard.packed.versions) == ["s"] and shard.acks == AckTracker()
    assert list(shard.idem.records) == [("s", "k2")] and shard.marks.floor == {"s": 8}
    assert (shard.epoch, shard.owner, shard.position, shard.claims) == (2, "n2", 10, [(9, 2, "n2")])


# -- the time is passed in -----------------------------------------------------------
def test_the_owners_marks_carry_the_time_passed_in() -> None:
    shard = owned_shard()
    new, event = apply(None, {"op": "create", "sid": "s", "data": {}, "ttl_s": 60}, 1.0)
    event["node"], event["epoch"] = "n1", 1
    shard.commit(event, new)
    assert shard.apply_record(1, event, "n1", now=10.0) == "own"
    assert shard.marks.dirty["s"][1] == 10.0
    assert shard.snapshot_due(99, 5.0, now=14.9) == []
    assert shard.snapshot_due(99, 5.0, now=15.0) == ["s"]


# -- the parts' own rules ------------------------------------------------------------
def test_acknowledgements_past_the_position_wait_and_read_ones_are_dropped() -> None:
    acks = AckTracker()
    acks.start(1)
    acks.track([(3, ("a", 1)), (4, None), (6, ("b", 1)), (1, ("z", 1))], position=2)
    assert acks.acked == {3: ("a", 1), 4: None, 6: ("b", 1)} and acks.hole  # 1: read already
    acks.drop_read(5)
    assert acks.acked == {6: ("b", 1)}
    acks.drop_read(7)
    assert acks.acked == {} and not acks.hole


def test_pending_events_fold_every_few_and_unpack_to_the_state() -> None:
    packed = PackedSessions()
    packed.pack("s", _state("s", 1) | {"data": {"m": []}})
    due = [packed.add("s", _event("s", v)) for v in range(2, 2 + FOLD_EVERY)]
    assert due == [False] * (FOLD_EVERY - 1) + [True]
    size = packed.fold("s")
    assert size == len(packed.raw["s"]) and "s" not in packed.pending
    packed.add("s", _event("s", 2 + FOLD_EVERY))
    states = packed.unpack_all()
    assert states["s"] is not None and states["s"]["data"]["m"] == list(range(2, 3 + FOLD_EVERY))
    assert packed == PackedSessions() and len(packed) == 0


def test_a_standbys_pending_events_are_nothing_the_cyclic_gc_walks() -> None:
    """A standby keeps its sessions' latest events for seconds; kept as dicts (each with its
    list of items) they reached the oldest GC generation and made a node's full passes long
    (docs/BENCHMARKS.md). Kept as bytes, nothing there is tracked, and they still apply."""
    packed = PackedSessions()
    packed.pack("s", _state("s", 1) | {"data": {"m": []}})
    for v in range(2, 2 + FOLD_EVERY - 1):
        assert not packed.add("s", _event("s", v, key=f"k{v}"))
    packed.add("t", _event("t", 1, op="create"))
    assert not any(gc.is_tracked(value) for value in packed.pending.values())
    assert packed.counts == {"s": FOLD_EVERY - 1, "t": 1}
    states = packed.unpack_all()
    assert states["s"] is not None and states["s"]["data"]["m"] == list(range(2, 1 + FOLD_EVERY))
    assert states["s"]["version"] == FOLD_EVERY and states["t"] is not None and states["t"]["version"] == 1


def test_the_cache_keeps_the_newest_records_and_a_sessions_recent_keys() -> None:
    cache = IdempotencyCache()
    for i in range(IDEM_PER_SHARD + 3):
        cache.remember(_event("s", i + 1, f"k{i}"), None)
    assert len(cache.records) == IDEM_PER_SHARD and ("s", "k0") not in cache.records
    keys = [key for key, _, _ in cache.of_session("s")]
    assert keys == [f"k{i}" for i in range(IDEM_PER_SHARD + 3 - IDEM_PER_SESSION_SNAPSHOT, IDEM_PER_SHARD + 3)]
    cache.forget_session("s")
    assert cache.of_session("s") == []


def test_a_settled_record_keeps_the_offset_instead_of_the_future() -> None:
    loop = asyncio.new_event_loop()
    try:
        cache = IdempotencyCache()
        cache.remember(_event("s", 1, "k"), _state("s", 1))
        mine, other = loop.create_future(), loop.create_future()
        cache.answered(("s", "k"), 200, mine)
        other.set_result(7)
        cache.settle(("s", "k"), other)  # not this record's future: ignored
        assert cache.records[("s", "k")][DELIVERY] is mine
        mine.set_result(5)
        cache.settle(("s", "k"), mine)
        assert cache.records[("s", "k")][DELIVERY] == 5 and cache.records[("s", "k")][STATE] == _state("s", 1)
    finally:
        loop.close()
