"""One shard's sessions and its position in the log, pure (no I/O, no asyncio).

The same object serves as owner (live writes applied by node/store.py), standby and
recovery target (events applied from the ``changes`` partition by ``apply_record``).

Fencing rules, applied identically by every reader of a partition:
- a claim with an epoch higher than any seen so far makes its node the owner;
- a change event whose epoch is below the highest claim seen is ignored (it was
  written by a fenced owner after it lost the shard);
- a change event whose version is not newer than the session's is a duplicate
  (a re-send after a producer was rebuilt) and is ignored.

Snapshots (replicator/snapshots.py): a shard rebuilt from snapshots starts reading the
partition at the checkpoint's ``replay_from`` with the checkpoint's (epoch, node) as
the governing claim, and skips each session's events at or below its snapshot's
offset (``floor``). While this node owns the shard it tracks which sessions have
changes no snapshot covers yet (``dirty``), counting only changes it has read back
from the log, so a snapshot never holds a change the log does not (or may never) have.

Compact standby form: a shard this node follows without owning keeps each session as
its orjson bytes (``packed``) plus the few events applied since (``pending``), folded
into the bytes every ``FOLD_EVERY`` events. JSON bytes take a fraction of the memory
of the equivalent Python objects. Promotion (``unpack_all``) decodes every session and
applies its pending events: work in proportion to the live state, not the history.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from stickystate.errors import StickyError
from stickystate.node.ops import Op, Session, apply
from stickystate.protocol import ROUTER_KEY_PREFIX  # keys the router adds: their entries keep no state

IDEM_PER_SHARD = 4096
IDEM_PER_SESSION_SNAPSHOT = 8  # idempotency keys kept in a session's snapshot (recent writes only)
FOLD_EVERY = 8  # pending events per packed session before they are folded into its bytes
DELETED = -1  # read_ver of a session whose last change read back was a delete or expiry

STATUS_OF_OP = {"create": 201, "delete": 204}


# An idempotency record: a plain tuple (fingerprint, status, state, epoch, delivery), so
# that the cyclic GC stops tracking it once it holds only atomic values (no state, its
# delivery settled to an offset). The cache holds up to IDEM_PER_SHARD of them per shard,
# as owner and as standby; as objects holding the state after the write and the event,
# they made the node's full collections walk millions of objects (0.1-0.5 s pauses).
#   state: the state right after the write (immutable: apply is copy-on-write); None for
#          a router key, and on a standby until promotion
#   epoch: of the write's event (None: loaded from a snapshot)
#   delivery: live writes: the replication future, so a retry waits for the same log
#          ack; once it succeeded, the offset it got (an int)
IdemEntry = tuple
FP, STATUS, STATE, EPOCH, DELIVERY = range(5)


@dataclass
class Shard:
    id: int
    sessions: dict[str, Session] = field(default_factory=dict)
    epoch: int = 0  # highest claim epoch seen in the log
    owner: str | None = None  # node of that claim
    position: int = 0  # next offset to read from the partition
    my_epoch: int | None = None  # set while this node owns the shard
    idem: OrderedDict[tuple[str, str], IdemEntry] = field(default_factory=OrderedDict)
    # effective claims in log order: (offset, epoch, node); used to confirm own writes
    claims: list[tuple[int, int, str]] = field(default_factory=list)
    ignored_stale: int = 0
    applied: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # JSON size of each session's data
    data_bytes: int = 0
    last_offset: dict[str, int] = field(default_factory=dict)  # offset of each session's last event read
    floor: dict[str, int] = field(default_factory=dict)  # loaded snapshots: events at or below are in the state
    # owner only: sid -> [first offset not covered by a snapshot, monotonic time of it, changes since]
    dirty: dict[str, list[float]] = field(default_factory=dict)
    read_ver: dict[str, int] = field(default_factory=dict)  # owner: version of the last own change read back
    recent_idem: dict[str, deque[str]] = field(default_factory=dict)  # sid -> its recent idempotency keys
    covered: int = 0  # events skipped because a loaded snapshot already holds them
    read_records: int = 0  # records of the partition handled (claims included)
    loaded: dict[str, Any] = field(default_factory=dict)  # what the last load from snapshots read
    # compact standby form: sid -> orjson bytes of the session, events since, resulting version
    packed: dict[str, bytes] = field(default_factory=dict)
    pending: dict[str, list[Op]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    # owner verification (module docstring): the epoch whose acknowledgements are being
    # tracked, our acknowledged records at or beyond ``position`` (offset -> (sid, version
    # or DELETED), None for records without bookkeeping), and how far the partition must
    # be read before the node may stop following it
    acking: int | None = None
    acked: dict[int, tuple[str, int] | None] = field(default_factory=dict)
    read_to: int = 0

    def remember(self, event: Op, state: Session | None) -> None:
        idem = event.get("idem")
        if not idem:
            return
        key = (event["sid"], idem[0])
        status = 201 if event["op"] == "replace" and event.get("ver") == 1 else STATUS_OF_OP.get(event["op"], 200)
        light = idem[0].startswith(ROUTER_KEY_PREFIX)
        self.idem[key] = (idem[1], status, None if light else state, event.get("epoch"), None)
        self.idem.move_to_end(key)
        while len(self.idem) > IDEM_PER_SHARD:
            self.idem.popitem(last=False)
        recent = self.recent_idem.get(key[0])
        if recent is None:
            recent = self.recent_idem[key[0]] = deque(maxlen=IDEM_PER_SESSION_SNAPSHOT)
        recent.append(idem[0])

    def commit(self, event: Op, new: Session | None, size: int | None = None) -> None:
        """Install the result of a live write (or of a replayed event)."""
        sid = event["sid"]
        self.data_bytes -= self.sizes.pop(sid, 0)
        if new is None:
            self.sessions.pop(sid, None)
            self.last_offset.pop(sid, None)
            self.recent_idem.pop(sid, None)
        else:
            self.sessions[sid] = new
            if size is None:
                size = len(orjson.dumps(new["data"]))
            self.sizes[sid] = size
            self.data_bytes += size
        self.remember(event, new)

    def apply_record(self, offset: int, event: Op, me: str) -> str:
        """Apply one record of the partition; returns what happened.

        "fenced" means this node owned the shard and a later claim took it away: the
        caller must stop serving and drop the shard's state.
        """
        self.position = offset + 1
        self.read_records += 1
        if self.acked:
            self.acked.pop(offset, None)  # ours; read here, so its bookkeeping happens below
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
        if self.floor and offset <= self.floor.get(sid, -1):
            self.covered += 1
            return "covered"
        if sid in self.sessions or sid in self.versions or event["op"] in ("create", "replace"):
            self.last_offset[sid] = offset
        if self.my_epoch is None and sid not in self.sessions:
            return self._apply_packed(sid, event)
        if self.my_epoch is not None and self.owner == me and self.epoch == self.my_epoch:
            # applied live already; now it is in the log, a snapshot may cover it
            self._own(offset, sid, DELETED if event["op"] in ("delete", "expire") else event["ver"])
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

    def _own(self, offset: int, sid: str, ver: int) -> None:
        """Our change at ``offset`` is verified in the log: a snapshot may now cover it."""
        mark = self.dirty.get(sid)
        if mark is None:
            self.dirty[sid] = [offset, time.monotonic(), 1]
        else:
            mark[2] += 1
        self.read_ver[sid] = ver

    def own_acked(self, acked: list[tuple[int, tuple[str, int] | None]]) -> None:
        """Kafka acknowledged our records at these offsets (owner, ``acking`` set)."""
        position = self.position
        for offset, meta in acked:
            if offset >= position:
                self.acked[offset] = meta
        self.absorb()

    def absorb(self) -> None:
        """Move ``position`` over our acknowledged records that directly follow it."""
        acked = self.acked
        while acked:
            offset = self.position
            if offset not in acked:
                if min(acked) < offset:  # read meanwhile (follower): nothing left to do for them
                    for stale in [o for o in acked if o < offset]:
                        del acked[stale]
                    continue
                return
            meta = acked.pop(offset)
            self.position = offset + 1
            if meta is not None:
                sid, ver = meta
                if ver != DELETED and sid in self.sessions:
                    self.last_offset[sid] = offset
                self._own(offset, sid, ver)

    @property
    def hole(self) -> bool:
        """An acknowledged record of ours lies beyond records we have not verified."""
        return bool(self.acked)

    # -- compact standby form ---------------------------------------------------------------
    def _apply_packed(self, sid: str, event: Op) -> str:
        ver = self.versions.get(sid)
        op = event["op"]
        if ver is None:
            if op not in ("create", "replace"):
                return "skipped"  # as apply() would: the session does not exist
        elif event["ver"] <= ver:
            return "duplicate"
        elif op == "create":
            return "skipped"  # exists already
        if op in ("delete", "expire"):
            self.packed.pop(sid, None)
            self.pending.pop(sid, None)
            del self.versions[sid]
            self.data_bytes -= self.sizes.pop(sid, 0)
            self.last_offset.pop(sid, None)
            self.recent_idem.pop(sid, None)
            self.remember(event, None)
            self.applied += 1
            return "applied"
        pend = self.pending.setdefault(sid, [])
        pend.append(event)
        self.versions[sid] = event["ver"]
        if len(pend) >= FOLD_EVERY:
            self._fold(sid)
        self.remember(event, None)  # the state after it is materialised on promotion (see unpack_all)
        self.applied += 1
        return "applied"

    def _fold(self, sid: str) -> Session | None:
        """Apply a packed session's pending events; keep the result packed; return it."""
        raw = self.packed.get(sid)
        state: Session | None = orjson.loads(raw) if raw is not None else None
        for event in self.pending.pop(sid, ()):
            try:
                state, _ = apply(state, event, event["at"])
            except StickyError:
                continue  # replay is deterministic: the owner could not have logged it either
        if state is None:
            self.packed.pop(sid, None)
            return None
        packed = orjson.dumps(state)
        self.packed[sid] = packed
        self.data_bytes += len(packed) - self.sizes.get(sid, 0)
        self.sizes[sid] = len(packed)
        return state

    def pack(self, sid: str, state: Session) -> None:
        packed = orjson.dumps(state)
        self.packed[sid] = packed
        self.versions[sid] = state["version"]
        self.data_bytes += len(packed) - self.sizes.get(sid, 0)
        self.sizes[sid] = len(packed)

    def session_count(self) -> int:
        return len(self.sessions) + len(self.versions)

    def unpack_all(self) -> None:
        """Promotion: every session as a Python object again, pending events applied."""
        for sid in list(self.versions):
            state = self._fold(sid) if self.pending.get(sid) else orjson.loads(self.packed[sid])
            self.data_bytes -= self.sizes.pop(sid, 0)
            if state is None:
                continue
            self.sessions[sid] = state
            size = len(orjson.dumps(state["data"]))
            self.sizes[sid] = size
            self.data_bytes += size
        self.packed.clear()
        self.pending.clear()
        self.versions.clear()
        for key, entry in list(self.idem.items()):
            if entry[STATE] is None and entry[STATUS] != 204 and not key[1].startswith(ROUTER_KEY_PREFIX):
                # a replay after promotion answers with the state as of now
                self.idem[key] = (*entry[:STATE], self.sessions.get(key[0]), *entry[STATE + 1:])

    def pack_all(self) -> None:
        """No longer the owner, still following: keep the sessions in the compact form."""
        for sid, state in self.sessions.items():
            self.data_bytes -= self.sizes.pop(sid, 0)
            self.pack(sid, state)
        self.sessions.clear()
        for key, entry in list(self.idem.items()):
            if entry[STATE] is not None:
                self.idem[key] = (*entry[:STATE], None, *entry[STATE + 1:])

    # -- snapshots --------------------------------------------------------------------
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
            self.last_offset[sid] = self.floor[sid] = snap["offset"]
            for key, fp, status in snap.get("idem", ()):
                self.idem[(sid, key)] = (fp, status, None if packed else state, None, None)
                self.recent_idem.setdefault(sid, deque(maxlen=IDEM_PER_SESSION_SNAPSHOT)).append(key)

    def start_owning(self) -> None:
        """A new epoch of this node's ownership: everything held is about to be snapshotted."""
        self.dirty.clear()
        self.read_ver.clear()
        self.floor.clear()

    def snapshot_due(self, every_events: int, max_age_s: float, now: float) -> list[str]:
        """Sessions to snapshot now: enough changes, or changed long enough ago; and every
        change applied to them has been read back from the log (so the state is exactly
        the log's up to their last offset)."""
        due = []
        for sid, (_, since, count) in self.dirty.items():
            if count < every_events and now - since < max_age_s:
                continue
            state = self.sessions.get(sid)
            read = self.read_ver.get(sid)
            if (DELETED if state is None else state["version"]) == read:
                due.append(sid)
        return due

    def snapshot_taken(self, sid: str) -> None:
        self.dirty.pop(sid, None)
        if sid not in self.sessions:
            self.read_ver.pop(sid, None)

    def idem_of(self, sid: str) -> list[list[Any]]:
        out = []
        for key in self.recent_idem.get(sid, ()):
            entry = self.idem.get((sid, key))
            if entry is not None:
                out.append([key, entry[FP], entry[STATUS]])
        return out

    def replay_from(self) -> int:
        """The offset a rebuild may start at: every event before it is covered by a snapshot."""
        start = self.position
        for first, _, _ in self.dirty.values():
            if first < start:
                start = int(first)
        return start

    def stop_acking(self) -> None:
        self.acking = None
        self.acked.clear()
        self.read_to = 0

    def reset(self) -> None:
        self.stop_acking()
        self.packed.clear()
        self.pending.clear()
        self.versions.clear()
        self.floor.clear()
        self.dirty.clear()
        self.read_ver.clear()
        self.recent_idem.clear()
        self.covered = 0
        self.sessions.clear()
        self.idem.clear()
        self.sizes.clear()
        self.last_offset.clear()
        self.data_bytes = 0
        self.epoch = 0
        self.owner = None
        self.position = 0
        self.my_epoch = None
        self.claims.clear()
