"""Pure request validation helpers (node/validate.py)."""

import pytest

from stickystate.node.validate import prefers_minimal


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
