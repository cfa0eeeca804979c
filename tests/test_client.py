"""stickystate.client against real clusters (a real Kafka broker): the client reaches the
owner without the router, follows a 421 after a node joins, retries a `log` append across
a kill -9 of its owner exactly once, raises one exception per error code, falls back
across router URLs. The pure placement/retry core and the error mapping are tested
without I/O at the end; 429 and 503 (which a healthy cluster cannot be made to answer on
demand) against a stub HTTP server, which stands in for the server only at the wire.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from stickystate.client import (AsyncClient, BadRequest, Client, Conflict, NotFound, PreconditionFailed, RateLimited,
                                RetryPolicy, TooLarge, TransportError, Unauthorized, Unavailable)
from stickystate.client.core import ClientCore, ClusterMap, Response, Target
from stickystate.client.errors import BY_STATUS, ApiError, NotOwner, ServerError, error_of
from stickystate.local_cluster import LocalCluster
from stickystate.protocol import shard_of

KEY_A = "client-key-a-0123456789"
KEY_B = "client-key-b-0123456789"
SECRET = "client-secret-0123456789"
KEYS = f"{KEY_A}=ta,{KEY_B}=tb"


@pytest.fixture(scope="module")
def cluster_options() -> dict[str, Any]:
    return {"auth": "keys", "api_keys": KEYS, "internal_secret": SECRET,
            "node_env": {"STICKYSTATE_MAX_LIST_LEN": "500"}}


def router_requests(cluster: LocalCluster) -> float:
    """The router's stickystate_router_requests_total, all labels summed (its /metrics
    is not counted itself)."""
    with urllib.request.urlopen(cluster.router_url + "/metrics", timeout=5) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("stickystate_router_requests_total"))


def node_requests(cluster: LocalCluster, status: str | None = None) -> float:
    total = 0.0
    for nid in cluster.node_ids():
        if not cluster.procs[nid].alive():
            continue
        with urllib.request.urlopen(cluster.node_url(nid) + "/metrics", timeout=5) as resp:  # noqa: S310
            for line in resp.read().decode().splitlines():
                if line.startswith("stickystate_requests_total") and (status is None or f'status="{status}"' in line):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def uid(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


# -- the direct path ----------------------------------------------------------------------------


@pytest.mark.kafka
def test_sync_client_requests_reach_the_owner_without_the_router(cluster: LocalCluster) -> None:
    with Client(cluster.router_url, api_key=KEY_A) as client:
        view = client.cluster()  # the map: the one request the router sees
        assert view["tenant"] == "ta" and client.core.map is not None
        before, nodes_before = router_requests(cluster), node_requests(cluster)
        sids = [uid("direct") for _ in range(8)]
        for sid in sids:
            created = client.create(sid, {"n": 0}, ttl_s=600)
            assert created["id"] == sid and created["version"] == 1
            assert client.append(sid, "log", [1, 2], max_len=10)["data"]["log"] == [1, 2]
            assert client.patch(sid, {"n": 1}, if_match=2)["version"] == 3
            assert client.set_key(sid, "otp", 42, ttl_s=30, minimal=True)["version"] == 4
            assert client.delete_key(sid, "otp")["data"] == {"n": 1, "log": [1, 2]}
            assert client.replace(sid, {"fresh": True}, durability="log")["version"] == 6
            meta = client.meta(sid)
            assert meta["owner"] == client.core.map.owners[shard_of(f"ta:{sid}", view["partitions"])]
            assert client.get(sid)["data"] == {"fresh": True}
        client.delete(sids[0])
        with pytest.raises(NotFound):
            client.get(sids[0])
        after = router_requests(cluster)
        assert after == before, "a direct call went through the router"
        assert node_requests(cluster) - nodes_before >= 8 * 8  # ... and reached the nodes
        assert client.core.counts["not_owner"] == 0
    # the control: the same calls with direct=False are counted by the router
    with Client(cluster.router_url, api_key=KEY_A, direct=False) as via_router:
        assert via_router.get(sids[1])["data"] == {"fresh": True}
        via_router.append(sids[1], "log", [3])
    assert router_requests(cluster) - after == 2


@pytest.mark.kafka
async def test_async_client_requests_reach_the_owner_without_the_router(cluster: LocalCluster) -> None:
    async with AsyncClient(cluster.router_url, api_key=KEY_A, minimal=True) as client:
        await client.cluster()
        before = router_requests(cluster)
        sids = [uid("adirect") for _ in range(16)]
        created = await asyncio.gather(*(client.create(sid, {"n": 0}) for sid in sids))
        assert [c["version"] for c in created] == [1] * 16 and "data" not in created[0]  # minimal by default
        answers = await asyncio.gather(*(client.append(sid, "m", [i], durability="log") for i, sid in enumerate(sids)))
        assert all(a["version"] == 2 for a in answers)
        full = await client.append(sids[0], "m", ["x"], minimal=False)
        assert full["data"]["m"] == [0, "x"]
        events = [e async for e in client.history(sids[0], page_size=1)]  # one page per event
        assert [e["op"] for e in events] == ["create", "append", "append"]
        assert all(e["sid"] == sids[0] for e in events)
        assert router_requests(cluster) == before


@pytest.mark.kafka
def test_update_retries_on_412_until_no_one_wrote_in_between(cluster: LocalCluster) -> None:
    sid = uid("update")
    with Client(cluster.router_url, api_key=KEY_A) as a, Client(cluster.router_url, api_key=KEY_A) as b:
        a.create(sid, {"count": 0})
        raced = []

        def bump(data: dict[str, Any]) -> dict[str, Any]:
            if not raced:  # the first time, another client writes in between
                raced.append(b.update(sid, lambda d: {**d, "count": d["count"] + 10}))
            return {**data, "count": data["count"] + 1}

        result = a.update(sid, bump)
        assert result["data"] == {"count": 11} and result["version"] == 3
        threads = [threading.Thread(target=lambda: [a.update(sid, lambda d: {"count": d["count"] + 1})
                                                    for _ in range(10)]) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert a.get(sid)["data"] == {"count": 41}


@pytest.mark.kafka
def test_every_error_code_raises_its_exception(cluster: LocalCluster) -> None:
    sid = uid("errors")
    with Client(cluster.router_url, api_key=KEY_A) as client:
        client.create(sid, {"v": 1})
        with pytest.raises(Conflict) as conflict:
            client.create(sid)
        assert conflict.value.status == 409 and conflict.value.code == "exists"
        with pytest.raises(NotFound):
            client.get(uid("missing"))
        with pytest.raises(NotFound):
            client.delete_key(sid, "absent")
        with pytest.raises(PreconditionFailed) as stale:
            client.patch(sid, {"v": 2}, if_match=7)
        assert stale.value.current == 1
        with pytest.raises(BadRequest) as bad:
            client.replace(sid, {"v": 2}, ttl_s=-1)
        assert bad.value.code == "bad_ttl"
        for bad in ("not an id", "..", "x" * 129):
            with pytest.raises(BadRequest):
                client.get(bad)  # refused before it is sent
        with pytest.raises(TooLarge) as large:
            client.append(sid, "l", [0] * 501)
        assert large.value.limit == "max_list_len"
        with pytest.raises(TooLarge) as large:
            client.set_key(sid, "blob", "x" * (1 << 21))
        assert large.value.limit == "max_body_bytes"
        assert client.get(sid)["version"] == 1  # none of it changed anything
    for direct in (True, False):
        with Client(cluster.router_url, api_key="not-a-key-0123456789", direct=direct) as wrong:
            with pytest.raises(Unauthorized) as unauthorized:
                wrong.get(sid)
            assert unauthorized.value.status == 401
    with Client(cluster.router_url) as keyless:
        with pytest.raises(Unauthorized):
            keyless.get(sid)


@pytest.mark.kafka
def test_tenant_b_with_a_direct_client_cannot_reach_tenant_a(cluster: LocalCluster) -> None:
    sid = uid("tenant")
    with Client(cluster.router_url, api_key=KEY_A) as a, Client(cluster.router_url, api_key=KEY_B) as b:
        a.create(sid, {"owner": "A"})
        with pytest.raises(NotFound):
            b.get(sid)
        with pytest.raises(NotFound):
            b.get(f"ta:{sid}")
        b.create(sid, {"owner": "B"})  # its own session of the same name
        assert b.get(sid)["data"] == {"owner": "B"} and a.get(sid)["data"] == {"owner": "A"}


@pytest.mark.kafka
def test_several_router_urls_move_on_when_one_fails(cluster: LocalCluster) -> None:
    from stickystate.local_cluster import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    for direct in (True, False):
        with Client([dead, cluster.router_url], api_key=KEY_A, direct=direct) as client:
            sid = uid("routers")
            assert client.create(sid)["id"] == sid
            assert client.core.router == cluster.router_url
            assert client.core.counts["transport_errors"] + client.core.counts["map_refreshes"] >= 1


# -- placement changes, failover ------------------------------------------------------------------


@pytest.mark.kafka
async def test_a_421_after_a_node_joins_is_followed_and_the_map_refreshed(start_cluster: Any) -> None:
    cluster: LocalCluster = start_cluster(nodes=3, initial_nodes=2, partitions=16)
    async with AsyncClient(cluster.router_url, map_max_age_s=3600) as client:
        old = ClusterMap.from_view(await client.cluster())
        assert set(old.owners.values()) == {"n1", "n2"}
        sids = [f"join-{i}" for i in range(40)]
        for sid in sids:
            await client.create(sid, {"sid": sid}, durability="log")
        cluster.start_node("n3")
        await asyncio.to_thread(cluster.wait_ready, 120)
        new = ClusterMap.from_view(cluster.cluster_view())
        moved = [sid for sid in sids if new.owner(sid) == "n3"]
        assert moved, "no session moved to the new node"
        assert client.core.map is not None and client.core.map.generation == old.generation  # still the old map
        rejected_before = node_requests(cluster, "421")
        for sid in moved:
            assert (await client.get(sid))["data"] == {"sid": sid}
        assert client.core.counts["not_owner"] >= 1
        assert node_requests(cluster, "421") > rejected_before  # an old owner said so
        assert client.core.map.generation == new.generation and client.core.map.owner(moved[0]) == "n3"
        hops = client.core.counts["not_owner"]
        for sid in moved:  # the refreshed map sends them straight to n3
            assert (await client.meta(sid))["owner"] == "n3"
        assert client.core.counts["not_owner"] == hops


@pytest.mark.kafka
def test_a_log_append_retried_across_a_kill_9_of_its_owner_appears_once(start_cluster: Any) -> None:
    """Appends at durability log, one after another, while the session's owner is
    killed with -9: the append in flight (or the next one) fails at the dead node and is
    retried with its Idempotency-Key, on the router and the new owner. Every item is in the
    list once, in order; an attempt that did reach the log before the kill is replayed by
    the new owner from its idempotency record, not applied again."""
    cluster: LocalCluster = start_cluster(nodes=3, standbys=1, partitions=8)
    sid = "kill-9-target"
    with Client(cluster.router_url, durability="log", retry=RetryPolicy(total_timeout_s=60)) as client:
        client.create(sid)
        owner = client.meta(sid)["owner"]
        done: list[int] = []
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                for i in range(300):
                    client.append(sid, "items", [i], minimal=True)
                    done.append(i)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        deadline = time.monotonic() + 60
        while len(done) < 100 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.005)
        cluster.kill_node(owner)
        thread.join(120)
        assert not errors, errors
        assert done == list(range(300))
        assert client.core.counts["transport_errors"] >= 1  # the dead owner failed an attempt
        session = client.get(sid)
        assert session["data"]["items"] == list(range(300))
        assert client.meta(sid)["owner"] != owner
    # and a retry of an append that did reach the log (its answer lost): applied once
    with Client(cluster.router_url, durability="log") as client:
        first = client.append(sid, "items", ["again"], idempotency_key="lost-answer-1", minimal=True)
        owner = client.meta(sid)["owner"]
        cluster.kill_node(owner)
        replay = client.append(sid, "items", ["again"], idempotency_key="lost-answer-1", minimal=True)
        assert replay["version"] == first["version"]
        assert client.get(sid)["data"]["items"].count("again") == 1


# -- the client installs without the server -------------------------------------------------------

SERVER_ONLY = ("aiokafka", "uhashring", "httptools", "uvloop", "prometheus_client", "kafka")


def test_the_client_imports_none_of_the_servers_dependencies() -> None:
    code = ("import sys, stickystate.client, stickystate.client.aio, stickystate.client.sync\n"
            "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(run.stdout.strip().split(","))
    assert "urllib3" in loaded and "aiohttp" in loaded  # the walk sees what it imports
    assert not loaded & set(SERVER_ONLY), loaded & set(SERVER_ONLY)
    assert not {m for m in loaded if m.startswith("stickystate.")} - {"stickystate.client", "stickystate.protocol"}


def test_the_client_extra_holds_no_server_dependency() -> None:
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ;]", d, 1)[0].lower() for d in project["dependencies"]
             + project["optional-dependencies"]["client"]}
    assert {"aiohttp", "urllib3", "orjson"} <= names
    assert not names & {"aiokafka", "uhashring", "httptools", "uvloop", "prometheus-client"}, names
    server = {re.split(r"[<>=\[ ;]", d, 1)[0].lower() for d in project["optional-dependencies"]["server"]}
    assert {"aiokafka", "uhashring", "httptools", "uvloop", "prometheus-client", "aiohttp"} <= server


# -- the core, without I/O ------------------------------------------------------------------------


def core(direct: bool = True, **kw: Any) -> ClientCore:
    return ClientCore(["http://r1", "http://r2"], "k" * 20, direct=direct, durability=None, minimal=False,
                      retry=RetryPolicy(**kw), map_max_age_s=30, rng=random.Random(7))


VIEW = {"generation": 4, "partitions": 8, "tenant": "ta", "shards": {str(s): f"n{1 + s % 2}" for s in range(8)},
        "nodes": [{"id": "n1", "url": "http://n1/"}, {"id": "n2", "url": "http://n2"}]}


def test_placement_hashes_the_tenant_namespaced_id_as_the_router_does() -> None:
    c = core()
    c.set_map(VIEW, 0.0)
    assert c.map is not None
    for sid in ("a", "chat-42", "x:y"):
        shard = shard_of(f"ta:{sid}", 8)  # router/forward.py: shard_of(f"{tenant}:{sid}")
        attempts = c.attempts(c.get(sid), 0.0)
        assert attempts.target() == Target(f"http://n{1 + shard % 2}", f"n{1 + shard % 2}")
    open_map = ClusterMap.from_view({**VIEW, "tenant": None})
    assert open_map.stored_id("a") == "a" and open_map.shard("a") == shard_of("a", 8)
    assert core(direct=False).attempts(c.get("a"), 0.0).target() == Target("http://r1", None)


def test_a_421_goes_to_the_named_owner_at_once() -> None:
    c = core()
    c.set_map(VIEW, 0.0)
    a = c.attempts(c.append("s", "f", [1], None), 0.0)
    first = a.target()
    a.sent()
    other = "n2" if first.node == "n1" else "n1"
    step = a.answered(first, Response(421, {"X-Stickystate-Owner": other}, b'{"error":"not_owner"}'), 1.0)
    assert not step.done and step.delay_s == 0 and step.refresh
    assert a.target() == Target(f"http://{other}", other)


def test_a_dead_node_is_retried_on_the_router_with_backoff_and_the_same_key() -> None:
    c = core(max_attempts=3)
    c.set_map(VIEW, 0.0)
    call = c.append("s", "f", [1], None)
    key = call.headers["Idempotency-Key"]
    a = c.attempts(call, 0.0)
    node = a.target()
    a.sent()
    step = a.failed(node, ConnectionRefusedError(), 0.1)
    assert not step.done and 0.025 <= step.delay_s <= 0.05 and step.refresh
    assert a.target() == Target("http://r1", None)  # the map still names the dead node
    a.sent()
    step = a.answered(a.target(), Response(503, {"Retry-After": "1"}, b'{"error":"unavailable"}'), 0.2)
    assert not step.done and step.delay_s >= 1.0
    a.sent()
    step = a.failed(a.target(), TimeoutError(), 1.5)
    assert step.done and isinstance(step.error, TransportError)  # max_attempts
    assert call.headers["Idempotency-Key"] == key and key.startswith("auto-")


def test_attempts_are_bounded_in_time() -> None:
    c = core(total_timeout_s=1.0, max_attempts=100)
    a = c.attempts(c.get("s"), 0.0)
    a.sent()
    step = a.answered(a.target(), Response(503, {"Retry-After": "5"}, b"{}"), 0.5)
    assert step.done and isinstance(step.error, Unavailable) and step.error.retry_after == 5.0


def test_routers_rotate_on_failure() -> None:
    c = core(direct=False)
    a = c.attempts(c.get("s"), 0.0)
    a.sent()
    step = a.failed(Target("http://r1", None), ConnectionResetError(), 0.0)
    assert step.delay_s == 0 and a.target() == Target("http://r2", None)


def test_backoff_grows_exponentially_with_jitter() -> None:
    policy, rng = RetryPolicy(backoff_base_s=0.1, backoff_max_s=1.0), random.Random(1)
    for n, cap in enumerate((0.1, 0.2, 0.4, 0.8, 1.0, 1.0)):
        values = {policy.backoff_s(n, rng) for _ in range(20)}
        assert all(cap / 2 <= v <= cap for v in values) and len(values) > 1


def test_update_waits_between_lost_rounds_from_the_third_on_with_jitter() -> None:
    policy, rng = RetryPolicy(backoff_base_s=0.1, backoff_max_s=1.0), random.Random(1)
    assert policy.update_pause_s(0, rng) == policy.update_pause_s(1, rng) == 0.0
    for lost, cap in ((2, 0.1), (3, 0.2), (4, 0.4)):
        values = {policy.update_pause_s(lost, rng) for _ in range(20)}
        assert all(cap / 2 <= v <= cap for v in values) and len(values) > 1


@pytest.mark.parametrize("status,cls", [(400, BadRequest), (401, Unauthorized), (404, NotFound), (409, Conflict),
                                        (412, PreconditionFailed), (413, TooLarge), (421, NotOwner),
                                        (429, RateLimited), (503, Unavailable), (500, ServerError),
                                        (405, ApiError)])
def test_each_status_has_its_exception(status: int, cls: type[ApiError]) -> None:
    error = error_of(status, {"error": "e", "message": "m", "current": 3, "limit": "max_depth", "owner": "n2"},
                     "rid", 2.0)
    assert type(error) is cls and error.status == status and error.code == "e" and error.request_id == "rid"
    assert isinstance(error, ApiError) and error.retry_after == 2.0
    assert len(BY_STATUS) == 9
    if cls is PreconditionFailed:
        assert isinstance(error, PreconditionFailed) and error.current == 3
    if cls is TooLarge:
        assert isinstance(error, TooLarge) and error.limit == "max_depth"


def test_client_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STICKYSTATE_URL", "http://a:1, http://b:2/")
    monkeypatch.setenv("STICKYSTATE_API_KEY", "env-key-0123456789")
    c = Client()
    assert c.core.routers == ["http://a:1", "http://b:2"]
    assert c.core.base_headers["Authorization"] == "Bearer env-key-0123456789"
    c.close()
    monkeypatch.delenv("STICKYSTATE_URL")
    with pytest.raises(ValueError):
        Client()


# -- 429 and 503 from a stub at the wire ------------------------------------------------------------


@pytest.fixture
def stub() -> Iterator[dict[str, Any]]:
    """A router stand-in answering /v1/cluster with itself as the only node, and every
    session call with what ``state["answer"]`` says; counts the calls."""
    state: dict[str, Any] = {"answer": (429, {"Retry-After": "7"}), "calls": 0}
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def cluster(request: web.Request) -> web.Response:
        base = f"http://127.0.0.1:{state['port']}"
        return web.json_response({"generation": 1, "partitions": 1, "tenant": None, "shards": {"0": "n1"},
                                  "nodes": [{"id": "n1", "url": base}]})

    async def session(request: web.Request) -> web.Response:
        state["calls"] += 1
        status, headers = state["answer"]
        return web.json_response({"error": "rate_limited" if status == 429 else "unavailable", "message": "m"},
                                 status=status, headers=headers)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/cluster", cluster)
        app.router.add_route("*", "/v1/sessions/{tail:.*}", session)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state["port"] = runner.addresses[0][1]
        state["stop"] = asyncio.Event()
        started.set()
        await state["stop"].wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    state["url"] = f"http://127.0.0.1:{state['port']}"
    yield state
    loop.call_soon_threadsafe(state["stop"].set)
    thread.join(10)


def test_429_is_raised_at_once_with_retry_after(stub: dict[str, Any]) -> None:
    with Client(stub["url"]) as client:
        with pytest.raises(RateLimited) as limited:
            client.get("s")
    assert limited.value.retry_after == 7.0 and stub["calls"] == 1


async def test_503_is_retried_then_raised_with_retry_after(stub: dict[str, Any]) -> None:
    stub["answer"] = (503, {"Retry-After": "0"})
    policy = RetryPolicy(max_attempts=4, backoff_base_s=0.001, backoff_max_s=0.002)
    async with AsyncClient(stub["url"], retry=policy) as client:
        with pytest.raises(Unavailable) as unavailable:
            await client.append("s", "f", [1])
    assert unavailable.value.retry_after == 0.0 and stub["calls"] == 4
    assert client.core.counts["unavailable"] == 4
    with Client(stub["url"], retry=policy) as sync_client:
        with pytest.raises(Unavailable):
            sync_client.get("s")
    assert stub["calls"] == 8


def test_no_router_at_all_is_a_transport_error() -> None:
    from stickystate.local_cluster import free_port

    policy = RetryPolicy(max_attempts=3, backoff_base_s=0.001, total_timeout_s=5)
    with Client(f"http://127.0.0.1:{free_port()}", retry=policy) as client:
        with pytest.raises(TransportError):
            client.get("s")

