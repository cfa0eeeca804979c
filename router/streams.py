"""Streams through the router: a watch (``GET /v1/sessions/{id}/watch``, the routes of
the route table marked ``stream``) is piped to the client as the owner writes it, never
buffered (router/forward.py buffers whole answers, so that a retry is always possible),
its changes from a stream the session's clients share (below).

The pipe is spliced at the protocol level (``_Upstream``): the owner connection's
``data_received`` writes each chunk to the client's transport, so a watch costs the router
no task switch per event; the pump's task wakes only when the client falls behind (the
router then stops reading the owner until the client drains: the backlog builds up on the
owner, whose bounded buffer turns it into a ``reset``) or when the stream ends.

Opening is retried like any request (router/forward.py ``Forwarder``): on a connection
error, a node declared dead, or a 421, on the shard's next owner. An answer other than
200 (404, 429, 503, ...) is relayed whole. Once the owner's 200 head is in, bytes are
piped until the owner ends the stream (the shard moved, the session went, the node is
stopping), the connection breaks (the owner died), or the router declares the node dead
(missed health checks: a paused owner). The router then ends the client's stream too:
it does not carry a stream over to the new owner itself. The client resumes with the
last ``id:`` it received as ``Last-Event-ID`` (SSE clients do so by themselves), and
the new owner sends the changes after it, or ``reset`` (node/watch.py).

A watch's changes are shared (``_Shared``): the router keeps one stream per session (and
``changes_only``) from its owner, opened without a position and not counted against the
owner's watcher limits, and writes each change from it to every client of the session, so
N clients cost one read per change here and one write on the owner instead of N each. A
client's start still comes from the owner: its own stream (its ``state``, the changes
after its Last-Event-ID from the ring or the log, or a ``reset``), asked to go quiet after
those first frames (``X-Stickystate-Watch-Muted``: ``: muted``, then only keep-alives and
its end; the owner still counts it against the limits, and ends it when the shard moves).
The shared stream's changes that arrive meanwhile wait (``_Member.pending``), and at
``: muted`` the client is sent those after its last version, then every later one. The
shared stream is open (its ``state`` read) before the client's own stream is asked for,
so every change after the client's first frames is in one or the other, and the version
filter drops what is in both. A client that does not keep up cannot hold the shared stream
back: when its connection is over its high-water mark its stream ends, and it resumes
with its Last-Event-ID. A ``reset`` on the shared stream (the owner's buffer for the router
overflowed) ends every client's stream the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from stickystate.http.stream import StreamSink, Streaming
from stickystate.http.wire import Header, Reply
from stickystate.protocol import MUTED_FRAME, WATCH_MUTED_HEADER
from stickystate.router.cluster import Cluster, NodeView
from stickystate.router.forward import Attempts, Outgoing
from stickystate.router.metrics import RouterMetrics
from stickystate.router.settings import RouterSettings

log = logging.getLogger("stickystate.router")

MAX_HEAD = 64 * 1024  # an owner's answer head larger than this is refused (ValueError)
MAX_PENDING = 1024  # a client's changes waiting for its own first frames to end; past it, its stream ends
_MUTED_LINE = f"{WATCH_MUTED_HEADER}: 1\r\n".encode()

# A shared watch: (node id, tenant, path, changes_only)
SharedKey = tuple[str, str, bytes, bool]


def _frames(buf: bytearray, data: bytes) -> list[bytes]:
    """The complete SSE frames in ``buf`` + ``data`` (each with its blank line); the rest stays
    in ``buf``. The owner's frames never hold a blank line inside (JSON data on one line)."""
    buf += data
    end = buf.rfind(b"\n\n")
    if end < 0:
        return []
    chunk = bytes(buf[:end])
    del buf[:end + 2]
    return [f + b"\n\n" for f in chunk.split(b"\n\n")]


def _version(frame: bytes) -> int:
    """``id: <version>:<epoch>:<life>`` (or a bare version) -> the version."""
    end = frame.find(b"\n", 4)
    ident = frame[4:end]
    colon = ident.find(b":")
    return int(ident if colon < 0 else ident[:colon])


def _kind(frame: bytes) -> bytes:
    at = frame.find(b"\nevent: ")
    if at < 0:
        return b""
    return frame[at + 8:frame.find(b"\n", at + 8)]


class _Waits:
    """What a stream's pump waits on: ``changed()`` returns at the next ``wake()``."""

    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def changed(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class _Upstream(asyncio.Protocol, _Waits):
    """The owner's side of a piped stream. Until ``attach`` it collects what the owner
    sends (the answer's head, a refusal's body); after it, every chunk goes straight from
    ``data_received`` to the client's connection: no task switch and no future per chunk
    (the pump's task wakes only when the client falls behind or the stream ends). When
    the client's buffer is over its high-water mark, the owner is not read until it drains."""

    def __init__(self) -> None:
        _Waits.__init__(self)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.sink: StreamSink | None = None
        self.ended = False  # the owner's connection closed (or broke)
        self.blocked = False  # reading paused until the client drains

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            self.buf += data
            self.wake()
            return
        sink.send(data)
        if sink.paused and not self.blocked and self.transport is not None:
            self.blocked = True
            self.transport.pause_reading()
            self.wake()

    def eof_received(self) -> bool:
        return False  # the transport closes: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.wake()

    async def head(self) -> bytes:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if self.ended:
                raise asyncio.IncompleteReadError(bytes(self.buf), None)
            if len(self.buf) > MAX_HEAD:
                raise ValueError("answer head too large")
            await self.changed()
        head = bytes(self.buf[:end + 4])
        del self.buf[:end + 4]
        return head

    async def body(self, length: int | None) -> bytes:
        """A refusal's body: ``length`` bytes, or (no Content-Length) up to the end."""
        while not self.ended and (length is None or len(self.buf) < length):
            await self.changed()
        if length is not None and len(self.buf) < length:
            raise asyncio.IncompleteReadError(bytes(self.buf), length)
        return bytes(self.buf if length is None else self.buf[:length])

    def attach(self, sink: StreamSink) -> None:
        """From here on, the owner's bytes go straight to ``sink`` (what came with the head first)."""
        self.sink = sink
        if self.buf:
            rest, self.buf = bytes(self.buf), bytearray()
            self.data_received(rest)

    def unblock(self) -> None:
        if self.blocked and self.transport is not None and not self.ended:
            self.blocked = False
            self.transport.resume_reading()


class _Member(_Waits):
    """One client of a shared watch. Until its own stream (from the owner, muted after the
    first frames) says ``: muted``, the shared stream's changes wait in ``pending``; then those
    after the client's last version are sent, and every later one as it comes."""

    __slots__ = ("sink", "last", "pending", "ended")

    def __init__(self) -> None:
        super().__init__()
        self.sink: StreamSink | None = None
        self.last = -1  # the last version the client was sent
        self.pending: list[tuple[int, bytes]] | None = []  # None: live on the shared stream
        self.ended = False

    def feed(self, items: list[tuple[int, bytes]]) -> None:
        """The shared stream's frames: (version, frame), version -1 for a comment."""
        pending = self.pending
        if pending is not None:
            pending.extend(item for item in items if item[0] >= 0)
            if len(pending) > MAX_PENDING:
                self.end()
            return
        sink = self.sink
        if sink is None or self.ended:
            return
        if sink.paused:
            # The client does not keep up, and one client may not hold the shared stream
            # back: its stream ends, it resumes with its Last-Event-ID (the changes after it
            # from the owner's ring or the log, or a reset).
            self.end()
            return
        last = self.last
        out = []
        for version, frame in items:
            if version < 0:
                out.append(frame)
            elif version > last:
                out.append(frame)
                last = version
        self.last = last
        if out:
            sink.send(b"".join(out))

    def go_live(self) -> None:
        """The client's own first frames are all out: what the shared stream brought since it
        joined, after the client's last version, and from now on everything."""
        pending, self.pending = self.pending or [], None
        self.feed(pending)

    def end(self) -> None:
        self.ended = True
        self.wake()


class _Own(_Upstream):
    """A member's own stream from the owner: its first frames go to the client (the last
    version noted), up to ``: muted``; after that the owner sends only keep-alives, which
    are dropped, and its end, which ends the member."""

    def __init__(self, member: _Member) -> None:
        super().__init__()
        self.member = member
        self.fbuf = bytearray()

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        member = self.member
        if sink is None:
            super().data_received(data)
            return
        if member.pending is None:
            return  # live: the changes come from the shared stream
        out = []
        muted = False
        for frame in _frames(self.fbuf, data):
            if frame == MUTED_FRAME:
                muted = True
                break
            if frame.startswith(b"id: "):
                member.last = _version(frame)
            out.append(frame)
        if out:
            sink.send(b"".join(out))
        if muted:
            self.fbuf.clear()
            member.go_live()
        elif sink.paused and not self.blocked and self.transport is not None:
            self.blocked = True
            self.transport.pause_reading()
            member.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.member.end()


class _Shared(asyncio.Protocol):
    """One watch stream from a session's owner, shared by the router's clients of that
    session (and ``changes_only``): each change is read once and written to every client
    (``_Member.feed``), instead of one owner connection per client. It is opened without a
    position (the owner's first frame is the ``state``, which no client gets: each has its own
    first frames), and ends when the owner ends it, when its connection breaks, when the
    node is declared dead, on a ``reset`` (the owner could not keep up with the router: every
    client resumes) or when its last client leaves; its clients' streams end with it."""

    def __init__(self, forwarder: StreamForwarder, key: SharedKey, node: NodeView) -> None:
        self.forwarder = forwarder
        self.key = key
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.head: bytearray | None = bytearray()  # None once the owner's 200 head is in
        self.fbuf = bytearray()
        self.opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()  # True: the state is in
        self.members: set[_Member] = set()
        self.ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.node.down.add_done_callback(self._declared_dead)

    def _declared_dead(self, _: Any) -> None:
        self.close()

    def data_received(self, data: bytes) -> None:
        head = self.head
        if head is not None:
            head += data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > MAX_HEAD:
                    self.close()
                return
            if not head.startswith(b"HTTP/1.1 200"):
                self.close()  # the session is gone, a limit, not the owner: no sharing
                return
            data = bytes(head[end + 4:])
            self.head = None
        items: list[tuple[int, bytes]] = []
        for frame in _frames(self.fbuf, data):
            if frame.startswith(b"id: "):
                kind = _kind(frame)
                if kind == b"state":
                    if not self.opened.done():
                        self.opened.set_result(True)
                    continue
                if kind == b"reset":
                    self.close()
                    return
                items.append((_version(frame), frame))
            elif frame.startswith(b":"):
                items.append((-1, frame))
        if items:
            for member in list(self.members):
                member.feed(items)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.node.down.remove_done_callback(self._declared_dead)
        if not self.opened.done():
            self.opened.set_result(False)
        self.forwarder.forget(self)
        for member in list(self.members):
            member.end()

    def leave(self, member: _Member) -> None:
        self.members.discard(member)
        if not self.members:
            self.close()

    def close(self) -> None:
        """End it; from now on a new client of the session opens a new one."""
        self.ended = True
        self.forwarder.forget(self)
        if self.transport is not None:
            self.transport.close()
        elif not self.opened.done():
            self.opened.set_result(False)


class StreamForwarder:
    def __init__(self, settings: RouterSettings, cluster: Cluster, metrics: RouterMetrics,
                 internal_lines: bytes) -> None:
        self.settings = settings
        self.cluster = cluster
        self.metrics = metrics
        self.internal_lines = internal_lines
        self.open_streams = 0
        self._shared: dict[SharedKey, _Shared] = {}

    @property
    def shared_streams(self) -> int:
        return len(self._shared)

    def forget(self, shared: _Shared) -> None:
        if self._shared.get(shared.key) is shared:
            del self._shared[shared.key]

    async def open(self, out: Outgoing, share: tuple[tuple[str, bytes, bool], bytes] | None = None) -> Reply | Streaming:
        """Open a stream on the shard's owner. ``share``: a watch that may be served from the
        stream the router shares among the clients of that session (its key: tenant, path,
        changes_only; and that stream's request head, without Host)."""
        tries = Attempts(self.settings, self.cluster, self.metrics, out.shard)
        while True:
            node = await tries.next()
            if isinstance(node, Reply):
                return node
            try:
                if share is not None:
                    opened = await self._open_member(node, out, tries.attempt, (node.id, *share[0]), share[1])
                else:
                    opened = await self._open(node, out, tries.attempt)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                await tries.unreachable(node, f"stream: {exc!r}")
                continue
            except asyncio.TimeoutError:
                tries.last_error = f"node {node.id}: timed out"
                continue
            if opened is None:
                await tries.misrouted(node)  # 421, or declared dead meanwhile
                continue
            return opened

    async def _shared_for(self, node: NodeView, key: SharedKey, head: bytes) -> _Shared | None:
        """The open shared stream of ``key`` (opened now if there is none); None if the owner
        would not open it."""
        shared = self._shared.get(key)
        if shared is None or shared.ended:
            shared = self._shared[key] = _Shared(self, key, node)
            url = urlsplit(node.url)
            try:
                transport, _ = await asyncio.wait_for(
                    asyncio.get_running_loop().create_connection(
                        lambda: shared, url.hostname or "127.0.0.1", url.port or 80,
                        ssl=True if url.scheme == "https" else None), self.settings.request_timeout_s)
            except BaseException:
                self.forget(shared)
                shared.ended = True
                if not shared.opened.done():
                    shared.opened.set_result(False)
                raise
            transport.write(head + f"Host: {url.netloc}\r\n\r\n".encode())
        try:
            ok = await asyncio.wait_for(asyncio.shield(shared.opened), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            shared.close()
            return None
        return shared if ok and not shared.ended else None

    async def _open_member(self, node: NodeView, out: Outgoing, attempt: int, key: SharedKey,
                           head: bytes) -> Reply | Streaming | None:
        """A watch served from the shared stream of its session: the client's own stream from
        the owner (muted after its first frames) for its start, then the shared stream's
        changes. If the owner will not open the shared stream, a plain piped stream."""
        shared = await self._shared_for(node, key, head)
        if shared is None:
            return await self._open(node, out, attempt)
        member = _Member()
        shared.members.add(member)  # from here on, its changes wait in member.pending
        try:
            opened = await self._open(node, out, attempt, lambda: _Own(member), _MUTED_LINE,
                                      lambda: shared.leave(member))
        except BaseException:
            shared.leave(member)
            raise
        if not isinstance(opened, Streaming):
            shared.leave(member)
        return opened

    async def _open(self, node: NodeView, out: Outgoing, attempt: int,
                    protocol: Callable[[], _Upstream] = _Upstream, extra: bytes = b"",
                    on_end: Callable[[], None] | None = None) -> Reply | Streaming | None:
        url = urlsplit(node.url)
        timeout = self.settings.request_timeout_s
        loop = asyncio.get_running_loop()
        transport, up = await asyncio.wait_for(
            loop.create_connection(protocol, url.hostname or "127.0.0.1", url.port or 80,
                                   ssl=True if url.scheme == "https" else None), timeout)
        try:
            transport.write(b"".join((out.head, extra, f"Host: {url.netloc}\r\n".encode(), out.tail, out.body)))
            head_read = asyncio.ensure_future(up.head())
            racing: set[asyncio.Future[Any]] = {head_read, node.down}
            done, _ = await asyncio.wait(racing, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if head_read not in done:
                head_read.cancel()
                if not node.down.done():
                    raise asyncio.TimeoutError
                transport.close()
                return None
            status, reason, headers = _parse_head(head_read.result())
            if status == 421:
                transport.close()
                return None
            if attempt:
                headers.append((b"X-Stickystate-Retries", str(attempt).encode()))
            if status != 200:
                length = next((int(v) for n, v in headers if n.lower() == b"content-length"), None)
                body = await asyncio.wait_for(up.body(length), timeout)
                transport.close()
                return Reply(status, reason, headers, body)
        except BaseException:
            transport.close()
            raise
        down = node.down

        async def pump(sink: StreamSink) -> None:
            """Ends when the owner ends the stream or its connection breaks, when the router
            declares the node dead (the client resumes elsewhere), or (cancelled) when the
            client goes."""
            self.open_streams += 1
            declared_dead = lambda _: transport.close()  # noqa: E731 - connection_lost ends the loop below
            down.add_done_callback(declared_dead)
            member = up.member if isinstance(up, _Own) else None
            try:
                if member is not None:
                    member.sink = sink
                up.attach(sink)
                while not up.ended and (member is None or not member.ended):
                    if up.blocked:
                        await sink.drain()
                        up.unblock()
                        continue
                    await (up.changed() if member is None else member.changed())
            finally:
                down.remove_done_callback(declared_dead)
                self.open_streams -= 1
                transport.close()
                if on_end is not None:
                    on_end()

        def discard() -> None:
            transport.close()
            if on_end is not None:
                on_end()

        streaming = Streaming(200, headers, pump)
        streaming.discard = discard
        return streaming


def _parse_head(raw: bytes) -> tuple[int, bytes, list[Header]]:
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    headers: list[Header] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("bad header line")
        lname = name.strip().lower()
        if lname in (b"connection", b"keep-alive"):
            continue
        headers.append((name.strip(), value.strip()))
    return int(parts[1]), parts[2] if len(parts) > 2 else b"", headers
