"""Encryption at rest and erasure, against the real broker (issue 14).

Every record a session leaves in Kafka is sealed under its own data key; the keys live
wrapped in the compacted keys topic; delete and expiry tombstone the key, after which no
node (also one that was down, also one rebuilt from nothing) can show the session again.
Pure behaviour (sealing, tampering, the key ring) is in tests/test_crypto.py.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stickystate import crypto
from stickystate.local_cluster import LocalCluster
from stickystate.protocol import shard_of
from stickystate.replicator.keys import ROLL_KEY, parse_key_record_key
from stickystate.replicator.settings import ReplicatorSettings
from tests.helpers import Api, broker_log_lines, log_barrier, read_partition, read_records, wait_for, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]  # each starts its own cluster, most restart every node

FAST_SNAPSHOTS = {"STICKYSTATE_SNAPSHOT_MAX_AGE_S": "1", "STICKYSTATE_SNAPSHOT_EVERY_EVENTS": "2",
                  "STICKYSTATE_KEYS_COMPACTION_LAG_MS": "4000"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def topics(c: LocalCluster) -> ReplicatorSettings:
    return ReplicatorSettings(changes_topic=c.topic)


async def raw_all(c: LocalCluster, topic: str) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Every record of every partition of ``topic``: (partition, offset, key, value), undecoded."""
    out = []
    for p in range(c.partitions):
        out += [(p, o, k, v) for o, k, v in await read_records(c.kafka_bootstrap, topic, p)]
    return out


async def conversation(api: Api, sid: str, marker: str, turns: int = 4, ttl_s: float = 600) -> None:
    status, _, _ = await api.call("POST", "/v1/sessions", {"id": sid, "data": {"user": marker, "messages": []},
                                                          "ttl_s": ttl_s})
    assert status == 201
    for i in range(turns):
        status, _, _ = await api.call("POST", f"/v1/sessions/{sid}/lists/messages",
                                      {"items": [f"{marker} turn {i}"], "max_len": 50},
                                      headers={"Durability": "log"})
        assert status == 200
    status, _, _ = await api.call("PATCH", f"/v1/sessions/{sid}", {"note": marker}, headers={"Durability": "log"})
    assert status == 200


async def snapshot_keys_of(c: LocalCluster, sid: str) -> list[bytes | None]:
    """Values of the session's snapshot records, in log order."""
    part = shard_of(sid, c.partitions)
    return [v for _, k, v in await read_records(c.kafka_bootstrap, topics(c).snapshots_topic, part)
            if k is not None and k.startswith(f"{sid}@".encode())]


async def all_snapshotted(c: LocalCluster, sids: list[str]) -> bool:
    for sid in sids:
        if not [v for v in await snapshot_keys_of(c, sid) if v is not None]:
            return False
    return True


async def key_records_of(c: LocalCluster, sid: str) -> list[tuple[int, bytes | None]]:
    part = shard_of(sid, c.partitions)
    out = []
    for o, k, v in await read_records(c.kafka_bootstrap, topics(c).keys_topic, part):
        parsed = parse_key_record_key(k)
        if parsed is not None and parsed[0] == sid:
            out.append((parsed[1], v))
    return out


async def keys_partitions_dump(c: LocalCluster, sids: list[str]) -> str:
    """For a failure message: the keys-partition records of ``sids`` and the "#roll" records
    (offset, key, tombstone?), and what the broker logged of those partitions."""
    keys_topic = topics(c).keys_topic
    out = []
    for part in sorted({shard_of(sid, c.partitions) for sid in sids}):
        mine = [(o, k, v is None) for o, k, v in await read_records(c.kafka_bootstrap, keys_topic, part)
                if k is not None and (k == ROLL_KEY or any(k.startswith(f"{sid}@".encode()) for sid in sids))]
        out.append(f"{keys_topic}-{part}: {mine}")
        out.append(broker_log_lines(c.kafka_bootstrap, re.escape(f"{keys_topic}-{part}") + r"(?!\d)"))
    return "\n".join(out)


def restart_everything_empty(c: LocalCluster) -> None:
    """Every node killed, then started again: each rebuilds its shards from the log alone."""
    for nid in c.node_ids():
        c.kill_node(nid)
    for nid in c.node_ids():
        c.start_node(nid)
    c.wait_ready(120)


def node_logs(c: LocalCluster) -> list[dict[str, Any]]:
    out = []
    for nid in c.node_ids():
        for line in Path(c.data_dir / f"{nid}.log").read_bytes().splitlines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return out


# -- 1. nothing of a session is readable at rest ---------------------------------------------
async def test_marker_strings_never_appear_in_any_raw_record_of_any_topic(start_cluster: Any) -> None:
    c = start_cluster(node_env=FAST_SNAPSHOTS)
    marker = "MARKER" + uuid.uuid4().hex
    sids = [new_id("mark") for _ in range(6)]
    async with aiohttp.ClientSession() as http:
        api = Api(http, c.router_url)
        for sid in sids:
            await conversation(api, sid, marker)
            status, _, _ = await api.call("PUT", f"/v1/sessions/{sid}/keys/otp?ttl_s=60", f"{marker}-key")
            assert status in (200, 201)
        for sid in sids:
            await log_barrier(api, sid)

    await wait_until(lambda: all_snapshotted(c, sids), timeout_s=30, what="every session's snapshot")
    t = topics(c)
    seen = 0
    for topic in (t.changes_topic, t.snapshots_topic, t.keys_topic):
        records = await raw_all(c, topic)
        assert records, topic
        seen += len(records)
        for p, o, k, v in records:
            assert marker.encode() not in (k or b"") and marker.encode() not in (v or b""), (topic, p, o)
            assert b"turn 0" not in (v or b""), (topic, p, o)
    # ... and the data is there, for whoever holds the keys: the marker is in what opens
    opened = await read_partition(c.kafka_bootstrap, c.topic, shard_of(sids[0], c.partitions), c.master_keys)
    assert any(marker in orjson.dumps(e).decode() for _, k, e in opened if k == sids[0].encode())
    assert seen > 6 * 6


# -- 2 and 3. delete and expiry erase, also after a full rebuild and on a node that was down ------
# Its own waits add up to more than the suite's 300 s per test (the log cleaner alone may take
# up to 300 s on a loaded machine): a run of the suite timed out here while the cleaner was
# still within its wait.
@pytest.mark.timeout(600)
async def test_delete_and_expiry_erase_the_session_from_every_rebuild(start_cluster: Any) -> None:
    c = start_cluster(node_env=FAST_SNAPSHOTS)
    t0 = time.monotonic()

    def step(what: str) -> None:  # shown with a failure: which wait took the time
        print(f"{time.monotonic() - t0:7.1f}s {what}", flush=True)

    deleted, expiring, kept, late = new_id("del"), new_id("exp"), new_id("keep"), new_id("late")
    async with aiohttp.ClientSession() as http:
        api = Api(http, c.router_url)
        for sid in (deleted, kept, late):
            await conversation(api, sid, "secret")
        await conversation(api, expiring, "secret", ttl_s=4)

        await wait_until(lambda: all_snapshotted(c, [deleted, late]), timeout_s=30,
                         what="snapshots of the sessions about to be deleted")

        # 3: a node is down while `late` is deleted; afterwards it alone rebuilds every shard
        down = c.node_ids()[0]
        c.kill_node(down)
        c.wait_ready(60)
        step("one node down, cluster ready")
        assert (await api.call("DELETE", f"/v1/sessions/{late}", headers={"Durability": "log"}))[0] == 204
        assert (await api.call("DELETE", f"/v1/sessions/{deleted}", headers={"Durability": "log"}))[0] == 204
        async def expired() -> bool:
            return (await api.call("GET", f"/v1/sessions/{expiring}"))[0] == 404

        await wait_until(expired, timeout_s=20, what="the session with ttl_s=4 to expire")
        for sid in (deleted, late, expiring):
            assert (await api.call("GET", f"/v1/sessions/{sid}"))[0] == 404

        async def keys_tombstoned() -> bool:
            for s in (deleted, late, expiring):
                recs = await key_records_of(c, s)
                if not recs or recs[-1][1] is not None:
                    return False
            return True

        await wait_until(keys_tombstoned, timeout_s=20, what="the erased sessions' key tombstones")
        step("tombstones in the keys topic")
        for nid in c.node_ids()[1:]:
            c.kill_node(nid)
        c.start_node(down)
        c.wait_ready(120)
        assert set(c.cluster_view()["shards"].values()) == {down}
        step("the restarted node alone serves every shard")
        for sid in (deleted, late, expiring):
            assert (await api.call("GET", f"/v1/sessions/{sid}"))[0] == 404, sid
            status, body, _ = await api.call("GET", f"/v1/sessions/{sid}/history")
            assert status == 200 and body["events"] == [], (sid, body)
        status, body, _ = await api.call("GET", f"/v1/sessions/{kept}")
        assert status == 200 and body["data"]["note"] == "secret"  # the control: rebuilt as ever

        # 2: every node restarted empty rebuilds from the log alone
        for nid in c.node_ids()[1:]:
            c.start_node(nid)
        c.wait_ready(120)
        restart_everything_empty(c)
        step("every node restarted empty")
        for sid in (deleted, late, expiring):
            assert (await api.call("GET", f"/v1/sessions/{sid}"))[0] == 404, sid
            status, body, _ = await api.call("GET", f"/v1/sessions/{sid}/history")
            assert status == 200 and body["events"] == [], (sid, body)
        status, body, _ = await api.call("GET", f"/v1/sessions/{kept}/history")
        assert status == 200 and len(body["events"]) == 6
        # the same id again: a new key, none of the old data
        status, body, _ = await api.call("POST", "/v1/sessions", {"id": deleted, "data": {"fresh": True}})
        assert status == 201 and body["data"] == {"fresh": True} and body["version"] == 1
        status, body, _ = await api.call("GET", f"/v1/sessions/{deleted}/history")
        assert [e["op"] for e in body["events"]] == ["create"], body
        # the history holds them still, unreadable: every record of the deleted lifetime is there
        part = shard_of(deleted, c.partitions)
        raw = [v for _, k, v in await read_records(c.kafka_bootstrap, c.topic, part) if k == deleted.encode()]
        assert len(raw) == 1 + 4 + 1 + 1 + 1  # create, 4 appends, patch, delete; the new create

    # raw keys: each erased key's last record is its tombstone (only the re-created session
    # has a live key: its new generation), and the topic carries the configured bound
    for sid in (deleted, late, expiring):
        recs = await key_records_of(c, sid)
        last = {g: v for g, v in recs}
        live = [g for g, v in last.items() if v is not None]
        assert len(last) == (2 if sid == deleted else 1) and len(live) == (1 if sid == deleted else 0), (sid, recs)
    # ... and after compaction no erased key at all: the owner appended "#roll" once the
    # tombstone was older than the lag (4 s here), the log cleaner then removed the wrapped keys
    async def compacted_away() -> bool:
        for sid in (deleted, late, expiring):
            recs = await key_records_of(c, sid)
            tombstoned = {g for g, v in recs if v is None}
            if any(v is not None and g in tombstoned for g, v in recs):
                return False
        return True

    # About 40 s alone; in a full suite run the broker's one cleaner thread also compacts every
    # other test's snapshots and keys topics and took longer than 120 s.
    step("waiting for the log cleaner")
    try:
        await wait_until(compacted_away, timeout_s=300, interval_s=1.0, what="the log cleaner to drop the erased key")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await keys_partitions_dump(c, [deleted, late, expiring])}") from None
    admin = AIOKafkaAdminClient(bootstrap_servers=c.kafka_bootstrap)
    await admin.start()
    try:
        desc = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topics(c).keys_topic)])
    finally:
        await admin.close()
    configs = {entry[0]: entry[1] for entry in desc[0].resources[0][4]}
    assert configs["cleanup.policy"] == "compact" and configs["max.compaction.lag.ms"] == "4000", configs
    step("done")


# -- 4. a forged record is refused, never applied --------------------------------------------
async def test_a_moved_or_flipped_changes_record_is_refused_on_replay(start_cluster: Any) -> None:
    c = start_cluster()
    victim = new_id("vic")
    part = shard_of(victim, c.partitions)
    other = next(s for s in (new_id("oth") for _ in range(10_000)) if shard_of(s, c.partitions) == part)
    async with aiohttp.ClientSession() as http:
        api = Api(http, c.router_url)
        await conversation(api, victim, "v", turns=2)
        await conversation(api, other, "o", turns=1)
        before = {s: (await api.call("GET", f"/v1/sessions/{s}"))[1] for s in (victim, other)}
        records = await read_records(c.kafka_bootstrap, c.topic, part)
        append = [v for _, k, v in records if k == victim.encode()][-2]  # an append of the victim
        assert append is not None
        flipped = bytearray(append)
        flipped[len(flipped) // 2] ^= 0x01
        producer = AIOKafkaProducer(bootstrap_servers=c.kafka_bootstrap)
        await producer.start()
        try:
            moved = await producer.send_and_wait(c.topic, append, key=other.encode(), partition=part)
            bad = await producer.send_and_wait(c.topic, bytes(flipped), key=victim.encode(), partition=part)
        finally:
            await producer.stop()
        forged = {moved.offset, bad.offset}
        restart_everything_empty(c)

        def refused() -> set[int]:
            return {line.get("offset") for line in node_logs(c)
                    if line.get("msg", line.get("message")) == "event refused" and line.get("shard") == part}

        wait_for(lambda: forged <= refused(), timeout_s=30, what="both forged records refused in a node's log")
        after = {s: (await api.call("GET", f"/v1/sessions/{s}"))[1] for s in (victim, other)}
        assert after == before
        status, body, _ = await api.call("GET", f"/v1/sessions/{other}/history")
        assert [e["op"] for e in body["events"]] == ["create", "append", "patch"]


# -- 5. master key rotation while running ------------------------------------------------------
async def test_master_key_rotation_keeps_old_and_new_sessions_readable(start_cluster: Any) -> None:
    k1 = crypto.new_master_key_entry("k1")
    c = start_cluster(master_keys=k1)
    old, new = new_id("old"), new_id("new")
    async with aiohttp.ClientSession() as http:
        api = Api(http, c.router_url)
        await conversation(api, old, "before rotation", turns=2)
        # rolling restart with k2 added (newest last): the cluster serves throughout
        c.master_keys = k1 + "," + crypto.new_master_key_entry("k2")
        for nid in c.node_ids():
            c.restart_node(nid)
            c.wait_ready(120)
            assert (await api.call("GET", f"/v1/sessions/{old}"))[0] == 200
        await conversation(api, new, "after rotation", turns=2)
        restart_everything_empty(c)
        for sid, text in ((old, "before rotation"), (new, "after rotation")):
            status, body, _ = await api.call("GET", f"/v1/sessions/{sid}")
            assert status == 200 and body["data"]["note"] == text
            status, body, _ = await api.call("GET", f"/v1/sessions/{sid}/history")
            assert len(body["events"]) == 4
    kids = {sid: {crypto.wrapped_kid(v) for _, v in await key_records_of(c, sid) if v is not None}
            for sid in (old, new)}
    assert kids == {old: {"k1"}, new: {"k2"}}

