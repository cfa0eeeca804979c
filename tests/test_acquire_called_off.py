"""An acquisition called off by a reassignment must not go on to serve the shard.

The chaos run with seed 15 lost every session of shard 15: n3, its standby (sessions in
the compact packed form), was assigned the shard while stalled, and an assignment taking
it away again arrived while the acquisition was catching up. That assignment cancelled
the acquisition, but on Python 3.11 ``asyncio.wait_for`` returns instead of raising when
the future it waits on completed in the same loop iteration as the cancel: the
acquisition carried on. The assignment, waiting for Kafka to acknowledge what was queued
for the shards it released (broker restarting), packed the sessions into the standby
form after the acquisition had unpacked them and claimed. The acquisition read its claim
and served the shard with every session still packed: "shard acquired ... sessions: 0",
a 404 for every read and append, and its epoch's full snapshot set empty, so the next
owner loaded nothing.

The first test runs Ownership (node/ownership.py) in-process against stand-ins for the
Kafka clients that let it put each step in that order; ``asyncio.wait_for`` is the real
one (the lost cancellation is Python's, not the test's). The second runs two NodeStores
against the real broker, with the lost cancellation and the slow flush put in by hand.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from stickystate import crypto
from stickystate.errors import NotOwner
from stickystate.node.ownership import Ownership
from stickystate.node.roles import ShardRoles
from stickystate.node.settings import NodeSettings
from stickystate.node.shard import Shard
from stickystate.node.store import NodeStore
from stickystate.node.verification import OwnerVerification
from stickystate.replicator import events
from stickystate.replicator.keys import Codec
from stickystate.replicator.settings import ReplicatorSettings

S = 0
SIDS = ("a", "b", "c")


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@dataclass
class Rec:
    offset: int
    key: bytes | None
    value: bytes | None


class Log:
    """Partition ``S`` of ``changes`` and what a node's follower has delivered of it."""

    def __init__(self) -> None:
        self.records: list[Rec] = []
        self.delivered = 0
        self.on_records: Callable[[int, Sequence[Rec]], None] | None = None
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.acked = asyncio.Event()  # Kafka acknowledges what is queued (a broker restarting: not yet)
        self.sent_claims: list[dict[str, Any]] = []

    def append(self, key: bytes, event: dict[str, Any]) -> int:
        self.records.append(Rec(len(self.records), key, events.encode(event)))
        return len(self.records) - 1

    def deliver(self) -> None:
        """The follower fetches everything up to the end and hands it to the node."""
        new = self.records[self.delivered:]
        self.delivered = len(self.records)
        if new and self.on_records is not None:
            self.on_records(S, new)
        for offset, fut in list(self.waiters):
            if offset <= self.delivered and not fut.done():
                fut.set_result(None)
                self.waiters.remove((offset, fut))


class Follower:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.wanted = {S}

    def follow(self, s: int, offset: int | None) -> None:
        self.wanted.add(s)

    def unfollow(self, s: int) -> None:
        self.wanted.discard(s)

    def following(self) -> set[int]:
        return set(self.wanted)

    def position(self, s: int) -> int:
        return self.log.delivered

    async def end_offsets(self, shards: Sequence[int]) -> dict[int, int]:
        return {s: len(self.log.records) for s in shards}

    async def wait_position(self, s: int, offset: int, timeout_s: float) -> None:
        if self.log.delivered >= offset:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.log.waiters.append((offset, fut))
        await asyncio.wait_for(fut, timeout_s)  # as replicator/follower.py waits


class Replicator:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def send_and_wait(self, s: int, key: bytes, value: bytes, timeout_s: float | None = None) -> int:
        event = events.decode(value)
        self.log.sent_claims.append(event)
        offset = self.log.append(key, event)
        await self.log.acked.wait()
        self.log.deliver()
        return offset

    async def flush(self, partitions: Any = None, timeout_s: float = 30.0) -> None:
        await self.log.acked.wait()  # what was queued for the released shards, acknowledged


class Bootstraps:
    def __init__(self, roles: ShardRoles) -> None:
        self.roles = roles

    def start(self, s: int) -> None:
        raise AssertionError("the standby is loaded already")

    def cancel(self, s: int) -> None:
        pass

    async def ensure_following(self, s: int) -> Shard:
        return self.roles.shards[s]


class Expiry:
    def schedule_all(self, sessions: Any) -> None:
        pass


class Snapshotting:
    def __init__(self) -> None:
        self.full_sets: list[list[str]] = []

    def begin_epoch(self, shard: Shard) -> None:
        self.full_sets.append(sorted(shard.sessions))  # what node/snapshotting.py would write

    def forget(self, s: int) -> None:
        pass


class Erasure:
    codec = Codec(None)  # plaintext records

    def drop(self, s: int) -> None:
        pass


def _node(log: Log) -> tuple[Ownership, ShardRoles, Snapshotting]:
    roles = ShardRoles(partitions=1)
    follower = Follower(log)
    snapshotting = Snapshotting()
    ownership = Ownership(roles, "n2", time.time, Replicator(log), follower, Bootstraps(roles),  # type: ignore[arg-type]
                          OwnerVerification(roles, follower), Expiry(), snapshotting,  # type: ignore[arg-type]
                          replication=True, recovery_timeout_s=5.0, kafka_deadline_s=1.0,
                          erasure=Erasure())  # type: ignore[arg-type]
    log.on_records = ownership.apply_records
    return ownership, roles, snapshotting


def _change(sid: str, ver: int, op: str) -> dict[str, Any]:
    event: dict[str, Any] = {"op": op, "sid": sid, "ver": ver, "epoch": 1, "node": "n1", "at": time.time()}
    if op == "create":
        event.update(data={"m": []}, ttl_s=600.0)
    else:
        event.update(field="m", items=[ver], max_len=None)
    return event


async def test_an_acquisition_whose_cancel_was_lost_does_not_serve_the_packed_sessions() -> None:
    log = Log()
    ownership, roles, snapshotting = _node(log)
    # n2 is the standby of shard S, owned by n1: its sessions are held in the packed form.
    roles.shards[S] = Shard(S)
    await ownership.assign(1, {S: "n1"}, {S: ["n2"]})
    log.append(events.CLAIM_KEY, events.claim(S, 1, "n1", time.time()))
    for sid in SIDS:
        log.append(sid.encode(), _change(sid, 1, "create"))
        log.append(sid.encode(), _change(sid, 2, "append"))
    log.deliver()
    shard = roles.shards[S]
    assert len(shard.packed) == len(SIDS) and not shard.sessions

    # n1 stops answering: the router gives S to n2, whose acquisition reads to the finish line.
    log.append(b"a", _change("a", 3, "append"))  # written by n1 just before: not delivered yet
    await ownership.assign(2, {S: "n2"}, {S: ["n1"]})
    acquisition = ownership._acquire_tasks[S]
    await _until(lambda: bool(log.waiters))  # the acquisition waits to reach the finish line

    # n1 is back before that: S goes back to it. The records arrive in the same loop
    # iteration as that assignment cancels the acquisition (a stalled loop catching up).
    log.deliver()
    released = asyncio.create_task(ownership.assign(3, {S: "n1"}, {S: ["n2"]}))
    await _until(lambda: bool(log.sent_claims) or acquisition.done())
    log.acked.set()  # Kafka acknowledges (the release's flush, a claim if one was sent)
    await asyncio.wait_for(released, 5.0)
    await _until(acquisition.done)
    log.deliver()

    assert S not in roles.serving and S not in roles.recovering  # released: n1 owns S
    assert roles.shards[S].my_epoch is None
    assert log.sent_claims == []  # no claim for a shard the router took away
    assert snapshotting.full_sets == []
    assert len(roles.shards[S].packed) == len(SIDS)  # a standby again, every session held

    # And when S comes back to n2, it is served with every session.
    await ownership.assign(4, {S: "n2"}, {S: ["n1"]})
    await _until(lambda: S in roles.serving)
    assert sorted(roles.shards[S].sessions) == list(SIDS)
    assert roles.shards[S].sessions["a"]["version"] == 3
    assert snapshotting.full_sets == [list(SIDS)]


@pytest.mark.kafka
async def test_against_kafka_a_called_off_acquisition_leaves_the_standby_whole(kafka_bootstrap: str) -> None:
    rep = ReplicatorSettings(kafka_bootstrap=kafka_bootstrap, changes_topic=f"changes-{uuid.uuid4().hex[:10]}",
                             partitions=1)
    master = crypto.parse_master_keys(crypto.new_master_key_entry("k1"))
    n1, n2 = (NodeStore(NodeSettings(node_id=n, auth="open", master_keys=master, replicator=rep))
              for n in ("n1", "n2"))
    await n1.start()
    await n2.start()
    try:
        for node in (n1, n2):
            await node.assign(1, {S: "n1"}, {S: ["n2"]})
        await _until(lambda: S in n1.serving, 60.0)
        for sid in SIDS:
            await n1.write({"op": "create", "sid": sid, "data": {"m": []}, "ttl_s": 600.0})
            await n1.confirm(await n1.write({"op": "append", "sid": sid, "field": "m", "items": [1]}))
        end = (await n2.follower.end_offsets([S]))[S]
        await _until(lambda: S in n2.shards and n2.shards[S].position >= end, 30.0)
        assert len(n2.shards[S].packed) == len(SIDS)  # n2: the standby, sessions packed

        # n2's acquisition, called off while it catches up, does not end there: its
        # cancellation is lost as Python 3.11's asyncio.wait_for loses it.
        real_catch_up = n2.ownership._catch_up
        gate = asyncio.Event()
        caught_up: list[asyncio.Task[Any] | None] = []

        async def catch_up_losing_its_cancel(s: int, end: int, timeout_s: float) -> None:
            caught_up.append(asyncio.current_task())
            if not gate.is_set():
                try:
                    await gate.wait()
                except asyncio.CancelledError:
                    gate.set()  # (lost)
            await real_catch_up(s, end, timeout_s)

        n2.ownership._catch_up = catch_up_losing_its_cancel  # type: ignore[method-assign]
        # The release's flush waits for Kafka (in the incident: claims of other released
        # shards, a broker restarting) while the acquisition carries on.
        real_flush = n2.replicator.flush

        async def slow_flush(partitions: Any = None, timeout_s: float = 30.0) -> None:
            await _until(lambda: acquisition.done() or n2.shards[S].my_epoch is not None)
            await real_flush(partitions, timeout_s)

        n2.replicator.flush = slow_flush  # type: ignore[method-assign]

        await n2.assign(2, {S: "n2"}, {S: ["n1"]})  # n1 declared down (it is not: still the owner)
        acquisition = n2.ownership._acquire_tasks[S]
        await _until(lambda: caught_up == [acquisition], 30.0)  # it reads to the finish line
        await n2.assign(3, {S: "n1"}, {S: ["n2"]})  # n1 back before the acquisition finished
        await _until(acquisition.done, 30.0)
        n2.replicator.flush = real_flush  # type: ignore[method-assign]
        assert gate.is_set() and not acquisition.cancelled()  # it did carry on past the cancel

        assert S not in n2.serving and S not in n2.recovering
        assert n2.shards[S].my_epoch is None and len(n2.shards[S].packed) == len(SIDS)
        with pytest.raises(NotOwner):
            await n2.read(SIDS[0])
        assert n1.shards[S].my_epoch == 1 and S in n1.serving  # no claim of n2 fenced it

        # Given the shard for good, n2 serves every session, the last append included.
        await n1.assign(4, {S: "n2"}, {S: ["n1"]})
        await n2.assign(4, {S: "n2"}, {S: ["n1"]})
        await _until(lambda: S in n2.serving, 60.0)
        for sid in SIDS:
            _, state = await n2.read(sid)
            assert state["data"] == {"m": [1]}
    finally:
        await n2.stop()
        await n1.stop()
