"""Session requests on the shards this node owns: the gate every request passes
(``serving_shard``), reads, the write path and its confirmation (asyncio, no aiohttp).

Write path (``write``): find the shard (421 if not ours, wait while it is recovering),
check idempotency and If-Match, ``apply`` (pure), check limits, hand the event to the
replicator and install the new state, all in one synchronous step. For durability
``log`` the caller then awaits ``confirm``: Kafka acknowledged the event (acks=all) AND
no takeover claim precedes it in the partition, so an acknowledged write can never be
on the losing side of a claim (node/verification.py says how that is known without
reading the partition back).

``Writes`` holds no state of its own: the shards are ``ShardRoles``', the idempotency
records each shard's (node/idempotency.py), expiry ``Expiry``'s.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from stickystate.errors import Conflict, NotFound, NotOwner, Unavailable
from stickystate.node.erasure import Erasure
from stickystate.node.expiry import Expiry
from stickystate.node.idempotency import DELIVERY, EPOCH, FP, STATE, STATUS, IdempotencyCache
from stickystate.node.ops import Op, Session, apply
from stickystate.node.roles import ShardRoles
from stickystate.node.shard import DELETED, Shard
from stickystate.node.validate import Limits, appended_size, check_precondition, check_state
from stickystate.node.verification import OwnerVerification, StallGuard
from stickystate.replicator.errors import ReplicationError
from stickystate.replicator.follower import Follower
from stickystate.replicator.producer import Replicator


def fingerprint(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.hexdigest()


@dataclass
class WriteResult:
    status: int
    state: Session | None
    shard: int
    epoch: int
    delivery: asyncio.Future[int] | None  # None when answered from the idempotency cache
    replayed: bool = False


class Writes:
    def __init__(self, roles: ShardRoles, stall: StallGuard, verification: OwnerVerification, expiry: Expiry,
                 replicator: Replicator | None, follower: Follower, me: str, clock: Callable[[], float],
                 limits: Limits, hold_timeout_s: float, kafka_deadline_s: float, erasure: Erasure) -> None:
        self.roles = roles
        self.stall = stall
        self.verification = verification
        self.expiry = expiry
        self.replicator = replicator  # None: replication is off
        self.follower = follower
        self.me = me
        self.clock = clock
        self.limits = limits
        self.hold_timeout_s = hold_timeout_s
        self.kafka_deadline_s = kafka_deadline_s
        self.on_change: Callable[[int, Op, Session | None], None] | None = None  # the watch hub's (node/watch.py)
        self.erasure = erasure  # seals events; a new session's key, a deleted one's erasure (node/erasure.py)

    async def serving_shard(self, sid: str) -> Shard:
        """The shard of ``sid`` if we serve it (waits while it is being acquired); NotOwner
        if not, Unavailable while our ownership is being re-verified after a stall."""
        roles = self.roles
        s = roles.shard_for(sid)
        if roles.refusing:
            raise NotOwner(s, None, None)
        if self.replicator is not None:
            stall = self.stall
            stall.check()
            if stall.unverified:
                await stall.wait_verified()
        if s in roles.serving:
            return roles.shards[s]
        event = roles.recovering.get(s)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), self.hold_timeout_s)
            except asyncio.TimeoutError:
                raise Unavailable(f"shard {s} is still being rebuilt", retry_after_s=1, code="recovering") from None
            if s in roles.serving:
                return roles.shards[s]
        raise self.not_owner(s)

    def not_owner(self, s: int) -> NotOwner:
        """The 421 for shard ``s``, naming the owner as well as this node knows it: the
        latest claim it read in the log (a fenced owner learns its successor there before
        the router's next assignment reaches it), else the router's last placement; never
        this node itself (a client following the hint would come straight back)."""
        roles = self.roles
        shard = roles.shards.get(s)
        hint = shard.owner if shard is not None and shard.owner is not None else roles.owners.get(s)
        return NotOwner(s, hint if hint != self.me else None, shard.epoch if shard is not None else None)

    async def read(self, sid: str) -> tuple[Shard, Session]:
        shard = await self.serving_shard(sid)
        state = shard.sessions.get(sid)
        if state is None or state["expires_at"] <= self.clock():
            raise NotFound(f"session {sid!r} not found")
        return shard, state

    async def write(self, op: Op, *, if_match: int | str | None = None, idem: str | None = None,
                    request_fingerprint: str = "", appended_field: str | None = None) -> WriteResult:
        shard = await self.serving_shard(op["sid"])
        sid = op["sid"]
        if self.erasure.encrypting and self.replicator is not None and op["op"] in ("create", "replace"):
            shard = await self._ensure_key(shard, sid)
        # From here to the end: no await. Check, apply, hand over, install.
        if idem is not None:
            cached = shard.idem.records.get((sid, idem))
            if cached is not None:
                if cached[FP] != request_fingerprint:
                    raise Conflict("Idempotency-Key was used with a different request", code="idempotency_key_reused")
                state = cached[STATE]
                if state is None and cached[STATUS] != 204:
                    state = shard.sessions.get(sid)  # a router key's entry: the session as it is now
                delivery = cached[DELIVERY]
                if isinstance(delivery, int):  # settled: the offset it got
                    delivery = asyncio.get_running_loop().create_future()
                    delivery.set_result(cached[DELIVERY])
                return WriteResult(cached[STATUS], state, shard.id,
                                   cached[EPOCH] if cached[EPOCH] is not None else shard.epoch, delivery, replayed=True)
            op["idem"] = [idem, request_fingerprint]
        current = shard.sessions.get(sid)
        now = self.clock()
        if current is not None and current["expires_at"] <= now:
            current = None  # expired, not reaped yet: treated as absent (the reaper's event comes first)
            self.expiry.expire_now(shard, sid)
        check_precondition(if_match, None if current is None else current["version"])
        new, event = apply(current, op, now)
        size = None
        if (op["op"] == "append" and new is not None and current is not None
                and new["key_expiry"] is current["key_expiry"]):  # no key expired: only the list changed
            old_size = shard.sizes.get(sid)
            if old_size is not None:
                size = appended_size(current["data"], old_size, new["data"], op["field"], op["items"])
        size = check_state(new["data"], self.limits, appended_field, size) if new is not None else 0
        epoch = shard.my_epoch
        assert epoch is not None
        event["node"] = self.me
        event["epoch"] = epoch
        try:
            delivery = (self.replicator.enqueue(shard.id, sid.encode(), self.erasure.codec.encode_change(shard.id, event),
                                                meta=(sid, DELETED if new is None else new["version"]))
                        if self.replicator is not None else None)
        except ReplicationError as exc:
            raise Unavailable(str(exc), retry_after_s=1, code="replication_unavailable") from exc
        except LookupError as exc:  # no data key (erased meanwhile): nothing changed
            raise Unavailable(str(exc), retry_after_s=1, code="replication_unavailable") from exc
        shard.commit(event, new, size)
        if self.on_change is not None:
            self.on_change(shard.id, event, new)
        if new is None and self.replicator is not None:
            self.erasure.erase(shard, sid)
        if new is not None and current is None:
            self.expiry.schedule(new)
        status = 201 if op["op"] == "create" or (op["op"] == "replace" and current is None) else (
            204 if new is None else 200)
        if idem is not None:
            key = (sid, idem)
            shard.idem.answered(key, status, delivery)
            if delivery is not None:
                delivery.add_done_callback(functools.partial(IdempotencyCache.settle, shard.idem, key))
        return WriteResult(status, new, shard.id, epoch, delivery)

    async def _ensure_key(self, shard: Shard, sid: str) -> Shard:
        """A write that may create ``sid``: its data key is in ``keys`` before its first event."""
        state = shard.sessions.get(sid)
        if state is not None and state["expires_at"] <= self.clock():
            self.expiry.expire_now(shard, sid)  # its key is erased: a new session gets a new one
            state = None
        if state is None:
            try:
                await self.erasure.ensure_key(shard.id, sid)
            except (ReplicationError, asyncio.TimeoutError) as exc:
                raise Unavailable(f"could not store the session's data key: {exc!r}", retry_after_s=1,
                                  code="replication_unavailable") from exc
            shard = await self.serving_shard(sid)  # still ours after the await?
        return shard

    async def confirm(self, result: WriteResult) -> None:
        """Durability ``log``: Kafka has the event and no takeover precedes it."""
        if result.delivery is None:
            return
        deadline = self.kafka_deadline_s
        roles = self.roles
        s = result.shard
        try:
            offset = await asyncio.wait_for(asyncio.shield(result.delivery), deadline)
            shard = roles.shards.get(s)
            if shard is not None and shard.position <= offset:
                # Not verified yet: a hole before it is being read, or we own the shard no more.
                if not await self.verification.until_verified(shard, offset, deadline):
                    # Ownership ended first: what decides now is what the log holds before
                    # our record, read as a follower (or, not followed, a refusal).
                    await self.follower.wait_position(s, offset + 1, deadline)
        except asyncio.TimeoutError:
            raise Unavailable("Kafka did not confirm the write in time; it is applied in memory and still queued",
                              retry_after_s=1, code="replication_timeout") from None
        except LookupError:
            raise self.not_owner(s) from None
        except (ReplicationError, RuntimeError) as exc:
            raise Unavailable(f"replication failed: {exc}", retry_after_s=1, code="replication_unavailable") from exc
        shard = roles.shards.get(s)
        if shard is None or not shard.write_is_valid(offset, result.epoch, self.me):
            raise self.not_owner(s)
