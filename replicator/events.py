"""Event wire format of the ``changes`` topic, pure.

Record key: the session id (UTF-8), or ``#claim`` for ownership claims.
Record value: an orjson object. A change event is the operation (see node/ops.py) plus
``sid``, ``ver`` (the resulting version), ``at`` (unix seconds the owner applied it),
``node`` (writer) and ``epoch`` (the writer's ownership epoch of the shard); optional
``idem`` = [idempotency key, request fingerprint]. A claim is
``{"op": "claim", "shard", "epoch", "node", "at"}``.

This decoder is the only code the chaos checker shares with recovery.
"""

from __future__ import annotations

from typing import Any

import orjson

CLAIM_KEY = b"#claim"  # "#" never occurs in a session id: no session can collide with it
FORMAT_VERSION = 1


class BadEvent(ValueError):
    pass


def encode(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


def decode(value: bytes | None) -> dict[str, Any]:
    if value is None:
        raise BadEvent("tombstone in changes topic")
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadEvent(str(exc)) from None
    if not isinstance(event, dict) or "op" not in event:
        raise BadEvent("event is not an object with 'op'")
    return event


def claim(shard: int, epoch: int, node: str, at: float) -> dict[str, Any]:
    return {"op": "claim", "shard": shard, "epoch": epoch, "node": node, "at": at}


def is_claim(event: dict[str, Any]) -> bool:
    return event.get("op") == "claim"
