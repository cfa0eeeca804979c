"""Watching a session from the client, without I/O: the Server-Sent Events parser, the
events, and the cursor that knows where a stream resumes. ``Client.watch`` and
``AsyncClient.watch`` open the stream (with the same attempts as any call: a 421 followed,
a failure retried on the new owner or through a router), feed its bytes here, and when it
ends without the session having gone, reopen it with ``Last-Event-ID`` after the server's
``retry:`` (jittered by the server). The server sends every change after that position,
or a ``reset`` (yielded like any event, with its ``cause``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["SseParser", "WatchCursor", "WatchEvent"]

EVENT_STREAM = "text/event-stream"
READ_TIMEOUT_S = 60.0  # no byte (not even the heartbeat comment, every 15 s) for this long: reconnect


@dataclass(frozen=True)
class WatchEvent:
    """One event of a watch: ``kind`` is ``state``, ``change``, ``deleted``, ``expired`` or
    ``reset``; ``data`` its JSON (``epoch``, ``version``, and ``session``, or
    ``prev_version``, ``event`` and ``data``; ``cause`` on a reset); ``id`` the position
    to resume after it."""

    kind: str
    id: str
    data: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.data["version"])

    @property
    def epoch(self) -> int:
        return int(self.data["epoch"])

    @property
    def session_data(self) -> Any:
        """The session's data after this event (None after ``deleted``/``expired``, and for
        a ``change`` watched with ``changes_only``)."""
        if self.kind in ("state", "reset"):
            return self.data["session"]["data"]
        return self.data.get("data")


class SseParser:
    """Bytes in, events out (the SSE format: ``field: value`` lines, a blank line ends an
    event, ``:`` lines are comments)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._kind = "message"
        self._id = ""
        self._data: list[str] = []
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[WatchEvent]:
        self._buffer += chunk
        out: list[WatchEvent] = []
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                return out
            self._buffer = rest
            text = line.decode("utf-8", "replace").rstrip("\r")
            if not text:
                if self._data:
                    out.append(WatchEvent(self._kind, self._id, orjson.loads("\n".join(self._data))))
                self._kind, self._data = "message", []
                continue
            if text.startswith(":"):
                continue
            name, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                self._kind = value
            elif name == "id":
                self._id = value
            elif name == "data":
                self._data.append(value)
            elif name == "retry" and value.isdigit():
                self.retry_ms = int(value)


class WatchCursor:
    """Where a watch is: the last event id (resume there), whether the session went."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self.last_id = last_event_id
        self.done = False
        self.retry_ms = 1000
        self.streams = 0  # streams opened so far

    def seen(self, event: WatchEvent) -> None:
        if event.id:
            self.last_id = event.id
        if event.kind in ("deleted", "expired"):
            self.done = True

    def reconnect_delay_s(self, parser: SseParser | None) -> float:
        """Before reopening: the server's ``retry:`` (already jittered by the server)."""
        if parser is not None and parser.retry_ms is not None:
            self.retry_ms = parser.retry_ms
        return self.retry_ms / 1000.0
