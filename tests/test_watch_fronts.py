"""Both of a node's fronts stream a watch the same way (no Kafka: replication off): the
fast front (node/fastpath.py, stickystate/http/stream.py) and the aiohttp app
(``--fast-path off``, node/http.py). The stream's frames, HEAD, and the watcher freed when
the client goes away; without a log, a resume past the ring is a reset, never a gap."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from stickystate.node.server import running
from stickystate.node.settings import NodeSettings
from stickystate.node.watch import WatchLimits
from stickystate.replicator.settings import ReplicatorSettings
from tests.watching import take

PARTITIONS = 4


async def serve_every_shard(node: Any) -> None:
    """Assign every shard to the one node and wait until it serves them all (no Kafka:
    recovery is immediate, each wait is on the shard's own recovery event)."""
    await node.store.assign(1, {s: "n1" for s in range(PARTITIONS)}, {})
    deadline = time.monotonic() + 10
    while len(node.store.serving) < PARTITIONS:
        assert time.monotonic() < deadline, "shards not served"
        await node.store.recovering[next(iter(node.store.recovering))].wait()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-front", "aiohttp"])
async def test_a_front_streams_the_watch_and_frees_the_watcher_when_the_client_goes(fast_path: bool) -> None:
    settings = NodeSettings(auth="open", port=0, fast_path=fast_path, replication=False,
                            replicator=ReplicatorSettings(partitions=PARTITIONS),
                            watch=WatchLimits(ring_events=2, heartbeat_s=0.5))
    async with running(settings) as node:
        await serve_every_shard(node)
        base = f"http://127.0.0.1:{node.port}"
        hub = node.store.watch
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", data=orjson.dumps({"id": "s1", "data": {"n": 0}})) as resp:
                assert resp.status == 201
            async with http.head(f"{base}/v1/sessions/s1/watch") as resp:
                assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
            assert hub.watchers == 0
            async with http.get(f"{base}/v1/sessions/s1/watch") as resp:
                assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
                (state,) = await take(resp, 1)
                assert hub.watchers == 1
                for n in (1, 2, 3):
                    async with http.patch(f"{base}/v1/sessions/s1", data=orjson.dumps({"n": n})) as w:
                        assert w.status == 200
                changes = await take(resp, 3)
            # the client went: the pump is cancelled and the watcher unsubscribed (the fast front
            # at once, aiohttp when its next frame, at the latest a heartbeat, finds the connection closed)
            deadline = time.monotonic() + 10
            while hub.watchers:
                assert time.monotonic() < deadline, "the watcher was not freed"
                async with http.get(f"{base}/livez") as live:
                    assert live.status == 200
            # the ring (2) still holds 3 and 4: a resume after 2 is exact, from memory
            async with http.get(f"{base}/v1/sessions/s1/watch", headers={"Last-Event-ID": changes[0].id}) as resp:
                resumed = await take(resp, 2)
            # no log to read (replication off): a resume past the ring is a reset
            async with http.get(f"{base}/v1/sessions/s1/watch", headers={"Last-Event-ID": state.id}) as resp:
                (reset,) = await take(resp, 1)
            # watched, then deleted before any change: the stream says so, then ends
            async with http.post(f"{base}/v1/sessions", data=orjson.dumps({"id": "s2"})) as resp:
                assert resp.status == 201
            async with http.get(f"{base}/v1/sessions/s2/watch") as resp:
                await take(resp, 1)
                async with http.delete(f"{base}/v1/sessions/s2") as gone:
                    assert gone.status == 204
                (deleted,) = await take(resp, 1)
                assert await resp.content.read() == b""
            # a session that expires: `expired`, then the end
            async with http.post(f"{base}/v1/sessions", data=orjson.dumps({"id": "s3", "ttl_s": 0.5})) as resp:
                assert resp.status == 201
            async with http.get(f"{base}/v1/sessions/s3/watch") as resp:
                (expired,) = (await take(resp, 2))[1:]
                assert await resp.content.read() == b""
            async with http.get(f"{base}/v1/sessions/nope/watch") as resp:
                assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    assert (state.kind, state.version) == ("state", 1)
    assert [(c.kind, c.version, c.data["data"]["n"]) for c in changes] == [("change", 2, 1), ("change", 3, 2),
                                                                         ("change", 4, 3)]
    assert [(c.kind, c.version) for c in resumed] == [("change", 3), ("change", 4)]
    assert (reset.kind, reset.data["cause"], reset.version) == ("reset", "history_gone", 4)
    assert hub.resumed["memory"] == 1
    assert (deleted.kind, deleted.version, deleted.data["event"]["op"]) == ("deleted", 2, "delete")
    assert (expired.kind, expired.version, expired.data["event"]["op"]) == ("expired", 2, "expire")


async def test_resumes_of_one_shard_share_a_log_read_that_has_not_begun() -> None:
    """node/watch.py SharedLogReads: a scan joins only the resumes that came before it began,
    those of every session of its shard (each gets its own session's trail)."""
    from stickystate.node.watch import SharedLogReads

    began: list[tuple[int, list[str]]] = []
    release = asyncio.Event()

    async def read(s: int, sids: list[str]) -> dict[str, list[dict[str, Any]]]:
        began.append((s, sids))
        await release.wait()
        return {sid: [{"read": len(began), "sid": sid}] for sid in sids}

    reads = SharedLogReads(read)
    first = asyncio.create_task(reads(0, "a"))
    while not began:
        await asyncio.sleep(0)
    # the first scan has begun: these wait for the next scan of shard 0, together
    waiting = [asyncio.create_task(reads(0, "a")) for _ in range(3)]
    same_shard = asyncio.create_task(reads(0, "c"))  # another session of shard 0: the same scan
    other = asyncio.create_task(reads(1, "b"))  # another shard: a scan of its own
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(first, *waiting, same_shard, other)
    assert results[0] == [{"read": 1, "sid": "a"}]
    assert results[1] == results[2] == results[3] and results[1] != results[0]
    assert results[4] == [{"read": results[1][0]["read"], "sid": "c"}]
    assert results[5][0]["sid"] == "b"
    assert began[0] == (0, ["a"]) and sorted(began[1:]) == [(0, ["a", "c"]), (1, ["b"])]
    assert (reads.reads, reads.shared) == (3, 3)


async def test_a_stream_waiting_for_the_log_keeps_its_keep_alives_and_ends_when_the_shard_moves() -> None:
    """node/watch_stream.py: a resume whose log read is queued (node/watch.py SharedLogReads)
    still sends a keep-alive every heartbeat (it used to send nothing at all until the read
    came back: a client's read timeout took it for dead), and ends when the shard moves."""
    from stickystate.node.watch_stream import Watch
    from stickystate.protocol import shard_of

    settings = NodeSettings(auth="open", port=0, replication=False,
                            replicator=ReplicatorSettings(partitions=PARTITIONS),
                            watch=WatchLimits(heartbeat_s=0.2))
    async with running(settings) as node:
        await serve_every_shard(node)
        base = f"http://127.0.0.1:{node.port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", data=orjson.dumps({"id": "s1", "data": {"n": 0}})) as resp:
                assert resp.status == 201
            for n in (1, 2):
                async with http.patch(f"{base}/v1/sessions/s1", data=orjson.dumps({"n": n})) as w:
                    assert w.status == 200
        never = asyncio.Event()

        async def queued(s: int, sid: str) -> list[dict[str, Any]]:
            await never.wait()  # behind other scans for as long as the test runs
            return []

        hub = node.store.watch
        shard = node.store.shards[shard_of("s1", PARTITIONS)]
        watch = Watch(hub, shard, "s1", "s1", True, node.store.clock, queued)
        watch.open((1, None, None))
        assert watch.from_log == 1  # the ring holds nothing: the changes after 1 are read from the log
        frames = watch.frames()
        try:
            assert (await asyncio.wait_for(anext(frames), 5)).startswith(b"retry:")
            for _ in range(2):
                assert await asyncio.wait_for(anext(frames), 5) == b": keep-alive\n\n"
            hub.shard_lost(shard.id)
            assert await asyncio.wait_for(anext(frames), 5) == b": end shard_moved\n\n"
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(anext(frames), 5)
        finally:
            await frames.aclose()
            watch.close()


def _hub_with_watcher(**limits: Any) -> tuple[Any, Any, Any]:
    from stickystate.node.watch import WatchHub, life_of

    hub = WatchHub(WatchLimits(**limits))
    state = {"created_at": 1.0, "version": 1, "data": {}, "key_expiry": {}}
    w, watcher = hub.subscribe(0, "s", life_of(state))
    return hub, w, watcher


def _change(hub: Any, version: int, text: str) -> None:
    event = {"sid": "s", "op": "set", "ver": version, "epoch": 1, "at": 1.0, "idem": "router-x", "args": {"t": text}}
    hub.changed(0, event, {"created_at": 1.0, "version": version, "data": {"t": text}, "key_expiry": {}})


def test_a_ring_keeps_its_changes_encoded_bounded_by_bytes_and_out_of_the_gc() -> None:
    """node/watch.py: a ring's changes are tuples of atomic values (the cyclic GC stops
    tracking them at its first pass: rings of slotted objects and their dicts made every
    full pass walk 300k objects per 400 watched sessions), and a ring keeps at most
    ring_bytes of them; the newest is kept even when it alone is larger."""
    import gc

    hub, w, watcher = _hub_with_watcher(ring_events=100, ring_bytes=4000)
    for v in range(2, 12):
        _change(hub, v, "x" * 400)  # ~870 bytes of JSON each (event + data)
    assert [c[0] for c in w.ring] == [8, 9, 10, 11] and w.ring_bytes <= 4000
    assert w.ring_bytes == sum(len(c[4]) + len(c[5]) for c in w.ring)
    gc.collect()
    assert not any(gc.is_tracked(c) for c in w.ring)
    assert orjson.loads(w.ring[-1][4]) == {"op": "set", "ver": 11, "epoch": 1, "at": 1.0, "args": {"t": "x" * 400}}
    _change(hub, 12, "y" * 9000)
    assert [c[0] for c in w.ring] == [12] and w.ring_bytes > 4000


def test_a_watchers_buffer_is_bounded_by_bytes_and_overflows_to_a_reset() -> None:
    hub, w, watcher = _hub_with_watcher(buffer_events=100, buffer_bytes=3000)
    _change(hub, 2, "x" * 5000)  # larger than the bound alone: still buffered (a change is never split)
    assert len(watcher.buffer) == 1 and not watcher.overflowed
    watcher.take()
    assert watcher.bytes == 0
    for v in (3, 4, 5):
        _change(hub, v, "x" * 400)  # ~870 bytes each
    assert len(watcher.buffer) == 3 and 0 < watcher.bytes <= 3000
    _change(hub, 6, "x" * 400)  # over 3000 bytes: dropped, the watcher gets a reset
    assert watcher.overflowed and not watcher.buffer and watcher.bytes == 0
    assert hub.resets["overflow"] == 1
