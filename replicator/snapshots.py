"""Snapshots of sessions in the compacted ``snapshots`` topic: wire format, choice, loading.

Partition = shard, as for ``changes``. Record keys (UTF-8) and values (orjson):

- ``<sid>@<epoch>``: the full state of session ``sid`` as of ``changes`` offset
  ``offset`` (every event of the session at or before it is in the state, none after),
  written by the owner of the shard's epoch ``epoch``:
  ``{"sid", "state", "offset", "epoch", "node", "at", "idem": [[key, fingerprint, status], ...]}``.
  A null value (tombstone) when the session was deleted or expired, and when the
  records of an older epoch are cleaned up.
- ``#checkpoint@<epoch>``: ``{"op": "checkpoint", "epoch", "node", "replay_from", "at"}``:
  every ``changes`` event of the shard before offset ``replay_from`` is covered by
  the snapshots of this epoch written before this record. ``#`` cannot occur in a
  session id, so the key space cannot collide.

Why the epoch is part of the key: a paused old owner (a zombie) may still write a
snapshot after a new owner took the shard. Under compaction the last record of a key
wins, so with the session id alone as key the zombie's record could replace the new
owner's and a reader would silently lose the events between them. With the epoch in
the key, each epoch's records have a single writer, and a reader uses only the records
of the highest epoch that has a checkpoint (the new owner writes a full set of its
shard's sessions, then its checkpoint, before it cleans older epochs' keys up).

Rebuild of a shard = the chosen epoch's snapshots + the ``changes`` events from
``replay_from`` on, skipping each session's events at or below its snapshot's offset.
The pure part (``choose``) is separate from the Kafka reading (``SnapshotReader``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import TopicPartition

from stickystate.replicator.scan import SharedConsumer, scan
from stickystate.replicator.settings import ReplicatorSettings

CHECKPOINT = "#checkpoint"

# (sid, value) -> the decoded snapshot; with encryption it opens the sealed value
# (replicator/keys.py Codec.decode_snapshot), and None (in choose) keeps the raw values
Opener = Callable[[str, bytes], dict[str, Any]]


def plain(sid: str, value: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(value)
    return doc


def session_key(sid: str, epoch: int) -> bytes:
    return f"{sid}@{epoch}".encode()


def checkpoint_key(epoch: int) -> bytes:
    return f"{CHECKPOINT}@{epoch}".encode()


def parse_key(key: bytes | None) -> tuple[str, int] | None:
    """``(sid or "#checkpoint", epoch)``, or None for a key that is not ours."""
    if not key:
        return None
    name, sep, epoch = key.decode("utf-8", "replace").rpartition("@")
    if not sep or not name or not epoch.isdigit():
        return None
    return name, int(epoch)


def encode_snapshot(sid: str, state: dict[str, Any], offset: int, epoch: int, node: str, at: float,
                    idem: list[list[Any]] | None = None) -> bytes:
    doc: dict[str, Any] = {"sid": sid, "state": state, "offset": offset, "epoch": epoch, "node": node, "at": at}
    if idem:
        doc["idem"] = idem
    return orjson.dumps(doc)


def encode_checkpoint(epoch: int, node: str, replay_from: int, at: float) -> bytes:
    return orjson.dumps({"op": "checkpoint", "epoch": epoch, "node": node, "replay_from": replay_from, "at": at})


@dataclass
class Loaded:
    """What a shard is rebuilt from: a checkpoint and its epoch's snapshots."""

    epoch: int = 0  # the checkpoint's epoch (0: no checkpoint, replay the whole partition)
    node: str | None = None  # the checkpoint's writer = owner at ``replay_from``
    replay_from: int = 0
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)  # sid -> decoded snapshot record
    raw: dict[str, bytes] = field(default_factory=dict)  # sid -> its value, when no opener decoded them
    records_read: int = 0
    other_epoch_keys: list[bytes] = field(default_factory=list)  # live keys of other epochs (to clean up)
    seconds: float = 0.0


def choose(latest: dict[bytes, bytes | None], records_read: int = 0, opener: Opener | None = plain) -> Loaded:
    """Pick the highest epoch with a checkpoint and decode that epoch's snapshots
    (``opener`` None: keep them raw in ``Loaded.raw``).

    ``latest`` maps each key to its last value in partition order (what compaction keeps).
    """
    checkpoints: dict[int, bytes] = {}
    for key, value in latest.items():
        parsed = parse_key(key)
        if parsed is not None and parsed[0] == CHECKPOINT and value is not None:
            checkpoints[parsed[1]] = value
    out = Loaded(records_read=records_read)
    if not checkpoints:
        out.other_epoch_keys = [k for k, v in latest.items() if v is not None]
        return out
    epoch = max(checkpoints)
    cp = orjson.loads(checkpoints[epoch])
    out.epoch, out.node, out.replay_from = epoch, cp["node"], int(cp["replay_from"])
    for key, value in latest.items():
        parsed = parse_key(key)
        if parsed is None or value is None:
            continue
        name, key_epoch = parsed
        if key_epoch != epoch:
            out.other_epoch_keys.append(key)
        elif name != CHECKPOINT:
            if opener is None:
                out.raw[name] = value
            else:
                out.snapshots[name] = opener(name, value)
    return out


class SnapshotReader:
    """Reads whole partitions of the snapshots topic (they are compacted: about one
    record per live session and epoch). One consumer per node process, shared."""

    def __init__(self, settings: ReplicatorSettings, client_id: str) -> None:
        self.settings = settings
        self._reader = SharedConsumer(settings, client_id, fetch_max_wait_ms=10,
                                      max_partition_fetch_bytes=8 * 1024 * 1024)

    async def stop(self) -> None:
        await self._reader.stop()

    async def load(self, shard: int, timeout_s: float = 60.0, opener: Opener | None = plain) -> Loaded:
        started = time.monotonic()
        latest, n = await asyncio.wait_for(self._read(shard), timeout_s)
        out = choose(latest, n, opener)
        out.seconds = time.monotonic() - started
        return out

    async def changes_start(self, shard: int) -> int:
        """The first offset still in the shard's ``changes`` partition (retention)."""
        async with self._reader.use() as consumer:
            tp = TopicPartition(self.settings.changes_topic, shard)
            return (await consumer.beginning_offsets([tp]))[tp]

    async def _read(self, shard: int) -> tuple[dict[bytes, bytes | None], int]:
        """The last value of every key (what compaction keeps), and the records read."""
        latest: dict[bytes, bytes | None] = {}
        n = 0
        async with self._reader.use() as consumer:
            tp = TopicPartition(self.settings.snapshots_topic, shard)
            end = (await consumer.end_offsets([tp]))[tp]
            async for rec in scan(consumer, tp, end, max_records=10_000):
                if rec.key is not None:
                    latest[rec.key] = rec.value
                    n += 1
        return latest, n
