"""One shard's sessions and its position in the log, pure (no I/O, no asyncio; the
time is passed in).

The same object serves as owner (live writes applied by node/writes.py), standby and
recovery target (events applied from the ``changes`` partition by ``apply_record``).
It owns the fencing state (highest claim, the claims in log order, our own epoch), the
live sessions with their sizes, and its position in the partition; and it composes the
parts it holds, each with its own state and ``reset``:
- ``idem``: the idempotency cache (node/idempotency.py);
- ``packed``: the compact standby form of the sessions of a shard it follows without
  owning (node/packed.py);
- ``acks``: Kafka's acknowledgements of our records while owning (node/acks.py);
- ``marks``: snapshot bookkeeping: loaded snapshots' offsets, sessions not covered by a
  snapshot yet (node/snapshot_marks.py).

Fencing rules, applied identically by every reader of a partition:
- a claim with an epoch higher than any seen so far makes its node the owner;
- a change event whose epoch is below the highest claim seen is ignored (it was
  written by a fenced owner after it lost the shard);
- a change event whose version is not newer than the session's is a duplicate
  (a re-send after a producer was rebuilt) and is ignored.

Snapshots (replicator/snapshots.py): a shard rebuilt from snapshots starts reading the
partition at the checkpoint's ``replay_from`` with the checkpoint's (epoch, node) as
the governing claim, and skips each session's events at or below its snapshot's
offset (``marks.floor``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from stickystate.errors import StickyError
from stickystate.node.acks import AckMeta, AckTracker
from stickystate.node.idempotency import IdempotencyCache
from stickystate.node.ops import Op, Session, apply
from stickystate.node.packed import PackedSessions
from stickystate.node.snapshot_marks import DELETED, SnapshotMarks

__all__ = ["DELETED", "Shard"]


@dataclass
class Shard:
    id: int
    sessions: dict[str, Session] = field(default_factory=dict)
    epoch: int = 0  # highest claim epoch seen in the log
    owner: str | None = None  # node of that claim
    position: int = 0  # next offset to read from the partition
    my_epoch: int | None = None  # set while this node owns the shard
    # effective claims in log order: (offset, epoch, node); used to confirm own writes
    claims: list[tuple[int, int, str]] = field(default_factory=list)
    # JSON size of each session's data, exact for ``sessions`` (a live append's size is computed
    # from it: node/validate.py appended_size); a packed session's: its bytes
    sizes: dict[str, int] = field(default_factory=dict)
    data_bytes: int = 0
    last_offset: dict[str, int] = field(default_factory=dict)  # offset of each session's last event read
    covered: int = 0  # events skipped because a loaded snapshot already holds them
    # cumulative, kept across reset(): what a recovery report subtracts its start from
    ignored_stale: int = 0
    applied: int = 0
    read_records: int = 0  # records of the partition handled (claims included)
    loaded: dict[str, Any] = field(default_factory=dict)  # what the last load from snapshots read
    idem: IdempotencyCache = field(default_factory=IdempotencyCache)
    packed: PackedSessions = field(default_factory=PackedSessions)
    acks: AckTracker = field(default_factory=AckTracker)
    marks: SnapshotMarks = field(default_factory=SnapshotMarks)

    def commit(self, event: Op, new: Session | None, size: int | None = None) -> None:
        """Install the result of a live write (or of a replayed event)."""
        sid = event["sid"]
        self.data_bytes -= self.sizes.pop(sid, 0)
        if new is None:
            self.sessions.pop(sid, None)
            self.last_offset.pop(sid, None)
            self.idem.forget_session(sid)
        else:
            self.sessions[sid] = new
            if size is None:
                size = len(orjson.dumps(new["data"]))
            self.sizes[sid] = size
            self.data_bytes += size
        self.idem.remember(event, new)

    def erase(self, sid: str) -> None:
        """The session's data key is gone (node/erasure.py): nothing of it stays in memory."""
        self.data_bytes -= self.sizes.pop(sid, 0)
        self.sessions.pop(sid, None)
        if sid in self.packed.versions:
            self.packed.drop(sid)
        self.last_offset.pop(sid, None)
        self.marks.floor.pop(sid, None)
        self.idem.erase(sid)

    def skip_record(self, offset: int, now: float) -> None:
        """A record of the partition that is not applied (its session's key is erased, or it
        was refused): the position moves past it, an own acknowledged record is verified."""
        self.position = offset + 1
        self.read_records += 1
        acked = self.acks.acked
        if acked:
            meta = acked.pop(offset, None)
            if meta is not None:
                self.marks.own(offset, meta[0], meta[1], now)

    def apply_record(self, offset: int, event: Op, me: str, now: float) -> str:
        """Apply one record of the partition (``now``: monotonic time); returns what happened.

        "fenced" means this node owned the shard and a later claim took it away: the
        caller must stop serving and drop the shard's state.
        """
        self.position = offset + 1
        self.read_records += 1
        acked = self.acks.acked
        if acked:
            acked.pop(offset, None)  # ours; read here, so its bookkeeping happens below
        if event.get("op") == "claim":
            if event["epoch"] <= self.epoch:
                return "stale_claim"
            self.epoch, self.owner = event["epoch"], event["node"]
            self.claims.append((offset, self.epoch, self.owner))
            if self.my_epoch is not None and (self.owner != me or self.epoch != self.my_epoch):
                self.my_epoch = None
                return "fenced"
            return "claim"
        if event.get("epoch") != self.epoch or event.get("node") != self.owner:
            self.ignored_stale += 1
            return "stale"
        sid = event["sid"]
        floor = self.marks.floor
        if floor and offset <= floor.get(sid, -1):
            self.covered += 1
            return "covered"
        if sid in self.sessions or sid in self.packed.versions or event["op"] in ("create", "replace"):
            self.last_offset[sid] = offset
        if self.my_epoch is None and sid not in self.sessions:
            return self._apply_packed(sid, event)
        if self.my_epoch is not None and self.owner == me and self.epoch == self.my_epoch:
            # applied live already; now it is in the log, a snapshot may cover it
            self.marks.own(offset, sid, DELETED if event["op"] in ("delete", "expire") else event["ver"], now)
            return "own"
        current = self.sessions.get(sid)
        if current is not None and event["ver"] <= current["version"]:
            return "duplicate"
        try:
            new, _ = apply(current, event, event["at"])
        except StickyError:
            return "skipped"
        self.commit(event, new)
        self.applied += 1
        return "applied"

    def write_is_valid(self, offset: int, epoch: int, node: str) -> bool:
        """Was our write at ``offset`` (verified already) inside our ownership, not after a takeover?"""
        governing = None
        for claim_offset, claim_epoch, claim_node in self.claims:
            if claim_offset > offset:
                break
            governing = (claim_epoch, claim_node)
        return governing == (epoch, node)

    # -- owner verification (node/acks.py) --------------------------------------------
    def own_acked(self, acked: list[tuple[int, AckMeta]], now: float) -> None:
        """Kafka acknowledged our records at these offsets (owner, ``acks.acking`` set)."""
        self.acks.track(acked, self.position)
        self.absorb(now)

    def absorb(self, now: float) -> None:
        """Move ``position`` over our acknowledged records that directly follow it."""
        # The loop over the tracker's dict is the shard's: it moves the shard's position and
        # marks (one call per record, as before the split; no generator, no tuples).
        acked = self.acks.acked
        while acked:
            offset = self.position
            if offset not in acked:
                self.acks.drop_read(offset)
                return
            meta = acked.pop(offset)
            self.position = offset + 1
            if meta is not None:
                sid, ver = meta
                if ver != DELETED and sid in self.sessions:
                    self.last_offset[sid] = offset
                self.marks.own(offset, sid, ver, now)

    # -- compact standby form (node/packed.py) ------------------------------------------
    def _apply_packed(self, sid: str, event: Op) -> str:
        packed = self.packed
        ver = packed.versions.get(sid)
        op = event["op"]
        if ver is None:
            if op not in ("create", "replace"):
                return "skipped"  # as apply() would: the session does not exist
        elif event["ver"] <= ver:
            return "duplicate"
        elif op == "create":
            return "skipped"  # exists already
        if op in ("delete", "expire"):
            packed.drop(sid)
            self.data_bytes -= self.sizes.pop(sid, 0)
            self.last_offset.pop(sid, None)
            self.idem.forget_session(sid)
            self.idem.remember(event, None)
            self.applied += 1
            return "applied"
        if packed.add(sid, event):
            size = packed.fold(sid)
            if size is not None:
                self._resize(sid, size)
        self.idem.remember(event, None)  # the state after it is materialised on promotion (see unpack_all)
        self.applied += 1
        return "applied"

    def _resize(self, sid: str, size: int) -> None:
        self.data_bytes += size - self.sizes.get(sid, 0)
        self.sizes[sid] = size

    def pack(self, sid: str, state: Session) -> None:
        self._resize(sid, self.packed.pack(sid, state))

    def session_count(self) -> int:
        return len(self.sessions) + len(self.packed)

    def unpack_all(self) -> None:
        """Promotion: every session as a Python object again, pending events applied."""
        for sid, state in self.packed.unpack_all().items():
            self.data_bytes -= self.sizes.pop(sid, 0)
            if state is None:
                continue
            self.sessions[sid] = state
            size = len(orjson.dumps(state["data"]))
            self.sizes[sid] = size
            self.data_bytes += size
        self.idem.fill_states(self.sessions)  # a replay after promotion answers with the state as of now

    def pack_all(self) -> None:
        """No longer the owner, still following: keep the sessions in the compact form."""
        for sid, state in self.sessions.items():
            self.data_bytes -= self.sizes.pop(sid, 0)
            self.pack(sid, state)
        self.sessions.clear()
        self.idem.drop_states()

    # -- snapshots (node/snapshot_marks.py) ---------------------------------------------
    def load(self, epoch: int, node: str | None, replay_from: int, snapshots: dict[str, dict[str, Any]],
             packed: bool = False) -> None:
        """Start from a checkpoint: its epoch's snapshots, then read from ``replay_from``
        (``packed``: keep the sessions in the compact standby form)."""
        self.reset()
        self.position = replay_from
        if epoch:
            self.epoch, self.owner = epoch, node
            self.claims.append((replay_from - 1, epoch, node or ""))
        for sid, snap in snapshots.items():
            state = snap["state"]
            if packed:
                self.pack(sid, state)
            else:
                self.sessions[sid] = state
                size = len(orjson.dumps(state["data"]))
                self.sizes[sid] = size
                self.data_bytes += size
            self.last_offset[sid] = self.marks.floor[sid] = snap["offset"]
            self.idem.load(sid, snap.get("idem", ()), None if packed else state)

    def start_owning(self) -> None:
        """A new epoch of this node's ownership: everything held is about to be snapshotted."""
        self.marks.reset()

    def snapshot_due(self, every_events: int, max_age_s: float, now: float) -> list[str]:
        return self.marks.due(self.sessions, every_events, max_age_s, now)

    def snapshot_taken(self, sid: str) -> None:
        self.marks.taken(sid, sid in self.sessions)

    def replay_from(self) -> int:
        """The offset a rebuild may start at: every event before it is covered by a snapshot."""
        return self.marks.replay_from(self.position)

    def reset(self) -> None:
        """Hold nothing: no sessions, no claim, back to offset 0; every part reset. The
        cumulative counters (``applied``, ``read_records``, ``ignored_stale``) and
        ``loaded`` are kept."""
        self.idem.reset()
        self.packed.reset()
        self.acks.reset()
        self.marks.reset()
        self.sessions.clear()
        self.sizes.clear()
        self.last_offset.clear()
        self.claims.clear()
        self.data_bytes = 0
        self.covered = 0
        self.epoch = 0
        self.owner = None
        self.position = 0
        self.my_epoch = None
