"""Which shards this node holds, and in which role: the state the store's parts share.

node/ownership.py changes it (assignment, acquisition, fencing, release); the other
parts of the store (node/store.py) read it. ``refusing`` is set once the node leaves
(drain, stop): it then serves nothing new and its background loops pause.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from stickystate.node.shard import Shard
from stickystate.protocol import shard_of


@dataclass
class ShardRoles:
    partitions: int
    shards: dict[int, Shard] = field(default_factory=dict)  # every shard held: owned, being acquired, standby
    serving: set[int] = field(default_factory=set)  # owned, acquired: requests are answered
    recovering: dict[int, asyncio.Event] = field(default_factory=dict)  # owned, being acquired (set when served)
    standby: set[int] = field(default_factory=set)  # the router's standby shards for this node
    owners: dict[int, str] = field(default_factory=dict)  # the router's view (or a claim read since), for 421 hints
    generation: int = -1  # of the router's last assignment (-1: none, or acquiring failed)
    refusing: bool = False  # leaving: no new requests (the router retries them elsewhere)

    def shard_for(self, sid: str) -> int:
        return shard_of(sid, self.partitions)

    def owned(self, s: int) -> Shard | None:
        """The shard if we own it with our claim read (acknowledgements tracked)."""
        shard = self.shards.get(s)
        return shard if shard is not None and shard.acks.acking is not None else None
