"""Session state operations: ``apply(state, op, now) -> (new_state, event)``.

Pure and deterministic: no I/O, no clock (``now`` is passed in), inputs never mutated
(copy-on-write along the changed path, so an old state object stays valid). The same
function applies a live write and replays a ``changes`` event: an event is the
operation plus the resulting version and the time it was applied, and
``apply(prev, event, event["at"])`` reproduces exactly the state the owner held.

A session is a plain dict::

    {"id": str, "version": int, "data": dict, "created_at": float, "updated_at": float,
     "ttl_s": float, "expires_at": float, "key_expiry": {key: unix_s}}

Operations (``op["op"]``): create, replace (creates if absent), patch (RFC 7386),
append (bounded list: keep the last ``max_len``), set_key (optional per-key ttl),
delete_key, delete, expire. Every write refreshes the sliding TTL.
"""

from __future__ import annotations

from typing import Any

from stickystate.errors import BadRequest, Conflict, NotFound

Session = dict[str, Any]
Op = dict[str, Any]

WRITE_OPS = frozenset({"create", "replace", "patch", "append", "set_key", "delete_key", "delete", "expire"})
# Fields of an event that are not part of the operation itself.
EVENT_META = ("sid", "ver", "at", "node", "epoch", "idem")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch. Returns a new value; ``target`` is not mutated."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def live_keys(session: Session, now: float) -> dict[str, Any]:
    """The session's data without keys whose own expiry has passed."""
    expiry = session["key_expiry"]
    data = session["data"]
    if not expiry:
        return data
    return {k: v for k, v in data.items() if k not in expiry or expiry[k] > now}


def _purge_keys(data: dict[str, Any], expiry: dict[str, float], now: float) -> tuple[dict[str, Any], dict[str, float]]:
    if not expiry or all(t > now for t in expiry.values()):
        return data, expiry
    dead = {k for k, t in expiry.items() if t <= now}
    return ({k: v for k, v in data.items() if k not in dead}, {k: t for k, t in expiry.items() if k not in dead})


def _new_session(sid: str, data: dict[str, Any], ttl_s: float, now: float) -> Session:
    return {
        "id": sid,
        "version": 1,
        "data": data,
        "created_at": now,
        "updated_at": now,
        "ttl_s": ttl_s,
        "expires_at": now + ttl_s,
        "key_expiry": {},
    }


def apply(state: Session | None, op: Op, now: float) -> tuple[Session | None, Op]:
    """Apply one operation. Returns the new state (None when deleted) and the event.

    Raises NotFound / Conflict / BadRequest when the operation does not fit the state;
    then nothing changed.
    """
    kind = op.get("op")
    sid = op["sid"]
    if kind not in WRITE_OPS:
        raise BadRequest(f"unknown operation {kind!r}", code="bad_operation")

    if kind == "create":
        if state is not None:
            raise Conflict(f"session {sid!r} exists", code="exists")
        new = _new_session(sid, op["data"], op["ttl_s"], now)
    elif kind == "replace" and state is None:
        new = _new_session(sid, op["data"], op["ttl_s"], now)
    else:
        if state is None:
            raise NotFound(f"session {sid!r} not found")
        if kind in ("delete", "expire"):
            return None, _event(op, state["version"] + 1, now)
        data, expiry = _purge_keys(state["data"], state["key_expiry"], now)
        if kind == "replace":
            data, expiry = op["data"], {}
        elif kind == "patch":
            data = merge_patch(data, op["patch"])
            expiry = {k: t for k, t in expiry.items() if k in data}
        elif kind == "append":
            data = _append(data, op["field"], op["items"], op.get("max_len"))
        elif kind == "set_key":
            data = {**data, op["key"]: op["value"]}
            expiry = dict(expiry)
            if op.get("ttl_s") is not None:
                expiry[op["key"]] = now + op["ttl_s"]
            else:
                expiry.pop(op["key"], None)
        elif kind == "delete_key":
            if op["key"] not in data:
                raise NotFound(f"key {op['key']!r} not found in session {sid!r}")
            data = {k: v for k, v in data.items() if k != op["key"]}
            expiry = {k: t for k, t in expiry.items() if k != op["key"]}
        new = {
            **state,
            "version": state["version"] + 1,
            "data": data,
            "key_expiry": expiry,
            "updated_at": now,
            "expires_at": now + state["ttl_s"],
        }
    return new, _event(op, new["version"], now)


def _append(data: dict[str, Any], field: str, items: list[Any], max_len: int | None) -> dict[str, Any]:
    current = data.get(field)
    if current is None:
        current = []
    elif not isinstance(current, list):
        raise BadRequest(f"field {field!r} is not a list", code="not_a_list")
    combined = current + items
    if max_len is not None and len(combined) > max_len:
        combined = combined[len(combined) - max_len :]
    return {**data, field: combined}


def _event(op: Op, version: int, now: float) -> Op:
    event = dict(op)
    event["ver"] = version
    event["at"] = now
    return event


def view(session: Session, now: float) -> dict[str, Any]:
    """The public shape of a session."""
    return {
        "id": session["id"],
        "version": session["version"],
        "data": live_keys(session, now),
        "expires_at": session["expires_at"],
    }
