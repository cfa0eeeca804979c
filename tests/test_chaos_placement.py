"""The chaos report's placement agreement (chaos/placement.py): pure, no broker."""

from __future__ import annotations

from typing import Any

from stickystate.chaos.placement import agreement, followed_maps
from stickystate.router.control import term_base


def record(offset: int, key: bytes, doc: dict[str, Any]) -> tuple[int, bytes, dict[str, Any]]:
    return offset, key, doc


def test_a_deposed_leaders_late_map_is_not_followed() -> None:
    recs = [record(0, b"leader", {"router": "r1"}),
            record(1, b"map", {"generation": term_base(1) + 1, "leader": "r1", "shards": {"0": "a"}}),
            record(2, b"leader", {"router": "r2"}),  # term 3
            record(3, b"map", {"generation": term_base(1) + 2, "leader": "r1", "shards": {"0": "b"}}),  # late
            record(4, b"map", {"generation": term_base(3) + 1, "leader": "r2", "shards": {"0": "a"}})]
    assert [m["leader"] for m in followed_maps(recs)] == ["r1", "r2"]


def test_claims_are_matched_to_the_moves_of_the_maps() -> None:
    maps = [{"generation": 1, "leader": "r1", "shards": {"0": "a", "1": "b"}},
            {"generation": 2, "leader": "r1", "shards": {"0": "b", "1": "b"}},
            {"generation": 3, "leader": "r1", "shards": {"0": "a", "1": "b"}}]
    views = {"r1": {"generation": 3, "shards": {"0": "a"}, "settled": True},
             "r2": {"generation": 3, "shards": {"0": "a"}, "settled": True}}
    # shard 0: a, b, a claimed in turn; shard 1: b claimed twice although it never moved
    rep = agreement(maps, {0: [(1, 1, "a"), (5, 2, "b"), (9, 3, "a")], 1: [(1, 1, "b"), (7, 2, "b")]}, 2, views)
    assert rep["ownership_changes"] == 4 and rep["claims"] == 5 and rep["moves_taken"] == 4
    assert rep["unexplained_claims"] == {1: 1} and rep["moves_undone_before_claim"] == 0
    assert rep["returns"] == 1 and rep["routers_agree"] is True
    # shard 0 moved to b and back before b claimed: an undone move, no unexplained claim
    rep = agreement(maps, {0: [(1, 1, "a"), (9, 3, "a")], 1: [(1, 1, "b")]}, 2, views)
    assert rep["moves_undone_before_claim"] == 1 and rep["unexplained_claims"] == {}
    views["r2"] = {"generation": 2, "shards": {"0": "b"}, "settled": True}
    assert agreement(maps, {}, 2, views)["routers_agree"] is False
