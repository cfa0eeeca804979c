"""Issue 13, acceptance 1: two devices, through the router, on a real broker. Device B
watches a session while device A sends 500 appends at mixed durability; meanwhile the
owner is killed with -9 and a node joins and takes the session's shard over. B's versions
strictly increase apart from announced resets, every version after B's last reset is
there, and B's final data is A's final read."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable

import aiohttp
import orjson
import pytest

from stickystate.client import AsyncClient, Client, WatchEvent
from stickystate.local_cluster import LocalCluster
from stickystate.protocol import shard_of
from stickystate.router.placement import Placement
from tests.helpers import wait_until
from tests.watching import Device, take

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 8
APPENDS = 500


def session_moved_by_the_join() -> tuple[str, str]:
    """An id whose owner among n1, n2 is killed, and whose shard the joining n3 then takes
    from the survivor (placement is pure: computed here as the router will)."""
    for i in range(1000):
        sid = f"conv-{i}"
        s = shard_of(sid, PARTITIONS)
        first = Placement(("n1", "n2"), PARTITIONS, 1).owner(s)
        survivor = "n2" if first == "n1" else "n1"
        if Placement((survivor, "n3"), PARTITIONS, 1).owner(s) == "n3":
            return sid, str(first)
    raise AssertionError("no such id")


async def write_one_more(http: aiohttp.ClientSession, base: str, sid: str) -> None:
    async with http.patch(f"{base}/v1/sessions/{sid}", data=orjson.dumps({"done": True})) as resp:
        assert resp.status == 200


async def append(http: aiohttp.ClientSession, base: str, sid: str, i: int) -> None:
    """One append of device A, retried with its Idempotency-Key until it is acknowledged."""
    deadline = time.monotonic() + 60
    while True:
        try:
            async with http.post(f"{base}/v1/sessions/{sid}/lists/turns", data=orjson.dumps({"items": [i]}),
                                 headers={"Durability": "log" if i % 2 else "memory",
                                          "Idempotency-Key": f"turn-{i}"}) as resp:
                await resp.read()
                if resp.status == 200:
                    return
                assert resp.status == 503, resp.status
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, f"append {i} not acknowledged in 60 s"
        await asyncio.sleep(0.05)  # retry pacing


def check_timeline(events: list[tuple[str, int]], final_version: int) -> list[str]:
    """Versions strictly increase apart from resets; after the last reset (or the first
    state) every version up to the final one is there. Returns the kinds seen."""
    assert events and events[0][0] == "state", events[:3]
    for before, ev in zip(events, events[1:]):
        if ev[0] != "reset":
            assert ev[1] > before[1], (before, ev)
    start = max(i for i, ev in enumerate(events) if ev[0] in ("state", "reset"))
    tail = events[start:]
    assert [v for _, v in tail] == list(range(tail[0][1], final_version + 1)), tail[-5:]
    return [k for k, _ in events]


async def test_two_devices_through_the_router_see_every_change_through_kill_and_join(
        start_cluster: Callable[..., LocalCluster]) -> None:
    cluster = start_cluster(nodes=3, initial_nodes=2, partitions=PARTITIONS, standbys=1)
    sid, first_owner = session_moved_by_the_join()
    shard = shard_of(sid, PARTITIONS)
    base = cluster.router_url
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/sessions", data=orjson.dumps({"id": sid, "data": {"turns": []}}),
                             headers={"Durability": "log"}) as resp:
            assert resp.status == 201
        assert cluster.owner_of_shard(shard) == first_owner
        b = Device(http, base, sid)
        stop = asyncio.Event()
        watching = asyncio.create_task(b.run(stop))
        # two more devices on the Python client: async straight to the owners, sync through the router
        direct: list[WatchEvent] = []
        routed: list[WatchEvent] = []

        async def watch_direct() -> None:
            async with AsyncClient(base) as client:
                async for ev in client.watch(sid):
                    direct.append(ev)

        def watch_routed() -> None:
            with Client(base, direct=False) as client:
                for ev in client.watch(sid):
                    routed.append(ev)
                    if stop.is_set():
                        return

        watching_direct = asyncio.create_task(watch_direct())
        routed_thread = threading.Thread(target=watch_routed, daemon=True)
        routed_thread.start()
        await wait_until(lambda: b.events and direct and routed, 30, "the devices' first events")
        for i in range(APPENDS):
            if i == 150:
                cluster.kill_node(first_owner)
            if i == 300:
                cluster.start_node("n3")
            if i == 400:
                # the join must land during A's run: wait for n3 to own the session's shard
                await wait_until(lambda: cluster.owner_of_shard(shard) == "n3", 90, "n3 to take the shard")
            await append(http, base, sid, i)
        async with http.get(f"{base}/v1/sessions/{sid}") as resp:
            assert resp.status == 200
            final = await resp.json()
        assert resp.headers["X-Stickystate-Owner"] == "n3"
        await wait_until(lambda: b.version >= final["version"], 60, "B to catch up with A's final read")
        await wait_until(lambda: direct[-1].version >= final["version"] and routed[-1].version >= final["version"],
                         60, "the client's watchers to catch up")
        stop.set()
        watching.cancel()
        watching_direct.cancel()
        await asyncio.gather(watching, watching_direct, return_exceptions=True)
        await write_one_more(http, base, sid)  # wakes the routed watcher so that its thread sees stop
        routed_thread.join(30)
        assert not routed_thread.is_alive()
    for seen in (direct, routed):
        # (up to A's final read: the write that woke the routed watcher came after it)
        kinds = check_timeline([(ev.kind, ev.version) for ev in seen if ev.version <= final["version"]],
                               final["version"])
        assert set(kinds) <= {"state", "change", "reset"}
        last = max(ev.version for ev in seen if ev.version <= final["version"])
        at_final = [ev for ev in seen if ev.version == last][-1]
        assert at_final.session_data == final["data"]

    events = b.events
    timeline = [(ev.kind, ev.version) for ev in events]
    assert events[0].kind == "state"
    for before, ev in zip(events, events[1:]):
        if ev.kind != "reset":
            assert ev.version > before.version, timeline
    starts = [i for i, ev in enumerate(events) if ev.kind in ("state", "reset")]
    tail = events[starts[-1]:]
    assert [ev.version for ev in tail] == list(range(tail[0].version, final["version"] + 1)), timeline
    assert all(ev.kind == "change" for ev in tail[1:])
    assert b.data == final["data"]
    assert len(final["data"]["turns"]) >= APPENDS // 2  # every log append at least, and no duplicate
    assert len(set(final["data"]["turns"])) == len(final["data"]["turns"])
    # B's stream ended at the kill and at the move, and it resumed each time
    assert b.streams >= 3, b.streams
    resets = [ev.data["cause"] for ev in events if ev.kind == "reset"]
    # a reset only where a `memory` write B had seen was lost in the crash (announced, with its cause)
    assert set(resets) <= {"epoch", "unknown_version"}, resets
    assert len(resets) <= 1, resets
    print(f"B: {len(events)} events over {b.streams} streams, resets {resets}, final version {final['version']}")


async def test_a_paused_owner_ends_the_routers_stream_and_the_watcher_resumes_on_the_new_owner(
        start_cluster: Callable[..., LocalCluster]) -> None:
    """A paused owner keeps its connections open: the router ends the client's stream
    when it declares the owner dead (router/streams.py), not when TCP notices, and the
    client's resume with its last id reaches the new owner: every change after it, once."""
    cluster = start_cluster(nodes=2, partitions=4, standbys=1)
    base = cluster.router_url
    sid = "paused-watch"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/sessions", data=orjson.dumps({"id": sid, "data": {"turns": []}}),
                             headers={"Durability": "log"}) as resp:
            assert resp.status == 201
        owner = cluster.owner_of_shard(shard_of(sid, 4))
        for i in range(3):
            await append(http, base, sid, 2 * i + 1)  # odd: Durability log
        resp = await http.get(f"{base}/v1/sessions/{sid}/watch")
        assert resp.status == 200
        (first,) = await take(resp, 1)
        assert (first.kind, first.version) == ("state", 4)
        cluster.signal_node(owner, signal.SIGSTOP)
        try:
            # the stream ends (the router closed it), long before any TCP timeout would
            tail = await asyncio.wait_for(resp.content.read(), 30)
            assert b"event: change" not in tail
            await wait_until(lambda: cluster.owner_of_shard(shard_of(sid, 4)) != owner, 30, "takeover")
            for i in range(3, 5):
                await append(http, base, sid, 2 * i + 1)
            async with http.get(f"{base}/v1/sessions/{sid}/watch", headers={"Last-Event-ID": first.id}) as again:
                assert again.status == 200
                events = await take(again, 2)
        finally:
            cluster.signal_node(owner, signal.SIGCONT)
            resp.close()
    assert [(e.kind, e.version) for e in events] == [("change", 5), ("change", 6)], events
    assert [e.data["event"]["items"] for e in events] == [[7], [9]]
