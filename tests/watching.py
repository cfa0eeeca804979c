"""Test helpers for watches: an SSE reader over aiohttp, and a device that watches a
session and resumes by itself (as an EventSource would), recording what it saw."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass
class Event:
    kind: str
    id: str
    data: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.data["version"])


async def sse(resp: aiohttp.ClientResponse) -> AsyncIterator[Event | str]:
    """The events of an SSE answer as they come; comment lines as strings."""
    kind, eid, data = "message", "", []
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield Event(kind, eid, orjson.loads("\n".join(data)))
            kind, data = "message", []
            continue
        if line.startswith(":"):
            yield line
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            kind = value
        elif name == "id":
            eid = value
        elif name == "data":
            data.append(value)
        elif name == "retry":
            yield f"retry: {value}"


async def take(resp: aiohttp.ClientResponse, n: int, timeout_s: float = 15.0) -> list[Event]:
    """The next ``n`` events of a stream (comments skipped), or fail after ``timeout_s``."""
    out: list[Event] = []
    stream = sse(resp)

    async def collect() -> None:
        async for ev in stream:
            if isinstance(ev, Event):
                out.append(ev)
                if len(out) == n:
                    return

    await asyncio.wait_for(collect(), timeout_s)
    return out


@dataclass
class Device:
    """Watches ``sid`` at ``base`` until stopped, resuming with Last-Event-ID after every end."""

    http: aiohttp.ClientSession
    base: str
    sid: str
    headers: dict[str, str] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    streams: int = 0  # streams opened
    refused: list[int] = field(default_factory=list)  # statuses of failed opens
    last_id: str | None = None

    @property
    def data(self) -> Any:
        """The session's data as this device knows it."""
        for ev in reversed(self.events):
            if ev.kind in ("state", "reset"):
                return ev.data["session"]["data"]
            if ev.kind == "change":
                return ev.data["data"]
        return None

    @property
    def version(self) -> int:
        return self.events[-1].version if self.events else 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            headers = dict(self.headers)
            if self.last_id is not None:
                headers["Last-Event-ID"] = self.last_id
            try:
                async with self.http.get(f"{self.base}/v1/sessions/{self.sid}/watch", headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as resp:
                    if resp.status != 200:
                        self.refused.append(resp.status)
                        await resp.read()
                    else:
                        self.streams += 1
                        async for ev in sse(resp):
                            if isinstance(ev, Event):
                                self.events.append(ev)
                                self.last_id = ev.id
                            if stop.is_set():
                                return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if not stop.is_set():
                await asyncio.sleep(0.05)  # reconnect pacing (as an EventSource's retry), not a synchronisation
