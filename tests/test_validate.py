"""Pure request validation helpers (node/validate.py)."""

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stickystate.node.ops import _append
from stickystate.node.validate import appended_size, prefers_minimal


@pytest.mark.parametrize("headers,minimal", [
    ([], False),
    (["return=minimal"], True),
    (["Return=Minimal"], True),
    (['return="minimal"'], True),
    (["return = minimal"], True),  # RFC 7240 allows whitespace around "=" (BWS)
    (["respond-async, return=minimal; foo=bar"], True),
    (["respond-async", "return=minimal"], True),  # several Prefer headers
    (["return=representation"], False),
    (["return=representation, return=minimal"], False),  # only the first "return" counts
    (["return=minimal", "return=representation"], True),
    (["return"], False),
    (["return=bogus"], False),
    (["handling=strict"], False),
    (["returns=minimal"], False),
    ([""], False),
])
def test_prefer_return_minimal(headers: list[str], minimal: bool) -> None:
    assert prefers_minimal(headers) is minimal


# -- appended_size: a window's JSON size from the items added and dropped ---------------------

_json = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@settings(max_examples=400, deadline=None)
@given(data=st.dictionaries(st.sampled_from(["a", "m", "é", "k\"q"]), _json, max_size=3),
       field=st.sampled_from(["m", "new", "é"]),
       old=st.none() | st.lists(_json, max_size=6),
       items=st.lists(_json, min_size=1, max_size=4),
       max_len=st.none() | st.integers(0, 7))
def test_appended_size_is_the_size_of_the_whole_state_encoded(data: dict, field: str, old: list | None,
                                                              items: list, max_len: int | None) -> None:
    """node/writes.py trusts it instead of encoding the state: it must equal len(orjson.dumps())
    exactly, whether the field existed, the list was empty, and the window cut old items
    only or new ones too."""
    if old is not None:
        data = {**data, field: old}
    else:
        data = {k: v for k, v in data.items() if k != field}
    new = _append(data, field, items, max_len)
    assert appended_size(data, len(orjson.dumps(data)), new, field, items) == len(orjson.dumps(new))
