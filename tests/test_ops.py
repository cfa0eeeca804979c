"""Pure state operations: RFC 7386, bounded append, TTL arithmetic, replay determinism."""

import copy

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stickystate.errors import BadRequest, Conflict, NotFound
from stickystate.node.ops import apply, merge_patch, view
from stickystate.node.shard import Shard

# RFC 7386, Appendix A: (target, patch, result)
RFC7386_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize("target,patch,result", RFC7386_EXAMPLES)
def test_merge_patch_rfc7386_examples(target, patch, result):
    before = copy.deepcopy(target)
    assert merge_patch(target, patch) == result
    assert target == before  # never mutated


def create(sid="s1", data=None, ttl=60.0, now=1000.0):
    return apply(None, {"op": "create", "sid": sid, "data": data or {}, "ttl_s": ttl}, now)


def test_create_sets_version_and_expiry():
    state, event = create(now=1000.0, ttl=60.0)
    assert state["version"] == 1 and state["expires_at"] == 1060.0
    assert event["ver"] == 1 and event["at"] == 1000.0 and event["op"] == "create"


def test_create_twice_conflicts_and_missing_session_is_not_found():
    state, _ = create()
    with pytest.raises(Conflict):
        apply(state, {"op": "create", "sid": "s1", "data": {}, "ttl_s": 1.0}, 1001.0)
    with pytest.raises(NotFound):
        apply(None, {"op": "patch", "sid": "s1", "patch": {}}, 1001.0)


def test_every_write_slides_the_ttl():
    state, _ = create(now=1000.0, ttl=60.0)
    state, _ = apply(state, {"op": "patch", "sid": "s1", "patch": {"x": 1}}, 1030.0)
    assert state["expires_at"] == 1090.0 and state["version"] == 2


def test_bounded_append_keeps_the_last_n():
    state, _ = create()
    for i in range(5):
        state, _ = apply(state, {"op": "append", "sid": "s1", "field": "m", "items": [i, i + 100], "max_len": 3},
                         1000.0 + i)
    assert state["data"]["m"] == [103, 4, 104]
    assert state["version"] == 6


def test_append_to_non_list_is_rejected():
    state, _ = create(data={"m": "text"})
    with pytest.raises(BadRequest):
        apply(state, {"op": "append", "sid": "s1", "field": "m", "items": [1], "max_len": None}, 1001.0)


def test_key_ttl_hides_then_purges_the_key():
    state, _ = create(now=1000.0, ttl=600.0)
    state, _ = apply(state, {"op": "set_key", "sid": "s1", "key": "otp", "value": 42, "ttl_s": 10.0}, 1000.0)
    assert view(state, 1009.9)["data"] == {"otp": 42}
    assert view(state, 1010.0)["data"] == {}
    state, _ = apply(state, {"op": "patch", "sid": "s1", "patch": {"a": 1}}, 1011.0)
    assert state["data"] == {"a": 1} and state["key_expiry"] == {}


def test_set_key_without_ttl_clears_a_previous_key_ttl():
    state, _ = create()
    state, _ = apply(state, {"op": "set_key", "sid": "s1", "key": "k", "value": 1, "ttl_s": 5.0}, 1000.0)
    state, _ = apply(state, {"op": "set_key", "sid": "s1", "key": "k", "value": 2, "ttl_s": None}, 1001.0)
    assert view(state, 2000.0)["data"] == {"k": 2}


def test_delete_and_expire_remove_the_session():
    state, _ = create()
    new, event = apply(state, {"op": "delete", "sid": "s1"}, 1001.0)
    assert new is None and event["ver"] == 2
    new, event = apply(state, {"op": "expire", "sid": "s1"}, 1001.0)
    assert new is None and event["op"] == "expire"


def test_apply_does_not_mutate_its_input():
    state, _ = create(data={"m": [1], "d": {"x": 1}})
    before = orjson.dumps(state)
    apply(state, {"op": "append", "sid": "s1", "field": "m", "items": [2], "max_len": None}, 1001.0)
    apply(state, {"op": "patch", "sid": "s1", "patch": {"d": {"x": None}}}, 1001.0)
    assert orjson.dumps(state) == before


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=8,
)
op_strategy = st.one_of(
    st.builds(lambda d: {"op": "replace", "data": d, "ttl_s": 30.0}, st.dictionaries(st.text(max_size=3), json_values, max_size=3)),
    st.builds(lambda p: {"op": "patch", "patch": p}, st.dictionaries(st.text(max_size=3), json_values, max_size=3)),
    st.builds(lambda items, n: {"op": "append", "field": "m", "items": items, "max_len": n},
              st.lists(json_values, max_size=4), st.none() | st.integers(1, 5)),
    st.builds(lambda k, val, t: {"op": "set_key", "key": k, "value": val, "ttl_s": t},
              st.sampled_from(["a", "b", "c"]), json_values, st.none() | st.floats(0.5, 20)),
    st.builds(lambda k: {"op": "delete_key", "key": k}, st.sampled_from(["a", "b", "c"])),
    st.just({"op": "delete"}),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["s1", "s2"]), op_strategy, st.floats(0, 5)), max_size=25))
def test_replaying_the_log_twice_gives_identical_bytes(ops):
    """Live-apply a random op sequence, log the events, replay them into two fresh
    replicas: both hold byte-identical state equal to the live one."""
    live: dict = {}
    log = []
    now = 1000.0
    for offset, (sid, op, dt) in enumerate(ops):
        now += dt
        op = {**op, "sid": sid}
        try:
            new, event = apply(live.get(sid), op, now)
        except (BadRequest, NotFound, Conflict):
            continue
        event.update(node="n1", epoch=1)
        if new is None:
            live.pop(sid, None)
        else:
            live[sid] = new
        log.append(orjson.dumps(event))

    def replay():
        shard = Shard(0)
        shard.apply_record(0, {"op": "claim", "shard": 0, "epoch": 1, "node": "n1", "at": 999.0}, me="n2", now=0.0)
        for offset, raw in enumerate(log, start=1):
            shard.apply_record(offset, orjson.loads(raw), me="n2", now=0.0)
        shard.unpack_all()  # a follower keeps the compact standby form; promotion unpacks it
        return orjson.dumps(shard.sessions, option=orjson.OPT_SORT_KEYS)

    first, second = replay(), replay()
    assert first == second
    assert first == orjson.dumps(live, option=orjson.OPT_SORT_KEYS)
