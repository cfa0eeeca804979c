"""Shard placement: shard -> owner and standbys.

Pure: no I/O, no asyncio, no aiohttp. Every router computes the same placement from
the same membership, so this module is pinned by golden vectors in the tests.

- session id -> shard is ``stickystate.protocol.shard_of`` (clients compute it too).
- ``Placement``: a uhashring ring over node ids; the owner of a shard is the first node
  for the key ``"shard-<n>"``, its standbys the next distinct nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from uhashring import HashRing


@dataclass(frozen=True)
class Placement:
    """Owner and standbys of every shard for one membership (a set of node ids)."""

    nodes: tuple[str, ...]
    partitions: int
    standbys: int = 0
    _owners: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _standbys: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError("partitions must be >= 1")
        if self.standbys < 0:
            raise ValueError("standbys must be >= 0")
        nodes = tuple(sorted(set(self.nodes)))
        object.__setattr__(self, "nodes", nodes)
        owners: list[str] = []
        standbys: list[tuple[str, ...]] = []
        if nodes:
            ring = HashRing(nodes=list(nodes))
            want = min(len(nodes), 1 + self.standbys)
            for shard in range(self.partitions):
                chain = [conf["nodename"] for conf in ring.range(f"shard-{shard}", size=want)]
                owners.append(chain[0])
                standbys.append(tuple(chain[1:]))
        object.__setattr__(self, "_owners", tuple(owners))
        object.__setattr__(self, "_standbys", tuple(standbys))

    @classmethod
    def published(cls, nodes: tuple[str, ...], partitions: int, standbys: int, owners: Mapping[int, str],
                  chains: Mapping[int, tuple[str, ...]]) -> Placement:
        """A placement as another router computed and published it (router/control.py): the
        same nodes give the same ring, but the follower takes the owners it was told. No
        owners at all is the map of a leader that saw no healthy node (as for no nodes)."""
        if not owners:
            return cls((), partitions, standbys)
        if set(owners) != set(range(partitions)):
            raise ValueError(f"the map names owners for {len(owners)} shards, not {partitions}")
        placement = cls((), partitions, standbys)
        object.__setattr__(placement, "nodes", tuple(sorted(set(nodes))))
        object.__setattr__(placement, "_owners", tuple(owners[s] for s in range(partitions)))
        object.__setattr__(placement, "_standbys", tuple(tuple(chains.get(s, ())) for s in range(partitions)))
        return placement

    def owner(self, shard: int) -> str | None:
        return self._owners[shard] if self._owners else None

    def standbys_of(self, shard: int) -> tuple[str, ...]:
        return self._standbys[shard] if self._standbys else ()

    def owner_map(self) -> dict[int, str]:
        return dict(enumerate(self._owners))

    def owned_by(self, node: str) -> list[int]:
        return [s for s, o in enumerate(self._owners) if o == node]

    def standby_for(self, node: str) -> list[int]:
        return [s for s, chain in enumerate(self._standbys) if node in chain]


def moved_shards(before: Mapping[int, str], after: Mapping[int, str]) -> dict[int, tuple[str | None, str]]:
    """Shards whose owner differs between two owner maps: shard -> (old, new)."""
    return {s: (before.get(s), o) for s, o in after.items() if before.get(s) != o}

