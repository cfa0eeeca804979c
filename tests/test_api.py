"""Every operation of the HTTP API, through the router, against a real Kafka broker."""

from __future__ import annotations

import time
import uuid

import pytest

from stickystate.protocol import shard_of
from stickystate.local_cluster import LocalCluster
from tests.helpers import Api, log_barrier, read_partition, read_records, wait_until

pytestmark = pytest.mark.kafka

LIMITS = {
    "STICKYSTATE_MAX_BODY_BYTES": "4096",
    "STICKYSTATE_MAX_STATE_BYTES": "2048",
    "STICKYSTATE_MAX_LIST_LEN": "20",
    "STICKYSTATE_MAX_DEPTH": "5",
}


@pytest.fixture(scope="module")
def cluster_options() -> dict:
    return {"node_env": LIMITS}


def sid() -> str:
    return "t-" + uuid.uuid4().hex[:12]


async def raw_count(cluster: LocalCluster, session: str) -> int:
    """Records of the session in its partition, sealed or not (erased ones included)."""
    return sum(1 for _, key, _ in await read_records(cluster.kafka_bootstrap, cluster.topic,
                                                     shard_of(session, cluster.partitions))
               if key == session.encode())


async def events_of(cluster: LocalCluster, session: str) -> list[dict]:
    records = await read_partition(cluster.kafka_bootstrap, cluster.topic, shard_of(session, cluster.partitions),
                                   cluster.master_keys)
    return [e for _, key, e in records if key == session.encode()]


async def test_create_without_id_generates_a_128_bit_id(api: Api) -> None:
    status, body, headers = await api.call("POST", "/v1/sessions")
    assert status == 201
    assert len(body["id"]) >= 22  # secrets.token_urlsafe(16): 16 random bytes
    assert body["version"] == 1 and body["data"] == {} and body["expires_at"] > 0
    assert headers["ETag"] == '"1"'
    status2, body2, _ = await api.call("POST", "/v1/sessions")
    assert status2 == 201 and body2["id"] != body["id"]


async def test_create_read_conflict_and_not_found(api: Api, cluster: LocalCluster) -> None:
    s = sid()
    status, body, _ = await api.call("POST", "/v1/sessions", {"id": s, "data": {"user": "ada"}, "ttl_s": 120})
    assert status == 201 and body["data"] == {"user": "ada"}
    status, body, headers = await api.call("GET", f"/v1/sessions/{s}")
    assert status == 200 and body["data"] == {"user": "ada"} and headers["ETag"] == '"1"'
    assert headers["X-Stickystate-Owner"] == cluster.owner_of_shard(shard_of(s, cluster.partitions))
    status, body, _ = await api.call("POST", "/v1/sessions", {"id": s})
    assert status == 409 and body["error"] == "exists"
    status, body, _ = await api.call("GET", f"/v1/sessions/{sid()}")
    assert status == 404 and body["error"] == "not_found"


async def test_put_creates_then_replaces(api: Api) -> None:
    s = sid()
    status, body, _ = await api.call("PUT", f"/v1/sessions/{s}", {"a": 1})
    assert status == 201 and body["version"] == 1
    status, body, _ = await api.call("PUT", f"/v1/sessions/{s}", {"b": 2})
    assert status == 200 and body["data"] == {"b": 2} and body["version"] == 2


async def test_patch_is_a_json_merge_patch(api: Api) -> None:
    s = sid()
    await api.call("PUT", f"/v1/sessions/{s}", {"a": {"b": "c", "d": 1}, "keep": True})
    status, body, _ = await api.call("PATCH", f"/v1/sessions/{s}", {"a": {"b": "z", "d": None}, "new": [1]})
    assert status == 200
    assert body["data"] == {"a": {"b": "z"}, "keep": True, "new": [1]}


async def test_list_append_keeps_a_window(api: Api) -> None:
    s = sid()
    await api.call("POST", "/v1/sessions", {"id": s})
    for i in range(4):
        status, body, _ = await api.call("POST", f"/v1/sessions/{s}/lists/messages",
                                         {"items": [f"m{i}a", f"m{i}b"], "max_len": 3})
        assert status == 200
    assert body["data"]["messages"] == ["m2b", "m3a", "m3b"]
    assert body["version"] == 5


async def test_key_with_its_own_ttl_and_key_delete(api: Api) -> None:
    s = sid()
    await api.call("POST", "/v1/sessions", {"id": s, "data": {"stay": 1}})
    before_set = time.time()  # the key's expiry is at least 1 s after this
    status, body, _ = await api.call("PUT", f"/v1/sessions/{s}/keys/otp?ttl_s=1", 1234)
    assert status == 200 and body["data"]["otp"] == 1234
    status, body, _ = await api.call("PUT", f"/v1/sessions/{s}/keys/note", {"x": 1})
    assert status == 200 and body["data"] == {"stay": 1, "otp": 1234, "note": {"x": 1}}

    async def otp_gone() -> bool:
        return "otp" not in (await api.call("GET", f"/v1/sessions/{s}"))[1]["data"]

    await wait_until(otp_gone, timeout_s=10, what="the key with ttl_s=1 to expire")
    assert time.time() - before_set >= 0.99  # it expired by its own TTL, not at once
    status, body, _ = await api.call("GET", f"/v1/sessions/{s}")
    assert status == 200 and body["data"] == {"stay": 1, "note": {"x": 1}}  # the rest stays
    status, _, _ = await api.call("DELETE", f"/v1/sessions/{s}/keys/note")
    assert status == 200
    status, body, _ = await api.call("GET", f"/v1/sessions/{s}")
    assert body["data"] == {"stay": 1}
    status, body, _ = await api.call("DELETE", f"/v1/sessions/{s}/keys/note")
    assert status == 404


async def test_delete_removes_the_session_and_logs_a_delete(api: Api, cluster: LocalCluster) -> None:
    s = sid()
    await api.call("POST", "/v1/sessions", {"id": s}, headers={"Durability": "log"})
    status, body, _ = await api.call("DELETE", f"/v1/sessions/{s}", headers={"Durability": "log"})
    assert status == 204 and body is None
    assert (await api.call("GET", f"/v1/sessions/{s}"))[0] == 404
    # both events are in the log, sealed under the session's key; the delete erased the key,
    # so neither opens any more (tests/test_erasure.py)
    assert await raw_count(cluster, s) == 2
    assert await events_of(cluster, s) == []


async def test_cluster_view(api: Api, cluster: LocalCluster) -> None:
    status, body, _ = await api.call("GET", "/v1/cluster")
    assert status == 200
    assert {n["id"] for n in body["nodes"]} == {"n1", "n2", "n3"}
    assert all(set(n) >= {"id", "url", "healthy"} and n["healthy"] for n in body["nodes"])
    assert set(body["shards"]) == {str(i) for i in range(cluster.partitions)}


async def test_durability_log_acknowledges_after_kafka_has_the_event(api: Api, cluster: LocalCluster) -> None:
    s = sid()
    status, body, headers = await api.call("POST", "/v1/sessions", {"id": s, "data": {"n": 1}},
                                           headers={"Durability": "log"})
    assert status == 201
    events = await events_of(cluster, s)  # read right after the answer: it must be there
    assert [(e["op"], e["ver"]) for e in events] == [("create", 1)]
    assert events[0]["node"] == headers["X-Stickystate-Owner"]
    assert events[0]["epoch"] == int(headers["X-Stickystate-Epoch"])


async def test_memory_durability_reaches_the_log_too(api: Api, cluster: LocalCluster) -> None:
    s = sid()
    assert (await api.call("POST", "/v1/sessions", {"id": s}, headers={"Durability": "memory"}))[0] == 201
    assert (await api.call("PATCH", f"/v1/sessions/{s}", {"a": 1}, headers={"Durability": "memory"}))[0] == 200

    async def both_in_the_log() -> bool:
        return len(await events_of(cluster, s)) >= 2

    # No history call here: it would flush the queue itself. The replicator's own sending must get them there.
    await wait_until(both_in_the_log, timeout_s=10, what="the memory-durability events to reach Kafka")
    assert [e["op"] for e in await events_of(cluster, s)] == ["create", "patch"]


async def test_if_match_makes_a_write_conditional(api: Api, cluster: LocalCluster) -> None:
    s = sid()
    await api.call("POST", "/v1/sessions", {"id": s, "data": {"n": 0}}, headers={"Durability": "log"})
    status, body, headers = await api.call("PATCH", f"/v1/sessions/{s}", {"n": 1},
                                           headers={"If-Match": '"1"', "Durability": "log"})
    assert status == 200 and headers["ETag"] == '"2"'
    status, body, _ = await api.call("PATCH", f"/v1/sessions/{s}", {"n": 99}, headers={"If-Match": '"1"'})
    assert status == 412 and body["error"] == "precondition_failed" and body["current"] == 2
    assert (await api.call("GET", f"/v1/sessions/{s}"))[1]["data"] == {"n": 1}
    await log_barrier(api, s)  # a (wrongly) queued event of the refused write would now be in Kafka
    assert [(e["op"], e["ver"]) for e in await events_of(cluster, s)] == [("create", 1), ("patch", 2)]


async def test_idempotency_key_applies_once_and_returns_the_first_answer(api: Api, cluster: LocalCluster) -> None:
    s = sid()
    await api.call("POST", "/v1/sessions", {"id": s})
    item = {"items": ["hello"], "max_len": 10}
    first = await api.call("POST", f"/v1/sessions/{s}/lists/m", item, headers={"Idempotency-Key": "k1", "Durability": "log"})
    await api.call("PATCH", f"/v1/sessions/{s}", {"other": 1})
    again = await api.call("POST", f"/v1/sessions/{s}/lists/m", item, headers={"Idempotency-Key": "k1", "Durability": "log"})
    assert first[0] == again[0] == 200
    assert again[1] == first[1]  # the first answer, not the current state
    assert again[2].get("Idempotent-Replayed") == "true"
    status, body, _ = await api.call("GET", f"/v1/sessions/{s}")
    assert body["data"]["m"] == ["hello"] and body["version"] == 3
    status, body, _ = await api.call("POST", f"/v1/sessions/{s}/lists/m", {"items": ["other"]},
                                     headers={"Idempotency-Key": "k1"})
    assert status == 409 and body["error"] == "idempotency_key_reused"
    await log_barrier(api, s)  # every change answered so far, and any wrongly queued one, is in Kafka now
    assert [e["op"] for e in await events_of(cluster, s)] == ["create", "append", "patch"]


async def test_ttl_expiry_removes_the_session_and_logs_it(api: Api, cluster: LocalCluster) -> None:
    s = sid()
    status, created, _ = await api.call("POST", "/v1/sessions", {"id": s, "ttl_s": 3})
    assert status == 201
    # Time itself is what a TTL test waits for: the points below are read off the session's
    # own expires_at (the server's clock, this machine's), not guessed with sleeps.
    await wait_until(lambda: time.time() >= created["expires_at"] - 1.5, what="half the TTL to pass")
    status, touched, _ = await api.call("PATCH", f"/v1/sessions/{s}", {"touch": 1})
    assert status == 200 and touched["expires_at"] >= created["expires_at"] + 1.4  # a write slides the TTL
    await wait_until(lambda: time.time() > created["expires_at"] + 0.1, what="the first expiry to pass")
    status, body, _ = await api.call("GET", f"/v1/sessions/{s}")
    assert status == 200 and body["version"] == 2, body  # alive past its first expiry: the write slid it

    assert [e["op"] for e in await events_of(cluster, s)] == ["create", "patch"]

    async def expired_in_the_log() -> bool:
        return await raw_count(cluster, s) == 3

    await wait_until(expired_in_the_log, timeout_s=15, interval_s=0.1, what="the expire event")
    assert await events_of(cluster, s) == []  # create, patch, expire: sealed under the erased key
    assert (await api.call("GET", f"/v1/sessions/{s}"))[0] == 404


async def test_unknown_route_is_a_json_404(api: Api) -> None:
    status, body, headers = await api.call("GET", "/v2/nothing")
    assert status == 404 and body["error"] == "not_found" and "Server" not in headers


async def test_prefer_return_minimal_answers_without_the_data(api: Api) -> None:
    """RFC 7240 through the router: it passes Prefer to the node and Preference-Applied back."""
    minimal = {"Prefer": "return=minimal"}
    s = sid()
    status, body, headers = await api.call("POST", "/v1/sessions", {"id": s, "data": {"big": "x" * 500}},
                                           headers=minimal)
    assert status == 201 and set(body) == {"id", "version", "expires_at"}
    assert body["id"] == s and body["version"] == 1 and headers["Preference-Applied"] == "return=minimal"
    assert "Server" not in headers  # no version disclosure, from the router or the node
    for i in range(3):
        status, body, headers = await api.call("POST", f"/v1/sessions/{s}/lists/messages",
                                               {"items": [f"m{i}"], "max_len": 2}, headers=minimal)
        assert status == 200 and body == {"version": i + 2, "expires_at": body["expires_at"]}  # no id either
        assert headers["ETag"] == f'"{i + 2}"' and headers["Preference-Applied"] == "return=minimal"
        # the shard is derivable from the id: only full answers carry it
        assert "X-Stickystate-Shard" not in headers and headers["X-Stickystate-Owner"] and headers["X-Stickystate-Epoch"]
    # the write was applied in full; only the answer was small
    status, body, headers = await api.call("GET", f"/v1/sessions/{s}", headers=minimal)
    assert status == 200 and body["data"] == {"big": "x" * 500, "messages": ["m1", "m2"]}
    assert "Preference-Applied" not in headers  # reads always return the session
    for op in (("PATCH", f"/v1/sessions/{s}", {"a": 1}), ("PUT", f"/v1/sessions/{s}/keys/k", 2),
               ("DELETE", f"/v1/sessions/{s}/keys/k", None), ("PUT", f"/v1/sessions/{s}", {"b": 3})):
        status, body, headers = await api.call(*op, headers={"Prefer": 'respond-async, RETURN="Minimal"; x=1'})
        assert status == 200 and set(body) == {"version", "expires_at"}, op
        assert headers["Preference-Applied"] == "return=minimal"
    # no preference, or another one: the whole session, no Preference-Applied
    for hdrs in ({}, {"Prefer": "return=representation"}, {"Prefer": "return=representation, return=minimal"},
                 {"Prefer": "handling=lenient"}):
        status, body, headers = await api.call("PATCH", f"/v1/sessions/{s}", {"c": 4}, headers=hdrs)
        assert status == 200 and body["data"]["b"] == 3 and "Preference-Applied" not in headers, hdrs
        assert headers["X-Stickystate-Shard"].isdigit(), hdrs
    status, body, headers = await api.call("DELETE", f"/v1/sessions/{s}", headers=minimal)
    assert status == 204 and body is None and "Preference-Applied" not in headers


async def test_prefer_minimal_on_a_generated_id_and_an_idempotent_replay(api: Api) -> None:
    status, body, _ = await api.call("POST", "/v1/sessions", headers={"Prefer": "return=minimal"})
    assert status == 201 and len(body["id"]) >= 22 and body["version"] == 1  # the client learns its id
    s = body["id"]
    append = {"items": ["once"], "max_len": 5}
    first = await api.call("POST", f"/v1/sessions/{s}/lists/m", append,
                           headers={"Idempotency-Key": "pm-1", "Prefer": "return=minimal"})
    assert first[0] == 200 and first[1]["version"] == 2
    # a replay is rendered as the repeat asks: the stored first answer, minimal or whole
    again = await api.call("POST", f"/v1/sessions/{s}/lists/m", append,
                           headers={"Idempotency-Key": "pm-1", "Prefer": "return=minimal"})
    assert again[1] == first[1] and again[2]["Idempotent-Replayed"] == "true"
    full = await api.call("POST", f"/v1/sessions/{s}/lists/m", append, headers={"Idempotency-Key": "pm-1"})
    assert full[1]["version"] == 2 and full[1]["data"] == {"m": ["once"]}
