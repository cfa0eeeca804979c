"""Watching sessions (issue 13) on a real broker: resumes from memory and from the log,
resets when the history is gone, a watcher that never reads, limits, long-poll.

The module's cluster runs with small watch settings (ring of 4 changes, 20 buffered
changes per watcher, 3 watchers per session, 12 per node, a heartbeat every 0.5 s) so
that each limit is reached with a few requests. Acceptance 1 (failover) is in
tests/test_watch_failover.py."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from stickystate.local_cluster import LocalCluster, http_json
from stickystate.protocol import shard_of
from tests.helpers import end_offset, wait_until
from tests.watching import Event, sse, take

pytestmark = pytest.mark.kafka

PARTITIONS = 8
RETENTION_SHARD = 7  # the retention test deletes this shard's records: no other test uses it
BUFFER = 20


@pytest.fixture(scope="module")
def cluster_options() -> dict[str, Any]:
    return {"partitions": PARTITIONS,
            "node_env": {"STICKYSTATE_WATCH_RING_EVENTS": "4", "STICKYSTATE_WATCH_BUFFER_EVENTS": str(BUFFER),
                         "STICKYSTATE_WATCH_MAX_PER_SESSION": "3", "STICKYSTATE_WATCH_MAX_PER_NODE": "12",
                         "STICKYSTATE_WATCH_HEARTBEAT_S": "0.5"}}


def new_sid(prefix: str, shard: int | None = None, avoid: int | None = RETENTION_SHARD) -> str:
    while True:
        sid = f"{prefix}-{uuid.uuid4().hex[:8]}"
        s = shard_of(sid, PARTITIONS)
        if (shard is None or s == shard) and (avoid is None or s != avoid):
            return sid


def owner_url(cluster: LocalCluster, sid: str) -> str:
    return cluster.node_url(cluster.owner_of_shard(shard_of(sid, PARTITIONS)))


def watch_status(url: str) -> dict[str, Any]:
    code, body = http_json(url + "/internal/status")
    assert code == 200, body
    return body["watch"]  # type: ignore[no-any-return]


async def write(http: aiohttp.ClientSession, base: str, sid: str, item: Any, **headers: str) -> dict[str, Any]:
    async with http.post(f"{base}/v1/sessions/{sid}/lists/log", data=orjson.dumps({"items": [item]}),
                         headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body  # type: ignore[no-any-return]


async def create(http: aiohttp.ClientSession, base: str, sid: str) -> None:
    async with http.post(f"{base}/v1/sessions", data=orjson.dumps({"id": sid, "data": {"log": []}})) as resp:
        assert resp.status == 201, await resp.text()


def watch_url(base: str, sid: str, query: str = "") -> str:
    return f"{base}/v1/sessions/{sid}/watch{query}"


async def test_a_watch_streams_state_then_each_change_then_the_delete(cluster: LocalCluster) -> None:
    base = cluster.router_url
    sid = new_sid("w-basic")
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        async with http.get(watch_url(base, sid)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            first = await take(resp, 1)
            await write(http, base, sid, "a", Durability="log")
            await write(http, base, sid, "b")
            async with http.delete(f"{base}/v1/sessions/{sid}") as gone:
                assert gone.status == 204
            rest = await take(resp, 3)
            assert await resp.content.read() == b""  # the stream ends after the delete
    state, a, b, deleted = first + rest
    assert (state.kind, state.version, state.data["session"]["data"]) == ("state", 1, {"log": []})
    assert [ev.kind for ev in (a, b, deleted)] == ["change", "change", "deleted"]
    assert (a.version, a.data["prev_version"], a.data["data"]) == (2, 1, {"log": ["a"]})
    assert (b.version, b.data["prev_version"], b.data["data"]) == (3, 2, {"log": ["a", "b"]})
    assert a.data["event"]["op"] == "append" and a.data["event"]["items"] == ["a"] and a.data["event"]["sid"] == sid
    assert deleted.version == 4 and deleted.data["event"]["op"] == "delete"
    epochs = {ev.data["epoch"] for ev in (state, a, b, deleted)}
    assert len(epochs) == 1
    epoch = epochs.pop()
    assert all(ev.id.split(":")[:2] == [str(ev.version), str(epoch)] for ev in (state, a, b, deleted))


async def test_changes_only_leaves_the_data_out_and_comments_keep_the_stream_alive(cluster: LocalCluster) -> None:
    base = cluster.router_url
    sid = new_sid("w-co")
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        async with http.get(watch_url(base, sid, "?changes_only=1")) as resp:
            seen: list[Event | str] = []

            async def until_keepalive() -> None:
                async for item in sse(resp):
                    seen.append(item)
                    if item == ": keep-alive":
                        return

            await asyncio.wait_for(until_keepalive(), 10)
            await write(http, base, sid, "x")
            (change,) = await take(resp, 1)
    retry = [s for s in seen if isinstance(s, str) and s.startswith("retry:")]
    assert len(retry) == 1 and 1000 <= int(retry[0].split()[1]) <= 3000  # 2 s with +-50% jitter
    assert change.kind == "change" and change.version == 2 and "data" not in change.data
    assert change.data["event"]["items"] == ["x"]


async def test_resume_with_last_event_id_from_memory(cluster: LocalCluster) -> None:
    sid = new_sid("w-mem")
    node = owner_url(cluster, sid)
    async with aiohttp.ClientSession() as http:
        await create(http, node, sid)
        async with http.get(watch_url(node, sid)) as resp:
            await take(resp, 1)
            await write(http, node, sid, 1)
            (last,) = await take(resp, 1)
        # the connection dropped; two changes happen meanwhile (the ring holds 4)
        await write(http, node, sid, 2)
        await write(http, node, sid, 3)
        before = watch_status(node)["resumed"]
        async with http.get(watch_url(node, sid), headers={"Last-Event-ID": last.id}) as resp:
            got = await take(resp, 2)
            await write(http, node, sid, 4)
            got += await take(resp, 1)
        after = watch_status(node)["resumed"]
    assert [(ev.kind, ev.version) for ev in got] == [("change", 3), ("change", 4), ("change", 5)]
    assert got[-1].data["data"] == {"log": [1, 2, 3, 4]}
    assert after["memory"] == before["memory"] + 1 and after["log"] == before["log"]


async def test_resume_from_the_log_when_the_ring_no_longer_holds_the_changes(cluster: LocalCluster) -> None:
    base = cluster.router_url
    sid = new_sid("w-log")
    node = owner_url(cluster, sid)
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        async with http.get(watch_url(base, sid)) as resp:
            (state,) = await take(resp, 1)
        for i in range(10):  # more than the ring's 4, at both durabilities
            await write(http, base, sid, i, Durability="log" if i % 2 else "memory")
        before = watch_status(node)["resumed"]
        async with http.get(watch_url(base, sid), headers={"Last-Event-ID": state.id}) as resp:
            got = await take(resp, 10)
        after = watch_status(node)["resumed"]
    assert [(ev.kind, ev.version) for ev in got] == [("change", v) for v in range(2, 12)]
    assert [ev.data["data"]["log"] for ev in got] == [list(range(i + 1)) for i in range(10)]
    assert after["log"] == before["log"] + 1


async def test_resumes_of_many_sessions_of_a_shard_share_one_scan_of_its_partition(cluster: LocalCluster) -> None:
    """After a failover every watcher of a shard resumes on the new owner from the log (its
    rings start empty). One partition scan per resuming session, one at a time, queued for
    minutes under repeated failovers (chaos sigstop: ~80 streams open but silent for good);
    the resumes of one shard waiting together share one scan, each getting its own changes."""
    shard = next(s for s in range(PARTITIONS) if s != RETENTION_SHARD)
    sids = [new_sid("w-many", shard=shard) for _ in range(8)]
    node = owner_url(cluster, sids[0])
    async with aiohttp.ClientSession() as http:
        for sid in sids:
            await create(http, node, sid)
            for i in range(3):
                await write(http, node, sid, f"{sid}/{i}", Durability="log" if i % 2 else "memory")
        before = watch_status(node)

        async def resume(sid: str) -> list[Event]:
            # never watched on this node: no ring, the changes after version 1 come from the log
            async with http.get(watch_url(node, sid), headers={"Last-Event-ID": "1"}) as resp:
                assert resp.status == 200, await resp.text()
                return await take(resp, 3)

        got = await asyncio.gather(*(resume(sid) for sid in sids))
        after = watch_status(node)
    for sid, events in zip(sids, got):
        assert [(ev.kind, ev.version) for ev in events] == [("change", 2), ("change", 3), ("change", 4)], sid
        assert events[-1].data["data"] == {"log": [f"{sid}/{i}" for i in range(3)]}
    assert after["resumed"]["log"] == before["resumed"]["log"] + len(sids)
    scans = after["log_reads"] - before["log_reads"]
    assert scans <= len(sids) // 2, f"{scans} partition scans for {len(sids)} concurrent resumes of one shard"


async def test_after_version_resumes_too_and_a_version_from_the_future_is_a_reset(cluster: LocalCluster) -> None:
    base = cluster.router_url
    sid = new_sid("w-after")
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        for i in range(3):
            await write(http, base, sid, i)
        async with http.get(watch_url(base, sid, "?after_version=2")) as resp:
            got = await take(resp, 2)
        async with http.get(watch_url(base, sid, "?after_version=99")) as resp:
            (reset,) = await take(resp, 1)
        async with http.get(watch_url(base, sid, "?after_version=0")) as resp:
            everything = await take(resp, 4)
    assert [(ev.kind, ev.version) for ev in got] == [("change", 3), ("change", 4)]
    assert [(ev.kind, ev.version, ev.data["event"]["op"]) for ev in everything] == \
        [("change", 1, "create"), ("change", 2, "append"), ("change", 3, "append"), ("change", 4, "append")]
    assert everything[-1].data["data"] == {"log": [0, 1, 2]}
    assert (reset.kind, reset.version, reset.data["cause"]) == ("reset", 4, "unknown_version")
    assert reset.data["session"]["data"] == {"log": [0, 1, 2]}


async def test_a_deleted_and_recreated_session_is_a_reset_not_a_silent_skip(cluster: LocalCluster) -> None:
    base = cluster.router_url
    sid = new_sid("w-life")
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        for i in range(3):
            await write(http, base, sid, i)
        async with http.get(watch_url(base, sid)) as resp:
            (old,) = await take(resp, 1)  # version 4 of the first lifetime
        async with http.delete(f"{base}/v1/sessions/{sid}") as resp:
            assert resp.status == 204
        await create(http, base, sid)
        for i in range(5):
            await write(http, base, sid, f"new-{i}")  # version 6 of the second: past the old position
        async with http.get(watch_url(base, sid), headers={"Last-Event-ID": old.id}) as resp:
            (reset,) = await take(resp, 1)
    assert (reset.kind, reset.data["cause"], reset.version) == ("reset", "lifetime", 6)
    assert reset.data["session"]["data"] == {"log": [f"new-{i}" for i in range(5)]}


async def test_reset_when_retention_removed_the_history(cluster: LocalCluster) -> None:
    """The ring no longer holds the changes and Kafka deleted them (delete-records, as
    retention does): the resume is a reset with the full state, then changes follow."""
    base = cluster.router_url
    sid = new_sid("w-ret", shard=RETENTION_SHARD, avoid=None)
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        async with http.get(watch_url(base, sid)) as resp:
            (state,) = await take(resp, 1)
        for i in range(8):
            await write(http, base, sid, i, Durability="log")
        end = await end_offset(cluster.kafka_bootstrap, cluster.topic, RETENTION_SHARD)
        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_records({TopicPartition(cluster.topic, RETENTION_SHARD): RecordsToDelete(end)})
        finally:
            await admin.close()
        async with http.get(watch_url(base, sid), headers={"Last-Event-ID": state.id}) as resp:
            (reset,) = await take(resp, 1)
            await write(http, base, sid, "after")
            (change,) = await take(resp, 1)
    assert (reset.kind, reset.data["cause"], reset.version) == ("reset", "history_gone", 9)
    assert reset.data["session"]["data"] == {"log": list(range(8))}
    assert (change.kind, change.version, change.data["data"]["log"][-1]) == ("change", 10, "after")


async def test_the_routers_clients_of_a_session_share_one_owner_stream_and_each_gets_every_change_once(
        cluster: LocalCluster) -> None:
    """Through the router, the watchers of a session (and ``changes_only``) are served from one
    stream of the owner's (router/streams.py): each client's own stream gives its first frames
    and then goes quiet (muted; still counted against the limits), and every later change
    reaches every client once and in order, whenever and however it joined."""
    sid = new_sid("w-shared")
    node, base = owner_url(cluster, sid), cluster.router_url
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        for i in range(3):
            await write(http, base, sid, i)  # versions 2-4
        streams = []
        try:
            a = await http.get(watch_url(base, sid))
            streams.append(a)
            (state,) = await take(a, 1)
            assert (state.kind, state.version) == ("state", 4)
            for i in range(3, 5):
                await write(http, base, sid, i)  # 5-6: A gets them from the shared stream
            # B resumes after version 4 (the owner's ring holds 5 and 6), C watches changes only
            b = await http.get(watch_url(base, sid), headers={"Last-Event-ID": state.id})
            c = await http.get(watch_url(base, sid, "?changes_only=1"))
            streams += [b, c]
            assert b.status == c.status == 200
            await wait_until(lambda: watch_status(node)["muted"] == 3, 10, "the three clients' own streams to go quiet")
            status = watch_status(node)
            # one shared stream per changes_only, not counted; the clients' own streams are
            assert (status["shared"], status["watchers"]) == (2, 3), status
            for i in range(5, 15):
                await write(http, base, sid, i)  # 7-16
            got_a = await take(a, 12)
            got_b = await take(b, 12)
            got_c = await take(c, 11)
        finally:
            for resp in streams:
                resp.close()
    assert [(e.kind, e.version) for e in got_a] == [("change", v) for v in range(5, 17)]
    assert [(e.kind, e.version) for e in got_b] == [("change", v) for v in range(5, 17)]
    assert [e.data["data"]["log"][-1] for e in got_a[-3:]] == [12, 13, 14]
    assert [(e.kind, e.version) for e in got_c] == [("state", 6)] + [("change", v) for v in range(7, 17)]
    assert all("data" not in e.data for e in got_c[1:])
    await wait_until(lambda: watch_status(node)["shared"] == 0, 10, "the shared streams to end with their last client")


async def test_clients_joining_a_shared_stream_while_changes_pour_in_miss_none_and_see_none_twice(
        cluster: LocalCluster) -> None:
    """The splice of a client onto the router's shared stream under load: appends go on back
    to back until every client has joined (one after another: fresh, resuming after a version
    the first one saw, fresh); each client's versions run from its first frame to the last
    change without a gap or a repeat."""
    sid = new_sid("w-join")
    base = cluster.router_url
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        seen: dict[int, list[tuple[str, int]]] = {0: [], 1: [], 2: []}
        first_frame = [asyncio.Event() for _ in range(3)]
        streams: list[aiohttp.ClientResponse] = []

        async def writer() -> int:
            n = 0
            while n < 60 or not first_frame[2].is_set():  # at least 60, and until the last client is in
                await write(http, base, sid, n)
                n += 1
            return n + 1  # the last version

        async def client(n: int, last_id: str | None) -> None:
            resp = await http.get(watch_url(base, sid), headers={"Last-Event-ID": last_id} if last_id else {})
            streams.append(resp)
            assert resp.status == 200, await resp.text()
            async for ev in sse(resp):
                if isinstance(ev, Event):
                    seen[n].append((ev.kind, ev.version))
                    first_frame[n].set()

        writing = asyncio.create_task(writer())
        reading = []
        try:
            for n in range(3):  # the module's limit: 3 watchers per session
                if n:  # each joins once the one before has seen a few changes (the appends go on)
                    await wait_until(lambda: len(seen[n - 1]) >= 3, 15, "a few changes")
                resume = f"{seen[0][1][1]}" if n == 1 else None  # a version the first one saw
                reading.append(asyncio.create_task(client(n, resume)))
                await asyncio.wait_for(first_frame[n].wait(), 15)
            last = await asyncio.wait_for(writing, 60)
            await wait_until(lambda: all(got and got[-1][1] == last for got in seen.values()), 15,
                             "every client to get the last change")
        finally:
            for task in (writing, *reading):
                task.cancel()
            for resp in streams:
                resp.close()
    for n, got in seen.items():
        versions = [v for _, v in got]
        assert versions == list(range(versions[0], last + 1)), (n, got[:3], versions)
        assert got[0][0] in ("state", "change", "reset") and all(k == "change" for k, _ in got[1:]), (n, got[:3])
    # the later two joined while the appends went on: their first frame is mid-stream
    assert all(1 < seen[n][0][1] < last for n in (1, 2)), {n: got[:2] for n, got in seen.items()}


@pytest.mark.parametrize("via", ["owner", "router"])
async def test_a_watcher_that_never_reads_does_not_slow_the_owner(cluster: LocalCluster, via: str) -> None:
    """Straight to the owner: its bounded buffer overflows into a reset, sent when the watcher
    reads again. Through the router: the router serves the session's watchers from one shared
    stream of the owner's, which one client may not hold back, so it ends the stuck client's
    stream (router/streams.py) and keeps no backlog; the client resumes after the last change
    it got. Either way the owner answers everything else on time."""
    sid = new_sid("w-stuck-" + via)
    node = owner_url(cluster, sid)
    host, port = (node if via == "owner" else cluster.router_url).removeprefix("http://").split(":")
    async with aiohttp.ClientSession() as http:
        await create(http, node, sid)
        before = watch_status(node)
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect((host, int(port)))
        try:
            stuck.sendall(f"GET /v1/sessions/{sid}/watch HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await wait_until(lambda: watch_status(node)["watchers"] > before["watchers"], 10, "the watch to be open")
            big = "x" * 16_000
            slowest = 0.0
            # ~48 KB of data per change event: far more than the socket buffers (through the
            # router, two connections' worth, autotuned on loopback: up to ~10 MB)
            for i in range(300 if via == "owner" else 600):
                started = time.monotonic()
                async with http.post(f"{node}/v1/sessions/{sid}/lists/log",
                                     data=orjson.dumps({"items": [f"{i}{big}"], "max_len": 3})) as resp:
                    assert resp.status == 200
                    await resp.read()
                slowest = max(slowest, time.monotonic() - started)
                async with http.get(f"{node}/v1/sessions/{sid}/meta") as resp:
                    assert resp.status == 200  # other requests are answered too
            status = watch_status(node)
            # the owner never waited for the watcher: every write was answered, none held up
            assert slowest < 5.0, slowest
            assert status["buffer_peak"] <= status["buffer_limit"] == BUFFER, status
            stuck.setblocking(False)
            received = b""
            deadline = time.monotonic() + 20
            loop = asyncio.get_running_loop()
            if via == "owner":
                assert status["resets"].get("overflow", 0) >= 1, status
                # once it reads, the watcher is told with a reset carrying the state as it is then
                while b'"cause":"overflow"' not in received:
                    assert time.monotonic() < deadline, received[-300:]
                    try:
                        chunk = await loop.sock_recv(stuck, 1 << 20)
                    except BlockingIOError:
                        chunk = b""
                    assert chunk != b"" or time.monotonic() < deadline
                    received += chunk
            else:
                # the router ended the stream: what it had taken, then the end
                while True:
                    assert time.monotonic() < deadline, received[-300:]
                    try:
                        chunk = await loop.sock_recv(stuck, 1 << 20)
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
                        continue
                    if not chunk:
                        break
                    received += chunk
                await wait_until(lambda: (watch_status(node)["watchers"], watch_status(node)["shared"])
                                 == (before["watchers"], before["shared"]), 10, "the owner to drop its streams")
        finally:
            stuck.close()
        head, body = received.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        if via == "router":
            ids = [line[4:].decode() for line in body.split(b"\n") if line.startswith(b"id: ")]
            versions = [int(i.split(":")[0]) for i in ids]
            assert versions[0] == 1 and versions == list(range(1, len(versions) + 1)), versions[-5:]
            assert len(versions) < 601  # it did not get everything: its stream was ended
            # it resumes after the last change it got: the next one (from the log), or a reset
            async with http.get(watch_url(cluster.router_url, sid), headers={"Last-Event-ID": ids[-1]}) as resp:
                (first,) = await take(resp, 1)
            assert (first.kind, first.version) in (("change", versions[-1] + 1), ("reset", 601)), first


async def test_watcher_limits_per_session_429_and_per_node_503(cluster: LocalCluster) -> None:
    base = cluster.router_url
    sid = new_sid("w-lim")
    node_id = cluster.owner_of_shard(shard_of(sid, PARTITIONS))
    node = cluster.node_url(node_id)
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        open_streams = []
        try:
            for _ in range(3):
                resp = await http.get(watch_url(base, sid))
                open_streams.append(resp)
                assert resp.status == 200
                await take(resp, 1)
            async with http.get(watch_url(base, sid)) as refused:
                body = await refused.json()
                assert refused.status == 429, body
                assert body["error"] == "too_many_watchers" and int(refused.headers["Retry-After"]) >= 1
            # other sessions of the same node, up to its 12 watchers
            others = []
            while len(others) < 9:
                other = new_sid("w-lim-other")
                if cluster.owner_of_shard(shard_of(other, PARTITIONS)) == node_id:
                    others.append(other)
                    await create(http, node, other)
            before = watch_status(node)["watchers"]
            for other in others[: 12 - before]:
                resp = await http.get(watch_url(node, other))
                open_streams.append(resp)
                assert resp.status == 200
                await take(resp, 1)
            async with http.get(watch_url(node, others[-1])) as refused:
                body = await refused.json()
                assert refused.status == 503, body
                assert body["error"] == "too_many_watchers" and int(refused.headers["Retry-After"]) >= 1
        finally:
            for resp in open_streams:
                resp.close()
        await wait_until(lambda: watch_status(node)["watchers"] == 0, 10, "the watchers to be gone")


async def test_bad_watch_requests_are_400_and_a_missing_session_404(cluster: LocalCluster) -> None:
    base = cluster.router_url
    sid = new_sid("w-bad")
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        for query, headers, code in (("", {"Last-Event-ID": "abc"}, "bad_last_event_id"),
                                     ("", {"Last-Event-ID": "1:2"}, "bad_last_event_id"),
                                     ("?after_version=-1", {}, "bad_query"),
                                     ("?after_version=x", {}, "bad_query"),
                                     ("?changes_only=2", {}, "bad_query")):
            async with http.get(watch_url(base, sid, query), headers=headers) as resp:
                body = await resp.json()
                assert (resp.status, body["error"]) == (400, code), (query, headers, body)
        async with http.get(watch_url(base, new_sid("w-none"))) as resp:
            assert resp.status == 404 and (await resp.json())["error"] == "not_found"
        assert watch_status(owner_url(cluster, sid))["watchers"] == 0


async def test_long_poll_answers_on_a_change_or_304_after_the_wait(cluster: LocalCluster) -> None:
    base = cluster.router_url
    sid = new_sid("w-poll")
    url = f"{base}/v1/sessions/{sid}"
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        async with http.get(url + "?wait_s=0.3", headers={"If-None-Match": '"1"'}) as resp:
            assert resp.status == 304 and resp.headers["ETag"] == '"1"'
            assert await resp.read() == b""
        async with http.get(url + "?wait_s=5", headers={"If-None-Match": '"0"'}) as resp:
            assert resp.status == 200 and (await resp.json())["version"] == 1  # not the version held: at once
        poll = asyncio.ensure_future(http.get(url + "?wait_s=20", headers={"If-None-Match": '"1"'}))
        started = time.monotonic()
        await write(http, base, sid, "moved")
        resp = await poll
        async with resp:
            body = await resp.json()
        assert resp.status == 200 and body["version"] == 2 and body["data"]["log"] == ["moved"]
        assert time.monotonic() - started < 15  # answered by the change, not by the wait running out
        for query, headers, code in (("?wait_s=-1", {"If-None-Match": '"1"'}, "bad_query"),
                                     ("?wait_s=26", {"If-None-Match": '"1"'}, "bad_query"),
                                     ("?wait_s=abc", {}, "bad_query"),
                                     ("?wait_s=1", {"If-None-Match": "nope"}, "bad_if_none_match")):
            async with http.get(url + query, headers=headers) as resp:
                body = await resp.json()
                assert (resp.status, body["error"]) == (400, code), (query, body)
        async with http.get(f"{base}/v1/sessions/{new_sid('w-none')}?wait_s=1",
                            headers={"If-None-Match": '"1"'}) as resp:
            assert resp.status == 404


def test_the_sync_client_yields_state_changes_and_the_delete_then_stops(cluster: LocalCluster) -> None:
    from stickystate.client import Client

    sid = new_sid("w-cli")
    with Client(cluster.router_url) as client:
        client.create(sid, {"log": []})
        events = client.watch(sid)
        first = next(events)
        client.append(sid, "log", ["a"])
        second = next(events)
        client.delete(sid)
        rest = list(events)  # ends by itself after the delete
    assert (first.kind, first.version, first.session_data) == ("state", 1, {"log": []})
    assert (second.kind, second.version, second.session_data) == ("change", 2, {"log": ["a"]})
    assert [(ev.kind, ev.version) for ev in rest] == [("deleted", 3)]


async def test_the_async_client_resumes_after_an_event_id_and_surfaces_resets(cluster: LocalCluster) -> None:
    from stickystate.client import AsyncClient, NotFound

    sid = new_sid("w-acli")
    async with AsyncClient(cluster.router_url) as client:
        await client.create(sid, {"log": []})
        stream = client.watch(sid, changes_only=True)
        state = await anext(stream)
        await client.append(sid, "log", [1])
        change = await anext(stream)
        await stream.aclose()
        await client.append(sid, "log", [2])
        resumed = client.watch(sid, last_event_id=change.id)
        again = await anext(resumed)
        await resumed.aclose()
        reset_stream = client.watch(sid, last_event_id="99")
        reset = await anext(reset_stream)
        await reset_stream.aclose()
        with pytest.raises(NotFound):
            await anext(client.watch(new_sid("w-acli-none")))
    assert (state.kind, change.kind, change.version, change.session_data) == ("state", "change", 2, None)
    assert (again.kind, again.version, again.session_data) == ("change", 3, {"log": [1, 2]})
    assert (reset.kind, reset.data["cause"], reset.version) == ("reset", "unknown_version", 3)


async def test_a_position_whose_version_a_later_epoch_wrote_is_a_reset(cluster: LocalCluster) -> None:
    """What a watcher holds after a lost `memory` write: version v as sent by the owner of
    epoch E-1, while this owner's v was written at epoch E. Same version, other content:
    a reset (cause `epoch`), never a resume. The same version as of epoch E resumes."""
    base = cluster.router_url
    sid = new_sid("w-epoch")
    async with aiohttp.ClientSession() as http:
        await create(http, base, sid)
        await write(http, base, sid, "a")
        await write(http, base, sid, "b")
        async with http.get(watch_url(base, sid)) as resp:
            (state,) = await take(resp, 1)
        version, epoch, life = (int(p) for p in state.id.split(":"))
        assert version == 3 and epoch == state.data["epoch"] >= 1
        async with http.get(watch_url(base, sid), headers={"Last-Event-ID": f"2:{epoch - 1}:{life}"}) as resp:
            (reset,) = await take(resp, 1)
        async with http.get(watch_url(base, sid), headers={"Last-Event-ID": f"2:{epoch}:{life}"}) as resp:
            (change,) = await take(resp, 1)
    assert (reset.kind, reset.data["cause"], reset.version) == ("reset", "epoch", 3)
    assert (change.kind, change.version, change.data["data"]) == ("change", 3, {"log": ["a", "b"]})
