"""``Client``: the client on urllib3 (a ``PoolManager``: one keep-alive pool per node and
router, thread-safe). Every decision (where a call goes, what an answer means, when to
retry) is made by ``stickystate.client.core``; this module moves bytes and sleeps."""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import urllib3

from stickystate.client.core import Call, ClientCore, Response, RetryPolicy, Target, raise_for
from stickystate.client.errors import PreconditionFailed
from stickystate.client.watch import READ_TIMEOUT_S, SseParser, WatchCursor, WatchEvent

_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError)


class Client:
    """``Client("http://router:8100", api_key=...)``, or from ``STICKYSTATE_URL`` and
    ``STICKYSTATE_API_KEY``. Use it as ``with``, or call ``close()``. Safe to share
    between threads.

    ``direct`` (default True): session calls go straight to the owning node (the router's
    shard map, refreshed on a 421 or a failure); False: everything through the router.
    ``durability`` and ``minimal`` are the defaults of every write (``None``: the
    server's default durability); each write may override them.
    """

    def __init__(self, urls: str | Sequence[str] | None = None, api_key: str | None = None, *,
                 direct: bool = True, durability: str | None = None, minimal: bool = False,
                 retry: RetryPolicy | None = None, max_connections_per_host: int = 16,
                 map_max_age_s: float = 30.0, rng: random.Random | None = None) -> None:
        self._core = ClientCore(urls, api_key, direct=direct, durability=durability, minimal=minimal,
                                retry=retry or RetryPolicy(), map_max_age_s=map_max_age_s, rng=rng)
        self._http = urllib3.PoolManager(num_pools=64, maxsize=max_connections_per_host, block=False,
                                         retries=False)
        self._refresh_lock = threading.Lock()

    @property
    def core(self) -> ClientCore:
        return self._core

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        self._http.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the API ------------------------------------------------------------------------------
    def create(self, sid: str | None = None, data: Mapping[str, Any] | None = None, *,
               ttl_s: float | None = None, **opts: Any) -> dict[str, Any]:
        """Create a session (``sid`` made here if None, 128 random bits); 409 ``Conflict`` if it exists."""
        return self._json(self._core.create(sid, data, ttl_s, **opts))

    def get(self, sid: str) -> dict[str, Any]:
        return self._json(self._core.get(sid))

    def meta(self, sid: str) -> dict[str, Any]:
        return self._json(self._core.meta(sid))

    def replace(self, sid: str, data: Mapping[str, Any], *, ttl_s: float | None = None,
                **opts: Any) -> dict[str, Any]:
        return self._json(self._core.replace(sid, data, ttl_s, **opts))

    def patch(self, sid: str, patch: Mapping[str, Any], **opts: Any) -> dict[str, Any]:
        return self._json(self._core.patch(sid, patch, **opts))

    def append(self, sid: str, field: str, items: Sequence[Any], max_len: int | None = None,
               **opts: Any) -> dict[str, Any]:
        return self._json(self._core.append(sid, field, items, max_len, **opts))

    def set_key(self, sid: str, key: str, value: Any, ttl_s: float | None = None, **opts: Any) -> dict[str, Any]:
        return self._json(self._core.set_key(sid, key, value, ttl_s, **opts))

    def delete_key(self, sid: str, key: str, **opts: Any) -> dict[str, Any]:
        return self._json(self._core.delete_key(sid, key, **opts))

    def delete(self, sid: str, **opts: Any) -> None:
        self._run(self._core.delete(sid, **opts))

    def history(self, sid: str, *, after: int = -1, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every change event of the session, oldest first, page after page."""
        while True:
            page = self._json(self._core.history(sid, after, page_size))
            yield from page["events"]
            if page.get("next_after") is None:
                return
            after = int(page["next_after"])

    def watch(self, sid: str, *, changes_only: bool = False,
              last_event_id: str | None = None) -> Iterator[WatchEvent]:
        """The session's changes as they happen (``GET /v1/sessions/{id}/watch``): ``state``
        first (or, with ``last_event_id``, what followed it), then a ``change`` per change;
        a ``reset`` when the server cannot give the changes after a position exactly; ends
        after ``deleted``/``expired``. When a stream ends otherwise (failover, handoff), it
        reopens by itself with the last event's id, after the server's ``retry:``. Close
        the iterator (or break out of the loop) to stop."""
        cursor = WatchCursor(last_event_id)
        while not cursor.done:
            resp = self._open_stream(self._core.watch(sid, cursor.last_id, changes_only))
            cursor.streams += 1
            parser = SseParser()
            try:
                while not cursor.done:
                    chunk = resp.read1(65536)
                    if not chunk:
                        break
                    for event in parser.feed(chunk):
                        cursor.seen(event)
                        yield event
            except _TRANSPORT_ERRORS:
                pass  # the stream broke: resume
            finally:
                resp.close()
            if not cursor.done:
                time.sleep(cursor.reconnect_delay_s(parser))

    def _open_stream(self, call: Call) -> urllib3.BaseHTTPResponse:
        """A 200 stream for ``call``, with the same attempts as any call (421s, failover)."""
        core = self._core
        if core.map_wanted(time.monotonic()):
            self._refresh()
        attempts = core.attempts(call, time.monotonic())
        while True:
            target = attempts.target()
            attempts.sent()
            try:
                resp = self._http.request(
                    call.method, target.base + call.path, headers=call.headers, retries=False, redirect=False,
                    preload_content=False,
                    timeout=urllib3.Timeout(connect=attempts.timeout_s(time.monotonic()), read=READ_TIMEOUT_S))
                if resp.status == 200:
                    return resp
                body = resp.read()
                resp.release_conn()
                step = attempts.answered(target, Response(resp.status, resp.headers, body), time.monotonic())
            except _TRANSPORT_ERRORS as exc:
                step = attempts.failed(target, exc, time.monotonic())
            if step.done:
                raise_for(step)
                raise AssertionError("unreachable: a stream opens with 200 only")
            if step.refresh:
                self._refresh()
            if step.delay_s > 0:
                time.sleep(step.delay_s)

    def cluster(self) -> dict[str, Any]:
        """A router's ``/v1/cluster`` (and the client's map is refreshed from it)."""
        doc: dict[str, Any] = self._json(self._core.map_call())
        self._core.set_map(doc, time.monotonic())
        return doc

    def update(self, sid: str, fn: Callable[[dict[str, Any]], dict[str, Any]], **opts: Any) -> dict[str, Any]:
        """Read the session, ``fn(data)`` -> the new data, write it with If-Match; on a 412
        (someone wrote in between) read and apply again, at most
        ``RetryPolicy.max_update_attempts`` times, with a jittered backoff from the third
        round on (``RetryPolicy.update_pause_s``)."""
        error: PreconditionFailed | None = None
        core = self._core
        for lost in range(core.retry.max_update_attempts):
            if pause := core.retry.update_pause_s(lost, core.rng):
                time.sleep(pause)
            current = self.get(sid)
            try:
                return self.replace(sid, fn(copy.deepcopy(current["data"])), if_match=current["version"], **opts)
            except PreconditionFailed as exc:
                error = exc
        assert error is not None
        raise error

    # -- attempts -----------------------------------------------------------------------------
    def _json(self, call: Call) -> Any:
        return self._core.result(self._run(call))

    def _run(self, call: Call) -> Response:
        core = self._core
        if call.sid is not None and core.map_wanted(time.monotonic()):
            self._refresh()
        attempts = core.attempts(call, time.monotonic())
        while True:
            target = attempts.target()
            attempts.sent()
            try:
                response = self._send(target, call, attempts.timeout_s(time.monotonic()))
                step = attempts.answered(target, response, time.monotonic())
            except _TRANSPORT_ERRORS as exc:
                step = attempts.failed(target, exc, time.monotonic())
            if step.done:
                result: Response = raise_for(step)
                return result
            if step.refresh:
                self._refresh()
            if step.delay_s > 0:
                time.sleep(step.delay_s)

    def _send(self, target: Target, call: Call, timeout_s: float) -> Response:
        resp = self._http.request(call.method, target.base + call.path, body=call.body, headers=call.headers,
                                  retries=False, redirect=False, timeout=urllib3.Timeout(total=timeout_s))
        return Response(resp.status, resp.headers, resp.data)

    def _refresh(self) -> None:
        """One map refresh at a time; a thread that finds one under way waits for it."""
        if not self._refresh_lock.acquire(blocking=False):
            with self._refresh_lock:
                return
        try:
            core = self._core
            call = core.map_call()
            for _ in range(len(core.routers)):
                base = core.router
                try:
                    response = self._send(Target(base, None), call, core.retry.request_timeout_s)
                except _TRANSPORT_ERRORS:
                    core.router_failed(base)
                    continue
                if core.map_answered(base, response, time.monotonic()):
                    return
        finally:
            self._refresh_lock.release()
