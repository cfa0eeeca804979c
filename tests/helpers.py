"""Test helpers: an HTTP client for the router, a raw reader of a Kafka partition, an
owned Shard for the pure tests, and ways to wait for a condition instead of sleeping."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from types import SimpleNamespace
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict
from aiokafka import AIOKafkaConsumer, TopicPartition

from stickystate.crypto import parse_master_keys
from stickystate.node.shard import Shard
from stickystate.replicator.keys import Codec, KeyErased, offline_codec
from stickystate.replicator.settings import ReplicatorSettings


async def read_records(bootstrap: str, topic: str, partition: int) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every record of one partition up to its end offset now: (offset, key, raw value)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        # seek_to_beginning() races with the reset that assign() starts; an explicit seek does not.
        consumer.seek(tp, 0)
        out: list[tuple[int, bytes | None, bytes | None]] = []
        while (await consumer.position(tp)) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            out.extend((rec.offset, rec.key, rec.value) for rec in batch.get(tp, []))
        return out
    finally:
        await consumer.stop()


async def codec_for(bootstrap: str, changes_topic: str, master_keys: str, partition: int) -> Codec:
    """What opens a cluster's sealed records of one shard at rest: its keys partition read now,
    unwrapped with the cluster's master keys (LocalCluster.master_keys)."""
    keys_topic = ReplicatorSettings(changes_topic=changes_topic).keys_topic
    records = [SimpleNamespace(partition=partition, offset=o, key=k, value=v)
               for o, k, v in await read_records(bootstrap, keys_topic, partition)]
    return offline_codec(parse_master_keys(master_keys) if master_keys else None, records, partition + 1)


async def read_partition(bootstrap: str, topic: str, partition: int,
                         master_keys: str = "") -> list[tuple[int, bytes | None, dict[str, Any]]]:
    """Every change event of one partition up to its end offset now: (offset, key, event),
    opened with the cluster's master keys (records of erased sessions left out)."""
    codec = await codec_for(bootstrap, topic, master_keys, partition)
    out = []
    for offset, key, value in await read_records(bootstrap, topic, partition):
        try:
            out.append((offset, key, codec.decode_change(partition, key, value)))
        except KeyErased:
            continue
    return out


class Api:
    """Thin JSON client: returns (status, body-or-None, headers)."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with self.http.request(method, self.base + path, data=data, headers=hdrs) as resp:
            payload = await resp.read()
            parsed = orjson.loads(payload) if payload else None
            return resp.status, parsed, CIMultiDict(resp.headers)  # type: ignore[return-value]


async def end_offset(bootstrap: str, topic: str, partition: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        return (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()


def owned_shard(claim_offset: int = 0) -> Shard:
    """Shard 0 as node n1 owns it at epoch 1, its claim read at ``claim_offset``."""
    shard = Shard(0)
    claim = {"op": "claim", "shard": 0, "epoch": 1, "node": "n1", "at": 0}
    assert shard.apply_record(claim_offset, claim, "n1", now=0.0) == "claim"
    shard.my_epoch = 1
    shard.start_owning()
    return shard


def wait_for(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout_s`` saying what was awaited."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.1)


# The log file of each broker the suite started, by bootstrap address (tests/conftest.py):
# for failure messages that need to say what the broker did (its log cleaner, say).
BROKER_LOGS: dict[str, Path] = {}


def broker_log_lines(bootstrap: str, pattern: str, last: int = 40) -> str:
    """The broker's last ``last`` log lines matching the regular expression ``pattern``."""
    path = BROKER_LOGS.get(bootstrap)
    if path is None:
        return f"(no log of the broker at {bootstrap}: not started by this suite)"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(broker log {path} unreadable: {exc})"
    hits = [line[:400] for line in lines if re.search(pattern, line)]
    return "\n".join(hits[-last:]) or f"(no line of {path} matches {pattern!r})"


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float = 60.0,
                     what: str = "condition", interval_s: float = 0.05) -> None:
    """``wait_for`` for coroutines: ``predicate`` may be sync or async."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(interval_s)


async def log_barrier(api: Api, sid: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Returns once every change the session's owner answered before this call is in
    Kafka: GET /history flushes the shard's replication queue before it reads the
    partition. After it, a change that was (wrongly) queued would be in the log, so
    "nothing was written" can be checked without sleeping. Returns the session's events."""
    status, body, _ = await api.call("GET", f"/v1/sessions/{sid}/history?limit=1000", headers=headers)
    assert status == 200, (status, body)
    return body["events"]  # type: ignore[no-any-return]


def unread_bytes(port: int) -> int:
    """Bytes received but not yet read by the process listening on ``port`` (summed over
    its established loopback connections, from /proc/net/tcp*). Lets a test wait until a
    request has reached a paused (SIGSTOPped) process instead of sleeping."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:  # 01: ESTABLISHED
                total += int(queues.split(":")[1], 16)
    return total
