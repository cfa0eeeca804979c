"""The idempotency cache's records (node/shard.py): what they keep alive.

Every write the router forwards carries an Idempotency-Key (router/forward.py), so the
cache fills to IDEM_PER_SHARD records per shard, as owner and as standby. Records that
held the event and the state after the write kept every cached write's objects alive
for the cyclic GC to walk: full collections on the nodes grew to 0.1-0.5 s of CPU
within a minute of router traffic (bench/tailprobe.py --gc-log), the router's groups
of late answers."""

from __future__ import annotations

import gc
import uuid
from typing import Any

import pytest

from stickystate.node.ops import apply
from stickystate.node.idempotency import DELIVERY, EPOCH, FP, STATE, STATUS
from stickystate.node.shard import Shard
from tests.helpers import Api, log_barrier, owned_shard


def _write(shard: Shard, op: dict[str, Any], key: str) -> dict[str, Any]:
    op = {**op, "idem": [key, "fp-" + key]}
    new, event = apply(shard.sessions.get(op["sid"]), op, 1.0)
    event["node"], event["epoch"] = "n1", shard.my_epoch
    shard.commit(event, new)
    return event


def test_a_router_key_record_holds_only_atomic_values_and_the_gc_stops_tracking_it() -> None:
    shard = owned_shard()
    _write(shard, {"op": "create", "sid": "s", "data": {}, "ttl_s": 60}, "router-x-1")
    _write(shard, {"op": "append", "sid": "s", "field": "m", "items": [{"text": "hi"}]}, "router-x-2")
    rec = shard.idem.records[("s", "router-x-2")]
    assert type(rec) is tuple and rec[FP] == "fp-router-x-2" and rec[STATUS] == 200
    assert rec[STATE] is None and rec[EPOCH] == 1 and rec[DELIVERY] is None
    gc.collect()
    assert not gc.is_tracked(rec)
    assert shard.idem.of_session("s") == [["router-x-1", "fp-router-x-1", 201], ["router-x-2", "fp-router-x-2", 200]]


def test_a_client_key_record_keeps_the_state_after_its_write() -> None:
    shard = owned_shard()
    _write(shard, {"op": "create", "sid": "s", "data": {}, "ttl_s": 60}, "k1")
    after = shard.sessions["s"]
    _write(shard, {"op": "append", "sid": "s", "field": "m", "items": [1]}, "k2")
    assert shard.idem.records[("s", "k1")][STATE] is after and shard.idem.records[("s", "k2")][STATE] is shard.sessions["s"]


def test_a_standby_keeps_no_state_and_promotion_fills_client_keys_only() -> None:
    owner = owned_shard()
    events = [_write(owner, {"op": "create", "sid": "s", "data": {}, "ttl_s": 60}, "k1"),
              _write(owner, {"op": "append", "sid": "s", "field": "m", "items": [1]}, "router-x-1")]
    standby = Shard(0)
    standby.apply_record(0, {"op": "claim", "shard": 0, "epoch": 1, "node": "n1", "at": 0}, "n2", now=0.0)
    for i, e in enumerate(events, start=1):
        standby.apply_record(i, e, "n2", now=0.0)
    assert all(rec[STATE] is None for rec in standby.idem.records.values())
    standby.unpack_all()
    assert standby.idem.records[("s", "k1")][STATE] is standby.sessions["s"]
    assert standby.idem.records[("s", "router-x-1")][STATE] is None
    standby.pack_all()
    assert all(rec[STATE] is None for rec in standby.idem.records.values())


@pytest.mark.kafka
async def test_a_router_key_replay_applies_once_and_answers_with_the_session_as_it_is(api: Api) -> None:
    s = f"idem-{uuid.uuid4().hex[:8]}"
    assert (await api.call("POST", "/v1/sessions", {"id": s}))[0] == 201
    item = {"items": ["hello"], "max_len": 10}
    for durability in ("log", "memory"):
        headers = {"Idempotency-Key": f"router-test-{durability}", "Durability": durability}
        first = await api.call("POST", f"/v1/sessions/{s}/lists/m", item, headers=headers)
        assert first[0] == 200, first
        assert (await api.call("PATCH", f"/v1/sessions/{s}", {"other": durability}))[0] == 200
        # Replay once the first write's event is in Kafka (its record then keeps the offset,
        # not the delivery future): the history call returns only after the queue is flushed.
        events = await log_barrier(api, s)
        assert [(e["op"], e["ver"]) for e in events][-2:] == [("append", first[1]["version"]),
                                                              ("patch", first[1]["version"] + 1)]
        again = await api.call("POST", f"/v1/sessions/{s}/lists/m", item, headers=headers)
        assert first[0] == again[0] == 200 and again[2].get("Idempotent-Replayed") == "true"
        now = (await api.call("GET", f"/v1/sessions/{s}"))[1]
        assert again[1] == now  # not the first answer: the session as it is now
    assert now["data"] == {"m": ["hello", "hello"], "other": "memory"} and now["version"] == 5
