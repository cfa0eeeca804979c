"""One shard's sessions and its position in the log, pure (no I/O, no asyncio).

The same object serves as owner (live writes applied by node/store.py), standby and
recovery target (events applied from the ``changes`` partition by ``apply_record``).

Fencing rules, applied identically by every reader of a partition:
- a claim with an epoch higher than any seen so far makes its node the owner;
- a change event whose epoch is below the highest claim seen is ignored (it was
  written by a fenced owner after it lost the shard);
- a change event whose version is not newer than the session's is a duplicate
  (a re-send after a producer was rebuilt) and is ignored.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from node.errors import StickyError
from node.ops import Op, Session, apply

IDEM_PER_SHARD = 4096

STATUS_OF_OP = {"create": 201, "delete": 204}


@dataclass
class IdemEntry:
    fingerprint: str
    status: int
    state: Session | None  # the state right after the write (immutable: apply is copy-on-write)
    event: Op
    delivery: Any = None  # live writes: the replication future, so a retry waits for the same log ack


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

    def remember(self, event: Op, state: Session | None) -> None:
        idem = event.get("idem")
        if not idem:
            return
        key = (event["sid"], idem[0])
        status = 201 if event["op"] == "replace" and event.get("ver") == 1 else STATUS_OF_OP.get(event["op"], 200)
        self.idem[key] = IdemEntry(idem[1], status, state, event)
        self.idem.move_to_end(key)
        while len(self.idem) > IDEM_PER_SHARD:
            self.idem.popitem(last=False)

    def commit(self, event: Op, new: Session | None, size: int | None = None) -> None:
        """Install the result of a live write (or of a replayed event)."""
        sid = event["sid"]
        self.data_bytes -= self.sizes.pop(sid, 0)
        if new is None:
            self.sessions.pop(sid, None)
            self.last_offset.pop(sid, None)
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
        if sid in self.sessions or event["op"] in ("create", "replace"):
            self.last_offset[sid] = offset
        if self.my_epoch is not None and self.owner == me and self.epoch == self.my_epoch:
            return "own"  # applied live already
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
        """Was our write at ``offset`` (read already) inside our ownership, not after a takeover?"""
        governing = None
        for claim_offset, claim_epoch, claim_node in self.claims:
            if claim_offset > offset:
                break
            governing = (claim_epoch, claim_node)
        return governing == (epoch, node)

    def reset(self) -> None:
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
