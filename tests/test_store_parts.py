"""The store's parts (node/store.py's docstring lists them) wired by the NodeStore
facade, in-process and without Kafka (replication off): the public API works through
the facade, each part's background task is stopped by its owner, and expiry reaps on
the clock it is given.

What needs a broker (claims, owner verification, snapshots, failover) is tested against
a real one in test_owner_verification.py, test_snapshots.py, test_failover.py, ...
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from stickystate.errors import NotOwner
from stickystate.node.expiry import Expiry
from stickystate.node.roles import ShardRoles
from stickystate.node.settings import NodeSettings
from stickystate.node.shard import Shard
from stickystate.node.store import NodeStore
from stickystate.node.verification import OwnerVerification, StallGuard


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def _others() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_the_facade_serves_the_request_path_and_stop_leaves_no_task_behind() -> None:
    before = _others()
    store = NodeStore(NodeSettings(auth="open", replication=False, node_id="n1"))
    await store.start()
    mine = store.shard_for("s1")
    await store.assign(1, {s: ("n1" if s == mine else "n2") for s in range(store.partitions)}, {})
    await _until(lambda: store.ready)
    assert store.serving == {mine} and not store.recovering and store.generation == 1

    first = await store.write({"op": "create", "sid": "s1", "data": {"m": []}, "ttl_s": 60.0}, idem="k",
                              request_fingerprint="fp")
    again = await store.write({"op": "create", "sid": "s1", "data": {"m": []}, "ttl_s": 60.0}, idem="k",
                              request_fingerprint="fp")
    assert (first.status, first.replayed, again.status, again.replayed) == (201, False, 201, True)
    shard, state = await store.read("s1")
    assert shard.id == mine and state["version"] == 1 and again.state == state
    other = next(sid for sid in (f"x{i}" for i in range(1000)) if store.shard_for(sid) != mine)
    with pytest.raises(NotOwner):
        await store.serving_shard(other)
    assert store.status()["sessions"] == 1

    await store.stop()
    assert _others() == before  # every part's task cancelled and awaited
    with pytest.raises(NotOwner):
        await store.serving_shard("s1")  # refusing once stopped


def _expiry(roles: ShardRoles, clock: Callable[[], float]) -> Expiry:
    follower = None  # replication off: neither guard nor verification reads a partition
    verification = OwnerVerification(roles, follower)  # type: ignore[arg-type]
    stall = StallGuard(roles, verification, follower, hold_timeout_s=1.0)  # type: ignore[arg-type]
    return Expiry(roles, stall, None, "n1", clock)


async def test_expiry_reaps_on_the_clock_it_is_given() -> None:
    now = [1000.0]
    roles = ShardRoles(partitions=1)
    shard = roles.shards[0] = Shard(0, epoch=1, my_epoch=1, owner="n1")
    roles.serving.add(0)
    expiry = _expiry(roles, lambda: now[0])
    for sid, ttl in (("short", 10.0), ("long", 100.0)):
        session = {"id": sid, "version": 1, "data": {}, "created_at": now[0], "updated_at": now[0], "ttl_s": ttl,
                   "expires_at": now[0] + ttl, "key_expiry": {}}
        shard.commit({"op": "create", "sid": sid}, session)
        expiry.schedule(session)
    expiry.start()
    try:
        now[0] += 50.0
        expiry.schedule({"id": "wake", "expires_at": 0.0})  # wakes the reaper now (its entry finds no session)
        await _until(lambda: expiry.expired_total == 1)
        assert set(shard.sessions) == {"long"}
    finally:
        await expiry.stop()


async def test_expiry_stops_even_when_woken_just_before() -> None:
    """Python 3.11's wait_for swallowed a cancellation that arrived once the wake-up
    event was set: stop() then waited for the reaper forever."""
    expiry = _expiry(ShardRoles(partitions=1), time.time)
    expiry.start()
    await asyncio.sleep(0)  # the reaper runs up to its wait
    await asyncio.sleep(0)
    expiry.schedule({"id": "s", "expires_at": time.time() + 60})  # sets its wake-up event
    await asyncio.wait_for(expiry.stop(), 5.0)


async def test_a_shard_keeps_each_sessions_exact_size_through_appends_windows_and_expired_keys() -> None:
    """Writes.write sizes an append from the session's previous size (validate.appended_size)
    rather than encoding the whole state: the shard's sizes and data_bytes must stay what
    encoding gives, through a window that cuts, a new list field, and an append right after
    a key expired (then the whole state is measured again); the size limit still holds."""
    import orjson

    from stickystate.errors import PayloadTooLarge

    now = [1000.0]
    store = NodeStore(NodeSettings(auth="open", replication=False, node_id="n1"), clock=lambda: now[0])
    await store.start()
    try:
        await store.assign(1, {s: "n1" for s in range(store.partitions)}, {})
        await _until(lambda: store.ready)
        await store.write({"op": "create", "sid": "s1", "data": {"m": [], "t": "x"}, "ttl_s": 600.0})
        await store.write({"op": "set_key", "sid": "s1", "key": "tmp", "value": "y" * 50, "ttl_s": 5.0})
        shard = store.roles.shards[store.shard_for("s1")]

        def exact() -> None:
            state = shard.sessions["s1"]
            assert shard.sizes["s1"] == len(orjson.dumps(state["data"]))
            assert shard.data_bytes == sum(len(orjson.dumps(s["data"])) for s in shard.sessions.values())

        for i in range(12):
            await store.write({"op": "append", "sid": "s1", "field": "m", "items": [{"i": i, "text": "é" * i}],
                               "max_len": 5}, appended_field="m")
            exact()
        await store.write({"op": "append", "sid": "s1", "field": "other", "items": [1, 2, 3], "max_len": 2},
                          appended_field="other")
        exact()
        now[0] += 10  # "tmp" expired: the append also drops it
        await store.write({"op": "append", "sid": "s1", "field": "m", "items": ["z"], "max_len": 5}, appended_field="m")
        assert "tmp" not in shard.sessions["s1"]["data"]
        exact()
        before = shard.sessions["s1"]
        big = "b" * store.settings.limits.max_state_bytes
        with pytest.raises(PayloadTooLarge):
            await store.write({"op": "append", "sid": "s1", "field": "m", "items": [big], "max_len": 5},
                              appended_field="m")
        assert shard.sessions["s1"] is before  # refused: nothing changed
        exact()
    finally:
        await store.stop()
