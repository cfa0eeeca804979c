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

Ownership (node/ownership.py) runs here in-process against stand-ins for the Kafka
clients that let the test put each step in that order; ``asyncio.wait_for`` is the real
one (the lost cancellation is Python's, not the test's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stickystate.node.ownership import Ownership
from stickystate.node.roles import ShardRoles
from stickystate.node.shard import Shard
from stickystate.node.verification import OwnerVerification
from stickystate.replicator import events
from stickystate.replicator.keys import Codec

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
