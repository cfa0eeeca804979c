"""Request validation and limits, pure. Everything is checked before anything changes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from stickystate.errors import BadRequest, PayloadTooLarge, PreconditionFailed
from stickystate.protocol import (IDEMPOTENCY_KEY_MESSAGE, IDEMPOTENCY_KEY_RE, KEY_RE, SESSION_ID_MESSAGE,
                                  SESSION_ID_RE, key_message)

DURABILITIES = ("memory", "log")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_048_576
    max_state_bytes: int = 1_048_576
    max_list_len: int = 10_000
    max_depth: int = 32
    max_ttl_s: float = 30 * 86400.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_state_bytes", "max_list_len", "max_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def session_id(sid: str) -> str:
    if not SESSION_ID_RE.fullmatch(sid):
        raise BadRequest(SESSION_ID_MESSAGE, code="bad_id")
    return sid


def key_name(key: str, what: str = "key") -> str:
    if not KEY_RE.fullmatch(key):
        raise BadRequest(key_message(what), code="bad_key")
    return key


def parse_json(body: bytes, limits: Limits) -> Any:
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(f"body exceeds {limits.max_body_bytes} bytes", limit="max_body_bytes")
    if not body.strip():
        raise BadRequest("a JSON body is required", code="bad_json")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="bad_json") from None
    check_depth(value, limits.max_depth)
    return value


def check_depth(value: Any, max_depth: int) -> None:
    """Iterative, so a deep document cannot blow the Python stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise PayloadTooLarge(f"JSON nesting deeper than {max_depth}", limit="max_depth")
        stack.extend((c, depth + 1) for c in children)


def json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object", code="bad_operation")
    return value


# A JSON number (RFC 8259), as a query parameter's text: no Python-only spellings
# (``1_000``, ``inf``, ``nan``, surrounding spaces) that the spec's "number" excludes.
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def ttl(value: Any, limits: Limits, what: str = "ttl_s") -> float:
    """A TTL given as a JSON number: in (0, max_ttl_s]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= limits.max_ttl_s):
        raise BadRequest(f"{what} must be a number in (0, {limits.max_ttl_s}]", code="bad_ttl")
    return float(value)


def ttl_query(raw: str | None, limits: Limits, what: str = "ttl_s") -> float | None:
    """A TTL given as a query parameter (absent: None)."""
    if raw is None:
        return None
    if not _JSON_NUMBER.fullmatch(raw):
        raise BadRequest(f"{what} must be a number in (0, {limits.max_ttl_s}]", code="bad_ttl")
    return ttl(float(raw), limits, what)


def max_len(value: Any, limits: Limits) -> int:
    """A positive integer; a JSON number with no fractional part (``5.0``) is one too, as
    JSON Schema's ``integer`` says."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest("max_len must be a positive integer", code="bad_operation")
    if value > limits.max_list_len:
        raise PayloadTooLarge(f"max_len exceeds {limits.max_list_len}", limit="max_list_len")
    return value


def check_state(data: dict[str, Any], limits: Limits, appended_field: str | None = None,
                size: int | None = None) -> int:
    """Limits on a state about to be committed; returns its size in bytes (as JSON).
    ``size``: that size when the caller knows it (``appended_size``), else it is measured."""
    if appended_field is not None:
        lst = data.get(appended_field)
        if isinstance(lst, list) and len(lst) > limits.max_list_len:
            raise PayloadTooLarge(f"list {appended_field!r} would exceed {limits.max_list_len} items", limit="max_list_len")
    if size is None:
        size = len(orjson.dumps(data))
    if size > limits.max_state_bytes:
        raise PayloadTooLarge(f"session state would be {size} bytes, over {limits.max_state_bytes}", limit="max_state_bytes")
    return size


def appended_size(old_data: dict[str, Any], old_size: int, new_data: dict[str, Any], field: str,
                  items: list[Any]) -> int:
    """The JSON size of ``new_data`` when it is ``old_data`` (of JSON size ``old_size``) with
    ``items`` appended to the list at ``field`` and the list then cut from the front (a
    window), every other key unchanged: from the sizes of the items added and dropped, not
    by encoding the whole state again (a turn's window is ~15 KB: encoding it made
    ``store.write`` 2.3x slower on the benchmark's shape). orjson's output is compact, so a list's JSON is ``[``,
    its items' JSON joined by ``,`` and ``]``, and an item's JSON is the same inside it.
    """
    new_list = new_data[field]
    old_list = old_data.get(field)
    if old_list is None:  # a new key: ,"field":[...] (no comma in an empty object)
        return old_size + len(orjson.dumps(field)) + 1 + len(orjson.dumps(new_list)) + (1 if old_data else 0)
    dropped = len(old_list) + len(items) - len(new_list)  # cut from the front of old_list + items
    removed = sum(len(orjson.dumps(x)) for x in old_list[:dropped])
    added = sum(len(orjson.dumps(x)) for x in items[max(dropped - len(old_list), 0):])  # those kept
    commas = max(len(new_list) - 1, 0) - max(len(old_list) - 1, 0)
    return old_size + added - removed + commas


def durability(header: str | None, default: str) -> str:
    if header is None:
        return default
    value = header.strip()
    if value not in DURABILITIES:
        raise BadRequest("Durability must be 'memory' or 'log'", code="bad_durability")
    return value


def prefers_minimal(headers: list[str]) -> bool:
    """RFC 7240 ``Prefer`` header(s): True when the client asked for ``return=minimal``.

    Preferences are comma-separated, each ``token[=value]`` with optional ``;params``;
    names and the ``return`` value are compared case-insensitively and a value may be
    quoted. Only the first ``return`` counts (RFC 7240 section 2); anything this server
    does not understand is ignored, never an error (a preference is not a demand).
    """
    for header in headers:
        for pref in header.split(","):
            name, _, value = pref.split(";", 1)[0].partition("=")
            if name.strip().lower() == "return":
                return value.strip().strip('"').lower() == "minimal"
    return False


def if_match(header: str | None) -> int | str | None:
    """``"7"``, ``7``, ``W/"7"`` -> 7; ``*`` -> "*"; absent -> None."""
    if header is None:
        return None
    value = header.strip()
    if value == "*":
        return "*"
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"')
    if not (value.isascii() and value.isdigit()):
        raise BadRequest('If-Match must be "<version>" or *', code="bad_if_match")
    return int(value)


def check_precondition(expected: int | str | None, current_version: int | None) -> None:
    if expected is None:
        return
    if expected == "*":
        if current_version is None:
            raise PreconditionFailed("If-Match: * but the session does not exist", current=None)
        return
    if current_version != expected:
        raise PreconditionFailed(f"version is {current_version}, not {expected}", current=current_version)


def idempotency_key(header: str | None) -> str | None:
    if header is None:
        return None
    if not IDEMPOTENCY_KEY_RE.fullmatch(header):
        raise BadRequest(IDEMPOTENCY_KEY_MESSAGE, code="bad_idempotency_key")
    return header
