"""Test helpers: an HTTP client for the router, a raw reader of a Kafka partition, and
an owned Shard for the pure tests."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict
from aiokafka import AIOKafkaConsumer, TopicPartition

from stickystate.node.shard import Shard
from stickystate.replicator.events import decode


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


async def read_partition(bootstrap: str, topic: str, partition: int) -> list[tuple[int, bytes | None, dict[str, Any]]]:
    """Every change event of one partition up to its end offset now: (offset, key, event)."""
    return [(offset, key, decode(value)) for offset, key, value in await read_records(bootstrap, topic, partition)]


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
