"""Placement is pinned by golden vectors: the same ids map to the same shards and
owners forever (a change here moves every user's sessions)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from stickystate.protocol import shard_of
from stickystate.router.placement import Placement, moved_shards

GOLDEN_SHARDS = {
    "alice": 7,
    "bob": 0,
    "session-0001": 33,
    "conv:42:turns": 1,
    "x": 3,
    "A.b_c-d:e": 12,
}

GOLDEN_OWNERS_3 = {0: "n1", 1: "n3", 7: "n1", 13: "n2", 42: "n2", 63: "n1"}


def test_shard_of_golden_vectors():
    assert {sid: shard_of(sid, 64) for sid in GOLDEN_SHARDS} == GOLDEN_SHARDS


def test_owner_golden_vectors():
    p = Placement(("n1", "n2", "n3"), 64)
    assert {s: p.owner(s) for s in GOLDEN_OWNERS_3} == GOLDEN_OWNERS_3


def test_placement_ignores_node_order_and_duplicates():
    assert Placement(("n3", "n1", "n2", "n1"), 64).owner_map() == Placement(("n1", "n2", "n3"), 64).owner_map()


def test_standbys_are_distinct_and_not_the_owner():
    p = Placement(("n1", "n2", "n3"), 64, standbys=2)
    for s in range(64):
        chain = (p.owner(s), *p.standbys_of(s))
        assert len(set(chain)) == 3


node_sets = st.sets(st.from_regex(r"n[0-9]{1,3}", fullmatch=True), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(node_sets, st.from_regex(r"n[0-9]{1,3}", fullmatch=True))
def test_adding_a_node_moves_shards_only_onto_it(nodes, new):
    if new in nodes:
        return
    before = Placement(tuple(nodes), 64).owner_map()
    after = Placement(tuple(nodes | {new}), 64).owner_map()
    for shard, (old_owner, new_owner) in moved_shards(before, after).items():
        assert new_owner == new, (shard, old_owner, new_owner)


@settings(max_examples=150, deadline=None)
@given(node_sets.filter(lambda s: len(s) >= 2), st.data())
def test_removing_a_node_moves_only_its_shards(nodes, data):
    gone = data.draw(st.sampled_from(sorted(nodes)))
    before = Placement(tuple(nodes), 64).owner_map()
    after = Placement(tuple(nodes - {gone}), 64).owner_map()
    for shard, (old_owner, _) in moved_shards(before, after).items():
        assert old_owner == gone
