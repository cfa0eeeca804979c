"""A shard's snapshot bookkeeping, pure (no I/O, no asyncio; the time is passed in).

Loaded snapshots (replicator/snapshots.py): ``floor`` holds each session's snapshot
offset; its events at or below it are in the state already, and are skipped.

While this node owns the shard it tracks which sessions have changes no snapshot covers
yet (``dirty``), counting only changes verified in the log (read back, or acknowledged
in order: node/acks.py), so a snapshot never holds a change the log does not (or may
never) have; ``read_ver`` is the version of each session's last verified change.
node/snapshotting.py writes the snapshots these marks make due.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DELETED = -1  # read_ver of a session whose last change read back was a delete or expiry


@dataclass(slots=True)
class SnapshotMarks:
    floor: dict[str, int] = field(default_factory=dict)  # loaded snapshots: events at or below are in the state
    # owner only: sid -> [first offset not covered by a snapshot, monotonic time of it, changes since]
    dirty: dict[str, list[float]] = field(default_factory=dict)
    read_ver: dict[str, int] = field(default_factory=dict)  # owner: version of the last own change verified

    def own(self, offset: int, sid: str, ver: int, now: float) -> None:
        """Our change at ``offset`` (``now``, monotonic) is verified in the log: a snapshot may now cover it."""
        mark = self.dirty.get(sid)
        if mark is None:
            self.dirty[sid] = [offset, now, 1]
        else:
            mark[2] += 1
        self.read_ver[sid] = ver

    def due(self, sessions: Mapping[str, Any], every_events: int, max_age_s: float, now: float) -> list[str]:
        """Sessions to snapshot now: enough changes, or changed long enough ago; and every
        change applied to them has been verified (so the state is exactly the log's up to
        their last offset)."""
        due = []
        for sid, (_, since, count) in self.dirty.items():
            if count < every_events and now - since < max_age_s:
                continue
            state = sessions.get(sid)
            read = self.read_ver.get(sid)
            if (DELETED if state is None else state["version"]) == read:
                due.append(sid)
        return due

    def taken(self, sid: str, exists: bool) -> None:
        """``sid``'s snapshot (a tombstone unless it ``exists``) is written."""
        self.dirty.pop(sid, None)
        if not exists:
            self.read_ver.pop(sid, None)

    def replay_from(self, position: int) -> int:
        """The offset a rebuild may start at: every event before it is covered by a snapshot."""
        start = position
        for first, _, _ in self.dirty.values():
            if first < start:
                start = int(first)
        return start

    def reset(self) -> None:
        self.floor.clear()
        self.dirty.clear()
        self.read_ver.clear()
