"""Kafka's acknowledgements of an owner's records, pure (no I/O, no asyncio).

Owner verification (node/verification.py says why and what waits on it): while this node owns a shard
at epoch ``acking``, Kafka's acknowledgements of our records verify them without
reading the partition back, as long as they directly follow what is verified already
(offsets are dense: nothing, no takeover claim, lies between). An acknowledged record
past an offset not verified yet is a ``hole``: it waits in ``acked`` until the partition
is read up to it. ``read_to``: how far the partition must be read before the node may
stop following it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

AckMeta = tuple[str, int] | None  # (sid, version or DELETED) of a record; None: no bookkeeping


@dataclass(slots=True)
class AckTracker:
    acking: int | None = None  # the epoch whose acknowledgements are tracked (None: not owning)
    acked: dict[int, AckMeta] = field(default_factory=dict)  # offset -> meta, at or beyond the shard's position
    read_to: int = 0

    def start(self, epoch: int) -> None:
        """Our claim at ``epoch`` has been read: from here on acknowledgements verify."""
        self.acking = epoch
        self.read_to = 0

    def track(self, acked: Iterable[tuple[int, AckMeta]], position: int) -> None:
        """Kafka acknowledged our records at these offsets; those below ``position`` were read already."""
        for offset, meta in acked:
            if offset >= position:
                self.acked[offset] = meta

    def drop_read(self, position: int) -> None:
        """Forget acknowledgements below ``position``: those records were read meanwhile
        (follower), nothing is left to do for them."""
        acked = self.acked
        if acked and min(acked) < position:
            for stale in [o for o in acked if o < position]:
                del acked[stale]

    @property
    def hole(self) -> bool:
        """An acknowledged record of ours lies beyond records we have not verified."""
        return bool(self.acked)

    def reset(self) -> None:
        """Not owning (any more): nothing is tracked."""
        self.acking = None
        self.acked.clear()
        self.read_to = 0
