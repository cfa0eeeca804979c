"""What a session handler reads from a request (``HandlerRequest``), and the httptools
fronts' implementation of it (``FastRequest``).

The node's handlers (node/handlers.py) are called by two fronts: its aiohttp app, with an
aiohttp ``web.Request``, and its httptools front, with a ``FastRequest`` built from the
parsed bytes without any aiohttp object. Both satisfy ``HandlerRequest``; mypy checks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol
from urllib.parse import parse_qsl

from aiohttp import web

from stickystate.http.connection import Incoming
from stickystate.http.wire import Header


class RequestHeaders(Protocol):
    """Case-insensitive header lookup, first value (as aiohttp's CIMultiDictProxy)."""

    def get(self, name: str, /) -> str | None: ...

    def getall(self, name: str, default: list[str], /) -> list[str]: ...


class HandlerRequest(Protocol):
    @property
    def method(self) -> str: ...

    @property
    def path_qs(self) -> str: ...

    @property
    def headers(self) -> RequestHeaders: ...

    @property
    def match_info(self) -> Mapping[str, str]: ...

    @property
    def query(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes: ...


class RawHeaders:
    """The request's header pairs as ``RequestHeaders`` (values decoded as aiohttp does)."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[Header]) -> None:
        self._pairs = pairs

    def get(self, name: str, /) -> str | None:
        key = name.lower().encode()
        for n, v in self._pairs:
            if len(n) == len(key) and n.lower() == key:
                return v.decode("utf-8", "surrogateescape")
        return None

    def getall(self, name: str, default: list[str], /) -> list[str]:
        key = name.lower().encode()
        found = [v.decode("utf-8", "surrogateescape") for n, v in self._pairs if n.lower() == key]
        return found or default


class FastRequest:
    """A parsed request (``Incoming``) as a ``HandlerRequest``, without an aiohttp Request."""

    __slots__ = ("method", "path_qs", "headers", "match_info", "_query_string", "_query", "_body", "_max_body")

    def __init__(self, req: Incoming, params: dict[str, str], query: str, max_body_bytes: int) -> None:
        self.method = req.method.decode()
        self.path_qs = req.target.decode()
        self.headers = RawHeaders(req.headers)
        self.match_info = params
        self._query_string = query
        self._query: dict[str, str] | None = None
        self._body = req.body[0] if len(req.body) == 1 else b"".join(req.body)
        self._max_body = max_body_bytes

    @property
    def query(self) -> dict[str, str]:
        if self._query is None:
            q: dict[str, str] = {}
            for k, v in parse_qsl(self._query_string, keep_blank_values=True):
                q.setdefault(k, v)  # the first value, as MultiDict.get
            self._query = q
        return self._query

    async def read(self) -> bytes:
        # as aiohttp's Request.read() with client_max_size (the same exception, so the same 413)
        if len(self._body) > self._max_body:
            raise web.HTTPRequestEntityTooLarge(self._max_body, len(self._body))
        return self._body
