"""Bad input: every 4xx, with a JSON error body, and neither the session nor its
shard's partition changed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from stickystate.protocol import shard_of
from stickystate.local_cluster import LocalCluster
from tests.helpers import Api, end_offset, log_barrier
from tests.test_api import LIMITS

pytestmark = pytest.mark.kafka

SID = "bad-" + uuid.uuid4().hex[:8]
deep = {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}

CASES = [
    # (name, method, path, raw body, headers, status, error code)
    ("bad id", "GET", "/v1/sessions/has%20space", None, {}, 400, "bad_id"),
    ("bad id on write", "PUT", "/v1/sessions/" + "x" * 129, b"{}", {}, 400, "bad_id"),
    ("bad id in create", "POST", "/v1/sessions", b'{"id": "no/slash"}', {}, 400, "bad_id"),
    ("bad json", "PATCH", f"/v1/sessions/{SID}", b"{not json", {}, 400, "bad_json"),
    ("patch not an object", "PATCH", f"/v1/sessions/{SID}", b"[1, 2]", {}, 400, "bad_operation"),
    ("append items not a list", "POST", f"/v1/sessions/{SID}/lists/m", b'{"items": 3}', {}, 400, "bad_operation"),
    ("append to a non-list", "POST", f"/v1/sessions/{SID}/lists/name", b'{"items": [1]}', {}, 400, "not_a_list"),
    ("unknown field", "POST", f"/v1/sessions/{SID}/lists/m", b'{"items": [], "extra": 1}', {}, 400, "bad_operation"),
    ("bad durability", "PATCH", f"/v1/sessions/{SID}", b"{}", {"Durability": "disk"}, 400, "bad_durability"),
    ("bad if-match", "PATCH", f"/v1/sessions/{SID}", b"{}", {"If-Match": "abc"}, 400, "bad_if_match"),
    ("bad ttl", "PUT", f"/v1/sessions/{SID}/keys/k?ttl_s=-1", b"1", {}, 400, "bad_ttl"),
    ("missing session", "PATCH", f"/v1/sessions/nope-{SID}", b"{}", {}, 404, "not_found"),
    ("exists", "POST", "/v1/sessions", orjson.dumps({"id": SID}), {}, 409, "exists"),
    ("stale if-match", "PATCH", f"/v1/sessions/{SID}", b'{"x": 1}', {"If-Match": '"7"'}, 412, "precondition_failed"),
    ("body too large", "PATCH", f"/v1/sessions/{SID}", orjson.dumps({"x": "y" * 5000}), {}, 413, "too_large"),
    ("state too large", "PATCH", f"/v1/sessions/{SID}", orjson.dumps({"x": "y" * 2500}), {}, 413, "too_large"),
    ("list too long", "POST", f"/v1/sessions/{SID}/lists/m", orjson.dumps({"items": list(range(30))}), {}, 413,
     "too_large"),
    ("max_len over limit", "POST", f"/v1/sessions/{SID}/lists/m", b'{"items": [1], "max_len": 21}', {}, 413,
     "too_large"),
    ("too deep", "PATCH", f"/v1/sessions/{SID}", orjson.dumps(deep), {}, 413, "too_large"),
]


@pytest.fixture(scope="module")
def cluster_options() -> dict:
    return {"node_env": LIMITS}


@pytest.fixture
async def api(cluster: LocalCluster) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as http:
        a = Api(http, cluster.router_url)
        status, _, _ = await a.call("GET", f"/v1/sessions/{SID}")
        if status == 404:
            status, _, _ = await a.call("POST", "/v1/sessions", {"id": SID, "data": {"name": "x", "m": [0]}},
                                        headers={"Durability": "log"})
            assert status == 201
        yield a


@pytest.mark.parametrize("name,method,path,raw,headers,status,code", CASES, ids=[c[0] for c in CASES])
async def test_bad_input_is_rejected_and_changes_nothing(api: Api, cluster: LocalCluster, name: str, method: str,
                                                         path: str, raw: bytes | None, headers: dict, status: int,
                                                         code: str) -> None:
    partition = shard_of(SID, cluster.partitions)
    _, before, _ = await api.call("GET", f"/v1/sessions/{SID}")
    offset_before = await end_offset(cluster.kafka_bootstrap, cluster.topic, partition)

    got, body, resp_headers = await api.call(method, path, raw=raw, headers=headers)

    assert got == status, body
    assert resp_headers["Content-Type"].startswith("application/json")
    assert body["error"] == code and isinstance(body["message"], str) and body["message"]
    await log_barrier(api, SID)  # a (wrongly) queued memory-durability event would be in Kafka now
    _, after, _ = await api.call("GET", f"/v1/sessions/{SID}")
    assert after == before
    assert await end_offset(cluster.kafka_bootstrap, cluster.topic, partition) == offset_before


async def total_end_offset(cluster: LocalCluster) -> int:
    return sum([await end_offset(cluster.kafka_bootstrap, cluster.topic, p) for p in range(cluster.partitions)])


def sessions_held(cluster: LocalCluster) -> int:
    """Sessions the nodes own, summed (their /internal/status)."""
    from stickystate.local_cluster import http_json

    return sum(http_json(cluster.node_url(n) + "/internal/status")[1]["sessions"] for n in cluster.node_ids())


NOT_AN_ID = [[], {}, ["a"], {"id": "a"}, 0, 7, 1.5, True, False, None, "", "has space", "x" * 129]


@pytest.mark.parametrize("bad", NOT_AN_ID, ids=[repr(b)[:20] for b in NOT_AN_ID])
async def test_a_create_whose_id_is_not_an_id_string_is_400_and_creates_nothing(
        api: Api, cluster: LocalCluster, bad: object) -> None:
    """Present, ``id`` must be a string matching the id pattern: an array, an object, a
    number, a boolean or null is never taken for "no id" (which would create a session
    under a generated id)."""
    offsets, held = await total_end_offset(cluster), sessions_held(cluster)
    # Durability log: had the node (wrongly) applied it, its event would be in Kafka before the answer.
    status, body, headers = await api.call("POST", "/v1/sessions", raw=orjson.dumps({"id": bad, "data": {"a": 1}}),
                                           headers={"Durability": "log"})
    assert (status, body["error"]) == (400, "bad_id"), body
    assert headers["Content-Type"].startswith("application/json")
    assert await total_end_offset(cluster) == offsets
    assert sessions_held(cluster) == held
