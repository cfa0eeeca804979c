"""``AsyncClient``: the client on aiohttp (one ``ClientSession``, keep-alive pools per node
and router). Every decision (where a call goes, what an answer means, when to retry) is
made by ``stickystate.client.core``; this module moves bytes and sleeps."""

from __future__ import annotations

import asyncio
import copy
import inspect
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp

from stickystate.client.core import Call, ClientCore, Response, RetryPolicy, Target, raise_for
from stickystate.client.errors import PreconditionFailed
from stickystate.client.watch import READ_TIMEOUT_S, SseParser, WatchCursor, WatchEvent

_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class AsyncClient:
    """``AsyncClient("http://router:8100", api_key=...)``, or from ``STICKYSTATE_URL`` and
    ``STICKYSTATE_API_KEY``. Use it as ``async with``, or call ``close()``.

    ``direct`` (default True): session calls go straight to the owning node (the router's
    shard map, refreshed on a 421 or a failure); False: everything through the router.
    ``durability`` and ``minimal`` are the defaults of every write (``None``: the
    server's default durability); each write may override them.
    """

    def __init__(self, urls: str | Sequence[str] | None = None, api_key: str | None = None, *,
                 direct: bool = True, durability: str | None = None, minimal: bool = False,
                 retry: RetryPolicy | None = None, max_connections_per_host: int = 64,
                 map_max_age_s: float = 30.0, rng: random.Random | None = None) -> None:
        self._core = ClientCore(urls, api_key, direct=direct, durability=durability, minimal=minimal,
                                retry=retry or RetryPolicy(), map_max_age_s=map_max_age_s, rng=rng)
        self._max_per_host = max_connections_per_host
        self._http: aiohttp.ClientSession | None = None
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def core(self) -> ClientCore:
        return self._core

    # -- lifecycle ----------------------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=self._max_per_host, keepalive_timeout=30),
                skip_auto_headers=("User-Agent", "Content-Type"), auto_decompress=False)
        return self._http

    async def close(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            try:
                await self._refreshing
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing: its outcome no longer matters
                pass
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- the API ------------------------------------------------------------------------------
    async def create(self, sid: str | None = None, data: Mapping[str, Any] | None = None, *,
                     ttl_s: float | None = None, **opts: Any) -> dict[str, Any]:
        """Create a session (``sid`` made here if None, 128 random bits); 409 ``Conflict`` if it exists."""
        return await self._json(self._core.create(sid, data, ttl_s, **opts))

    async def get(self, sid: str) -> dict[str, Any]:
        return await self._json(self._core.get(sid))

    async def meta(self, sid: str) -> dict[str, Any]:
        return await self._json(self._core.meta(sid))

    async def replace(self, sid: str, data: Mapping[str, Any], *, ttl_s: float | None = None,
                      **opts: Any) -> dict[str, Any]:
        return await self._json(self._core.replace(sid, data, ttl_s, **opts))

    async def patch(self, sid: str, patch: Mapping[str, Any], **opts: Any) -> dict[str, Any]:
        return await self._json(self._core.patch(sid, patch, **opts))

    async def append(self, sid: str, field: str, items: Sequence[Any], max_len: int | None = None,
                     **opts: Any) -> dict[str, Any]:
        return await self._json(self._core.append(sid, field, items, max_len, **opts))

    async def set_key(self, sid: str, key: str, value: Any, ttl_s: float | None = None,
                      **opts: Any) -> dict[str, Any]:
        return await self._json(self._core.set_key(sid, key, value, ttl_s, **opts))

    async def delete_key(self, sid: str, key: str, **opts: Any) -> dict[str, Any]:
        return await self._json(self._core.delete_key(sid, key, **opts))

    async def delete(self, sid: str, **opts: Any) -> None:
        await self._run(self._core.delete(sid, **opts))

    async def history(self, sid: str, *, after: int = -1, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every change event of the session, oldest first, page after page."""
        while True:
            page = await self._json(self._core.history(sid, after, page_size))
            for event in page["events"]:
                yield event
            if page.get("next_after") is None:
                return
            after = int(page["next_after"])

    async def watch(self, sid: str, *, changes_only: bool = False,
                    last_event_id: str | None = None) -> AsyncIterator[WatchEvent]:
        """The session's changes as they happen (``GET /v1/sessions/{id}/watch``): ``state``
        first (or, with ``last_event_id``, what followed it), then a ``change`` per change;
        a ``reset`` when the server cannot give the changes after a position exactly; ends
        after ``deleted``/``expired``. When a stream ends otherwise (failover, handoff), it
        reopens by itself with the last event's id, after the server's ``retry:``. Stop
        with ``break`` (or ``aclose()``)."""
        cursor = WatchCursor(last_event_id)
        while not cursor.done:
            resp = await self._open_stream(self._core.watch(sid, cursor.last_id, changes_only))
            cursor.streams += 1
            parser = SseParser()
            try:
                async for chunk in resp.content.iter_any():
                    for event in parser.feed(chunk):
                        cursor.seen(event)
                        yield event
                    if cursor.done:
                        break
            except _TRANSPORT_ERRORS:
                pass  # the stream broke: resume
            finally:
                resp.close()
            if not cursor.done:
                await asyncio.sleep(cursor.reconnect_delay_s(parser))

    async def _open_stream(self, call: Call) -> aiohttp.ClientResponse:
        """A 200 stream for ``call``, with the same attempts as any call (421s, failover)."""
        core = self._core
        if core.map_wanted(time.monotonic()):
            await self._refresh()
        attempts = core.attempts(call, time.monotonic())
        while True:
            target = attempts.target()
            attempts.sent()
            try:
                resp = await self._session().request(
                    call.method, target.base + call.path, headers=call.headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=attempts.timeout_s(time.monotonic()),
                                                  sock_read=READ_TIMEOUT_S))
                if resp.status == 200:
                    return resp
                async with resp:
                    body = await resp.read()
                step = attempts.answered(target, Response(resp.status, resp.headers, body), time.monotonic())
            except _TRANSPORT_ERRORS as exc:
                step = attempts.failed(target, exc, time.monotonic())
            if step.done:
                raise_for(step)
                raise AssertionError("unreachable: a stream opens with 200 only")
            if step.refresh:
                await self._refresh()
            if step.delay_s > 0:
                await asyncio.sleep(step.delay_s)

    async def cluster(self) -> dict[str, Any]:
        """A router's ``/v1/cluster`` (and the client's map is refreshed from it)."""
        doc: dict[str, Any] = await self._json(self._core.map_call())
        self._core.set_map(doc, time.monotonic())
        return doc

    async def update(self, sid: str, fn: Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]],
                     **opts: Any) -> dict[str, Any]:
        """Read the session, ``fn(data)`` -> the new data, write it with If-Match; on a 412
        (someone wrote in between) read and apply again, at most
        ``RetryPolicy.max_update_attempts`` times, with a jittered backoff from the third
        round on (``RetryPolicy.update_pause_s``)."""
        error: PreconditionFailed | None = None
        core = self._core
        for lost in range(core.retry.max_update_attempts):
            if pause := core.retry.update_pause_s(lost, core.rng):
                await asyncio.sleep(pause)
            current = await self.get(sid)
            new = fn(copy.deepcopy(current["data"]))
            if inspect.isawaitable(new):
                new = await new
            try:
                return await self.replace(sid, new, if_match=current["version"], **opts)
            except PreconditionFailed as exc:
                error = exc
        assert error is not None
        raise error

    # -- attempts -----------------------------------------------------------------------------
    async def _json(self, call: Call) -> Any:
        return self._core.result(await self._run(call))

    async def _run(self, call: Call) -> Response:
        core = self._core
        if call.sid is not None and core.map_wanted(time.monotonic()):
            await self._refresh()
        attempts = core.attempts(call, time.monotonic())
        while True:
            target = attempts.target()
            attempts.sent()
            try:
                response = await self._send(target, call, attempts.timeout_s(time.monotonic()))
                step = attempts.answered(target, response, time.monotonic())
            except _TRANSPORT_ERRORS as exc:
                step = attempts.failed(target, exc, time.monotonic())
            if step.done:
                result: Response = raise_for(step)
                return result
            if step.refresh:
                await self._refresh()
            if step.delay_s > 0:
                await asyncio.sleep(step.delay_s)

    async def _send(self, target: Target, call: Call, timeout_s: float) -> Response:
        async with self._session().request(call.method, target.base + call.path, data=call.body,
                                           headers=call.headers, allow_redirects=False,
                                           timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return Response(resp.status, resp.headers, await resp.read())

    async def _refresh(self) -> None:
        """One map refresh at a time; concurrent callers wait for the one under way."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._fetch_map())
        await asyncio.shield(self._refreshing)

    async def _fetch_map(self) -> None:
        core = self._core
        call = core.map_call()
        for _ in range(len(core.routers)):
            base = core.router
            try:
                response = await self._send(Target(base, None), call, core.retry.request_timeout_s)
            except _TRANSPORT_ERRORS:
                core.router_failed(base)
                continue
            if core.map_answered(base, response, time.monotonic()):
                return
        # no router answered: keep the map we have; the call's own attempts decide
