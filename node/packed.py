"""The compact standby form of a shard's sessions, pure (no I/O, no asyncio).

A shard this node follows without owning keeps each session as its orjson bytes
(``raw``) plus the few events applied since (``pending``: their orjson bytes, one per
line), folded into the bytes every ``FOLD_EVERY`` events, and the version the last event
gave it (``versions``: what duplicates are checked against). JSON bytes take a fraction of
the memory of the equivalent Python objects, and the cyclic GC does not track them: kept as
dicts, a standby's pending events (a dict and a list each, living for seconds) were most of
what reached the oldest generation and what a node's full GC passes walked
(docs/BENCHMARKS.md). Promotion (``unpack_all``) decodes every session and applies its
pending events: work in proportion to the live state, not the history.

Which events reach this form, and the byte accounting of the shard, are node/shard.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from stickystate.errors import StickyError
from stickystate.node.ops import Op, Session, apply

FOLD_EVERY = 8  # pending events per packed session before they are folded into its bytes


@dataclass(slots=True)
class PackedSessions:
    raw: dict[str, bytes] = field(default_factory=dict)  # sid -> orjson bytes of the session
    pending: dict[str, bytes] = field(default_factory=dict)  # sid -> events applied since, a line each
    counts: dict[str, int] = field(default_factory=dict)  # sid -> how many events ``pending`` holds
    versions: dict[str, int] = field(default_factory=dict)  # sid -> version after its last event

    def add(self, sid: str, event: Op) -> bool:
        """Keep a change event of ``sid``; True when its pending events are due to be folded."""
        line = orjson.dumps(event)  # one line: orjson writes no raw newline
        pend = self.pending.get(sid)
        self.pending[sid] = line if pend is None else pend + b"\n" + line
        count = self.counts[sid] = self.counts.get(sid, 0) + 1
        self.versions[sid] = event["ver"]
        return count >= FOLD_EVERY

    def pack(self, sid: str, state: Session) -> int:
        """Keep ``state`` packed; returns its size in bytes."""
        packed = orjson.dumps(state)
        self.raw[sid] = packed
        self.versions[sid] = state["version"]
        return len(packed)

    def fold(self, sid: str) -> int | None:
        """Apply the session's pending events to its bytes; returns the new size (None:
        nothing left to keep)."""
        state = self._current(sid)
        if state is None:
            self.raw.pop(sid, None)
            return None
        packed = orjson.dumps(state)
        self.raw[sid] = packed
        return len(packed)

    def drop(self, sid: str) -> None:
        self.raw.pop(sid, None)
        self.pending.pop(sid, None)
        self.counts.pop(sid, None)
        del self.versions[sid]

    def unpack_all(self) -> dict[str, Session | None]:
        """Every session decoded, its pending events applied; the form is empty afterwards."""
        out = {sid: self._current(sid) for sid in self.versions}
        self.reset()
        return out

    def _current(self, sid: str) -> Session | None:
        """The session with its pending events applied (taken off ``pending``)."""
        raw = self.raw.get(sid)
        state: Session | None = orjson.loads(raw) if raw is not None else None
        pend = self.pending.pop(sid, None)
        if pend is None:
            return state
        del self.counts[sid]
        for line in pend.split(b"\n"):
            event = orjson.loads(line)
            try:
                state, _ = apply(state, event, event["at"])
            except StickyError:
                continue  # replay is deterministic: the owner could not have logged it either
        return state

    def __len__(self) -> int:
        return len(self.versions)

    def reset(self) -> None:
        self.raw.clear()
        self.pending.clear()
        self.counts.clear()
        self.versions.clear()
