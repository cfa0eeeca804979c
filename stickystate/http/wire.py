"""What crosses the wire, as bytes: a complete answer (``Reply``), a session handler's
answer (``Answer``: JSON, rendered by either of a node's fronts), the JSON error answer
every front gives (``error_reply``), request ids, and ``render``: an answer framed for a
client connection. Pure: no I/O."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import Any, Protocol

import orjson

from stickystate.protocol import HOP_BY_HOP, JSON_CONTENT_TYPE, error_body

Header = tuple[bytes, bytes]
PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}
JSON_HEADER: Header = (b"Content-Type", JSON_CONTENT_TYPE.encode())


class Reply:
    """A complete answer: status, reason phrase, headers as received, and the body."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: bytes, headers: list[Header], body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


class Answer:
    """A session handler's answer, for either front to render: a JSON body (or none, 204)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes | None) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def json_answer(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, headers or {}, orjson.dumps(body))


def reply_of(answer: Answer, date: bytes) -> Reply:
    """An ``Answer`` as a ``Reply`` (with its JSON content type, and ``Date``)."""
    headers = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
    if answer.body is not None:
        headers.append(JSON_HEADER)
    headers.append((b"Date", date))
    return Reply(answer.status, PHRASES[answer.status], headers, answer.body or b"")


def error_reply(status: int, *, code: str, message: str, headers: Iterable[tuple[str, str]] = (),
                **extra: Any) -> Reply:
    """A front's own JSON error answer (``protocol.error_body``)."""
    hdrs = [JSON_HEADER]
    hdrs += [(k.encode(), v.encode()) for k, v in headers]
    return Reply(status, PHRASES[status], hdrs, error_body(code, message, **extra))


def new_request_id() -> bytes:
    """16 hex digits. Request ids tag log lines: a PRNG is enough (os.urandom per request
    was ~5% of the relay's CPU)."""
    return b"%016x" % random.getrandbits(64)


# Dropped from every answer relayed to a client: framing and connection management are
# this hop's own; X-Request-Id is re-added (the same value); no Server header (no version
# disclosure, fewer bytes).
_REPLY_DROPPED = frozenset(h.encode() for h in HOP_BY_HOP - {"date"} | {"x-request-id"})


class Framing(Protocol):
    """What ``render`` needs to know of the request it answers."""

    method: bytes
    keep_alive: bool
    http10: bool


def render(reply: Reply, req: Framing, request_id: bytes) -> Sequence[bytes]:
    """Status line, the reply's headers minus this hop's, the request id, framing, body."""
    status = reply.status
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reply.reason)]
    length = None
    for name, value in reply.headers:
        lname = name.lower()
        if lname in _REPLY_DROPPED:
            if lname == b"content-length":
                length = value
            continue
        out.append(name + b": " + value + b"\r\n")
    out.append(b"X-Request-Id: " + request_id + b"\r\n")
    body = reply.body
    if req.method == b"HEAD":
        if length is not None:
            out.append(b"Content-Length: " + length + b"\r\n")
        body = b""
    elif status >= 200 and status not in (204, 304):
        out.append(b"Content-Length: %d\r\n" % len(body))
    else:
        body = b""
    if not req.keep_alive:
        out.append(b"Connection: close\r\n")
    elif req.http10:
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return (b"".join(out), body) if body else (b"".join(out),)
