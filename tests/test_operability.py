"""Metrics add up, /readyz tells the truth, /meta and /history, request ids."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stickystate.protocol import shard_of
from stickystate.local_cluster import LocalCluster, http_json
from tests.helpers import Api, codec_for

pytestmark = pytest.mark.kafka


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple], float]:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


async def test_metrics_add_up_after_a_known_workload(cluster: LocalCluster) -> None:
    creates, appends, reads = 40, 60, 25
    prefix = "m-" + uuid.uuid4().hex[:6]
    async with aiohttp.ClientSession() as http:
        api = Api(http, cluster.router_url)
        node_urls = [cluster.node_url(n) for n in cluster.node_ids()]
        before_nodes = [await scrape(http, u) for u in node_urls]
        before_router = await scrape(http, cluster.router_url)
        for i in range(creates):
            assert (await api.call("POST", "/v1/sessions", {"id": f"{prefix}-{i}"}, headers={"Durability": "log"}))[0] == 201
        for i in range(appends):
            status, _, _ = await api.call("POST", f"/v1/sessions/{prefix}-{i % creates}/lists/m", {"items": [i]},
                                          headers={"Durability": "log"})
            assert status == 200
        for i in range(reads):
            assert (await api.call("GET", f"/v1/sessions/{prefix}-{i}"))[0] == 200
        after_nodes = [await scrape(http, u) for u in node_urls]
        after_router = await scrape(http, cluster.router_url)

    def delta(name: str, **labels: str) -> float:
        return sum(total(a, name, **labels) - total(b, name, **labels) for a, b in zip(after_nodes, before_nodes))

    assert delta("stickystate_requests_total", op="create", status="201") == creates
    assert delta("stickystate_requests_total", op="append", status="200") == appends
    assert delta("stickystate_requests_total", op="get", status="200") == reads
    assert delta("stickystate_request_duration_seconds_count", op="append") == appends
    # Every acknowledged write is exactly one event sent and acknowledged (no claims happened meanwhile).
    assert delta("stickystate_recoveries_total") == 0
    assert delta("stickystate_replication_events_sent_total") == creates + appends
    assert delta("stickystate_replication_events_acked_total") == creates + appends
    owned = sum(total(a, "stickystate_sessions", role="owned") for a in after_nodes)
    owned_before = sum(total(b, "stickystate_sessions", role="owned") for b in before_nodes)
    assert owned - owned_before == creates
    standby = sum(total(a, "stickystate_sessions", role="standby") for a in after_nodes)
    standby_before = sum(total(b, "stickystate_sessions", role="standby") for b in before_nodes)
    for _ in range(50):  # standbys follow asynchronously
        if standby - standby_before == creates:
            break
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as http:
            scraped = [await scrape(http, u) for u in node_urls]
        standby = sum(total(m, "stickystate_sessions", role="standby") for m in scraped)
    assert standby - standby_before == creates  # one standby per shard
    assert sum(total(a, "stickystate_replication_queue_depth") for a in after_nodes) == 0
    routed = total(after_router, "stickystate_router_requests_total") - total(before_router, "stickystate_router_requests_total")
    assert routed == creates + appends + reads
    assert all(total(after_router, "stickystate_router_node_healthy", node=n) == 1 for n in cluster.node_ids())


async def test_meta_history_and_request_id(api: Api, cluster: LocalCluster) -> None:
    sid = "h-" + uuid.uuid4().hex[:6]
    await api.call("POST", "/v1/sessions", {"id": sid, "data": {"a": 1}}, headers={"Durability": "log"})
    for i in range(5):
        await api.call("POST", f"/v1/sessions/{sid}/lists/m", {"items": [i]}, headers={"Durability": "log"})
    status, meta, headers = await api.call("GET", f"/v1/sessions/{sid}/meta", headers={"X-Request-Id": "req-123"})
    assert status == 200 and headers["X-Request-Id"] == "req-123"
    assert meta["shard"] == shard_of(sid, cluster.partitions) and meta["version"] == 6
    assert meta["owner"] == cluster.owner_of_shard(meta["shard"]) and meta["epoch"] >= 1
    assert meta["size_bytes"] == len(b'{"a":1,"m":[0,1,2,3,4]}') and meta["last_offset"] >= 5
    status, page1, _ = await api.call("GET", f"/v1/sessions/{sid}/history?limit=4")
    assert status == 200 and [e["ver"] for e in page1["events"]] == [1, 2, 3, 4]
    status, page2, _ = await api.call("GET", f"/v1/sessions/{sid}/history?limit=4&after={page1['next_after']}")
    assert [e["ver"] for e in page2["events"]] == [5, 6] and page2["next_after"] is None
    assert [e["op"] for e in page1["events"] + page2["events"]] == ["create"] + ["append"] * 5
    assert page2["events"][-1]["offset"] == meta["last_offset"]
    status, body, _ = await api.call("GET", f"/v1/sessions/{sid}/history?limit=0")
    assert status == 400 and body["error"] == "bad_query"


async def test_readyz_is_false_while_a_shard_is_rebuilt_then_true(cluster: LocalCluster) -> None:
    """Fill one shard with many events, restart its owner empty, and watch /readyz."""
    from aiokafka import AIOKafkaProducer

    victim = "n3"
    shard = next(int(s) for s, o in cluster.cluster_view()["shards"].items() if o == victim)
    sid = next(f"r-{i}" for i in range(10_000) if shard_of(f"r-{i}", cluster.partitions) == shard)
    async with aiohttp.ClientSession() as http:
        api = Api(http, cluster.router_url)
        status, _, headers = await api.call("POST", "/v1/sessions", {"id": sid}, headers={"Durability": "log"})
        assert status == 201
        epoch = int(headers["X-Stickystate-Epoch"])
    # sealed under the session's data key, as the owner seals its events (README, Encryption and erasure)
    codec = await codec_for(cluster.kafka_bootstrap, cluster.topic, cluster.master_keys, shard)
    producer = AIOKafkaProducer(bootstrap_servers=cluster.kafka_bootstrap, linger_ms=20, acks="all",
                                max_batch_size=512 * 1024)
    await producer.start()
    try:
        # Valid events of the current owner, as if written by it: replay must apply all of them.
        for v in range(2, 60_002):
            ev = {"op": "set_key", "sid": sid, "key": "k", "value": v, "ttl_s": None, "ver": v, "at": time.time(),
                  "node": victim, "epoch": epoch}
            await producer.send(cluster.topic, codec.encode_change(shard, ev), key=sid.encode(), partition=shard)
        await producer.flush()
    finally:
        await producer.stop()

    cluster.kill_node(victim)
    # Wait until the router moved the shard away, then bring the victim back empty.
    deadline = time.monotonic() + 30
    while cluster.owner_of_shard(shard) == victim and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    cluster.restart_node(victim)
    seen: list[tuple[int, list[int]]] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        code, body = http_json(cluster.node_url(victim) + "/readyz", timeout_s=1)
        if code:
            seen.append((code, body.get("recovering", [])))
        if code == 200 and cluster.owner_of_shard(shard) == victim:
            break
        await asyncio.sleep(0.02)
    assert any(code == 503 and shard in rec for code, rec in seen), seen[:5]
    assert seen[-1][0] == 200
    async with aiohttp.ClientSession() as http:
        status, body, headers = await Api(http, cluster.router_url).call("GET", f"/v1/sessions/{sid}")
    assert status == 200 and body["data"] == {"k": 60_001} and headers["X-Stickystate-Owner"] == victim
    cluster.wait_ready()


@pytest.mark.slow
async def test_readyz_is_false_while_draining(cluster: LocalCluster) -> None:
    victim = "n2"
    assert http_json(cluster.node_url(victim) + "/readyz")[0] == 200
    cluster.signal_node(victim, signal.SIGTERM)
    seen = []
    deadline = time.monotonic() + 30
    while cluster.procs[victim].alive() and time.monotonic() < deadline:
        code, body = http_json(cluster.node_url(victim) + "/readyz", timeout_s=1)
        if code:
            seen.append((code, body.get("draining")))
        await asyncio.sleep(0.01)
    assert (503, True) in seen, seen[:5]
    cluster.restart_node(victim)
    cluster.wait_ready()
    assert http_json(cluster.node_url(victim) + "/readyz")[0] == 200
