"""Per-session data keys: the ``keys`` topic, the in-memory key ring, and the codec that
seals and opens session records (stickystate/crypto.py holds the cryptography).

``keys`` topic (compacted; partition = shard, as for ``changes``): record key
``<sid>@<gen>`` (UTF-8; ``@`` never occurs in a session id), value the data key wrapped
under a master key; a tombstone (null value) erases it. Topic settings bound how long
a tombstoned key can remain on the broker's disk (replicator/topics.py, README
"Encryption and erasure").

``KeyRing`` (pure): the data keys of the shards this node holds, in memory only, fed
from the ``keys`` partitions in log order (``apply``) and by the owner's own new keys
(``add``); a tombstone drops the key and, if it was the session's current key, tells
the node (``on_erased``) so the session leaves memory (standbys included).

``Codec`` (pure): the one place a session record is sealed or opened. ``decode_change``
is what every reader of ``changes`` uses (replay, history, the chaos checker):
- a claim is plaintext;
- a record whose key was erased raises ``KeyErased`` (skip it: the session is gone);
- a record whose key record lies past what the ring has read raises ``KeyNotRead``
  (wait for the ``keys`` partition, then read it again);
- a record that fails authentication (changed, moved to another session, replayed as
  another version) raises ``Tampered`` (an ``events.BadEvent``: never apply it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stickystate import crypto
from stickystate.replicator import events

log = logging.getLogger("stickystate.replicator")


class KeyErased(LookupError):
    """The record's data key is gone: the session was deleted or expired."""


class KeyNotRead(LookupError):
    """The record's data key is further in the ``keys`` partition than has been read."""

    def __init__(self, shard: int, koff: int) -> None:
        super().__init__(f"shard {shard}: data key at keys offset {koff} not read yet")
        self.koff = koff


class Tampered(events.BadEvent):
    """A sealed record failed authentication, or a plaintext record where only sealed ones may be."""


ROLL_KEY = b"#roll"  # a record that only makes Kafka roll the active segment (node/erasure.py)


def key_record_key(sid: str, gen: int) -> bytes:
    return f"{sid}@{gen}".encode()


def parse_key_record_key(key: bytes | None) -> tuple[str, int] | None:
    if not key:
        return None
    sid, sep, gen = key.decode("utf-8", "replace").rpartition("@")
    if not sep or not sid or not gen.isdigit():
        return None
    return sid, int(gen)


@dataclass(slots=True)
class DataKey:
    gen: int
    koff: int  # offset of its record in the keys partition
    aead: AESGCM


@dataclass
class ShardKeys:
    keys: dict[tuple[str, int], DataKey] = field(default_factory=dict)
    current: dict[str, DataKey] = field(default_factory=dict)  # sid -> its key with the highest koff
    position: int = 0  # next offset of the keys partition to read
    erased: set[tuple[str, int]] = field(default_factory=set)  # erased here, tombstone not read back yet
    by_koff: dict[int, tuple[str, int]] = field(default_factory=dict)  # keys offset -> (sid, gen) of a live key
    # timestamp (ms) of the newest tombstone that no "#roll" read since has rolled out of the
    # active segment (node/erasure.py); None: none waiting
    unrolled_since_ms: int | None = None
    roll_sent_for_ms: int | None = None  # the mark a "#roll" was sent for (one roll per mark)


OnErased = Callable[[int, str], None]


class KeyRing:
    def __init__(self, master: crypto.MasterKeys, on_erased: OnErased | None = None,
                 roll_lag_ms: int | None = None) -> None:
        self.master = master
        self.on_erased = on_erased
        # The keys topic's max.compaction.lag.ms = segment.ms: a "#roll" rolls the active segment
        # only if that segment's first record is older than this (None: tools, no rolling)
        self.roll_lag_ms = roll_lag_ms
        self.shards: dict[int, ShardKeys] = {}
        self.refused_total = 0  # wrapped keys that did not unwrap (unknown master key, tampered)

    def shard(self, s: int) -> ShardKeys:
        keys = self.shards.get(s)
        if keys is None:
            keys = self.shards[s] = ShardKeys()
        return keys

    def drop_shard(self, s: int) -> None:
        self.shards.pop(s, None)

    def current(self, s: int, sid: str) -> DataKey | None:
        keys = self.shards.get(s)
        return None if keys is None else keys.current.get(sid)

    def add(self, s: int, sid: str, gen: int, koff: int, key: bytes) -> DataKey:
        """A key this node wrote (acknowledged at ``koff``)."""
        keys = self.shard(s)
        dk = DataKey(gen, koff, AESGCM(key))
        keys.keys[(sid, gen)] = dk
        keys.by_koff[koff] = (sid, gen)
        cur = keys.current.get(sid)
        if cur is None or cur.koff < koff:
            keys.current[sid] = dk
        return dk

    def erase(self, s: int, sid: str) -> list[int]:
        """Forget every key of ``sid`` held for shard ``s``; returns their generations."""
        keys = self.shards.get(s)
        if keys is None:
            return []
        keys.current.pop(sid, None)
        gens = [g for (k, g) in keys.keys if k == sid]
        for g in gens:
            keys.by_koff.pop(keys.keys.pop((sid, g)).koff, None)
            keys.erased.add((sid, g))  # its record, read back before its tombstone, must not revive it
        return gens

    def apply(self, s: int, records: Iterable[Any]) -> None:
        """Records of the shard's ``keys`` partition, in log order."""
        keys = self.shard(s)
        for rec in records:
            keys.position = max(keys.position, rec.offset + 1)
            parsed = parse_key_record_key(rec.key)
            if parsed is None:
                if rec.key == ROLL_KEY:
                    # It rolled the segment holding every tombstone at least the lag older than
                    # itself. A younger one (a tombstone that began a new segment shortly before)
                    # stays in the active segment: the mark stays, and another roll follows.
                    mark, ts = keys.unrolled_since_ms, getattr(rec, "timestamp", 0) or 0
                    if mark is not None and (self.roll_lag_ms is None or ts - mark > self.roll_lag_ms):
                        keys.unrolled_since_ms = None
                    else:
                        keys.roll_sent_for_ms = None  # not covered (or clocks apart): roll again
                continue
            sid, gen = parsed
            if rec.value is None:
                keys.unrolled_since_ms = max(keys.unrolled_since_ms or 0, getattr(rec, "timestamp", 0) or 0)
                keys.erased.discard((sid, gen))
                gone = keys.keys.pop((sid, gen), None)
                if gone is not None:
                    keys.by_koff.pop(gone.koff, None)
                cur = keys.current.get(sid)
                if cur is not None and cur.gen == gen:
                    del keys.current[sid]
                    if self.on_erased is not None:
                        self.on_erased(s, sid)
                continue
            if (sid, gen) in keys.erased:
                continue
            try:
                key = crypto.unwrap(self.master, rec.value, sid, gen)
            except crypto.CryptoError as exc:
                self.refused_total += 1
                log.error("data key refused", extra={"shard": s, "offset": rec.offset, "error": str(exc)})
                continue
            self.add(s, sid, gen, rec.offset, key)

    def count(self) -> int:
        return sum(len(k.keys) for k in self.shards.values())


class Codec:
    """Seals and opens session records; ``ring`` None: encryption is off (plaintext)."""

    def __init__(self, ring: KeyRing | None) -> None:
        self.ring = ring

    @property
    def encrypting(self) -> bool:
        return self.ring is not None

    # -- writing ------------------------------------------------------------------------
    def _key_for_write(self, s: int, sid: str) -> DataKey:
        assert self.ring is not None
        dk = self.ring.current(s, sid)
        if dk is None:
            raise KeyErased(f"no data key for session {sid!r}")
        return dk

    def encode_change(self, s: int, event: dict[str, Any]) -> bytes:
        plain = orjson.dumps(event)
        if self.ring is None:
            return plain
        sid = event["sid"]
        dk = self._key_for_write(s, sid)
        return crypto.seal(dk.aead, crypto.CHANGE, sid, dk.gen, dk.koff, event["ver"], plain)

    def encode_snapshot(self, s: int, sid: str, ver: int, plain: bytes) -> bytes:
        if self.ring is None:
            return plain
        dk = self._key_for_write(s, sid)
        return crypto.seal(dk.aead, crypto.SNAPSHOT, sid, dk.gen, dk.koff, ver, plain)

    # -- reading ------------------------------------------------------------------------
    def _open(self, s: int, kind: bytes, sid: str, value: bytes) -> bytes:
        if self.ring is None:
            if crypto.is_sealed(value):
                raise Tampered("sealed record, but encryption is off on this node")
            return value
        if not crypto.is_sealed(value):
            raise Tampered(f"plaintext record of session {sid!r}: every session record must be sealed")
        try:
            head = crypto.header_of(value)
        except crypto.Tampered as exc:
            raise Tampered(str(exc)) from None
        keys = self.ring.shards.get(s)
        dk = None if keys is None else keys.keys.get((sid, head.gen))
        if dk is None:
            if keys is None or head.koff >= keys.position:
                raise KeyNotRead(s, head.koff)
            holder = keys.by_koff.get(head.koff)
            if holder is not None:  # the key it names belongs to another session or generation: moved
                raise Tampered(f"record under the key of {sid!r} names the data key of {holder[0]!r}")
            raise KeyErased(f"data key of session {sid!r} generation {head.gen} is erased")
        try:
            return crypto.open_record(dk.aead, kind, sid, value)
        except crypto.Tampered as exc:
            raise Tampered(str(exc)) from None

    def decode_change(self, s: int, key: bytes | None, value: bytes | None) -> dict[str, Any]:
        """The event of a ``changes`` record of shard ``s`` (see the module docstring for what it raises)."""
        if key == events.CLAIM_KEY or value is None or key is None:
            return events.decode(value)
        sid = key.decode("utf-8", "replace")
        event = events.decode(self._open(s, crypto.CHANGE, sid, value))
        if event.get("sid") != sid:
            raise Tampered(f"event of session {event.get('sid')!r} under the key of {sid!r}")
        return event

    def decode_snapshot(self, s: int, sid: str, value: bytes) -> dict[str, Any]:
        doc = orjson.loads(self._open(s, crypto.SNAPSHOT, sid, value))
        if not isinstance(doc, dict) or doc.get("sid") != sid:
            raise Tampered(f"snapshot of another session under the key of {sid!r}")
        return doc


def offline_codec(master: crypto.MasterKeys | None, keys_records: Iterable[Any], partitions: int) -> Codec:
    """A codec for tools that read whole topics at rest (the chaos checker, tests, benches):
    every key among ``keys_records`` (records of the ``keys`` topic with ``.partition``,
    in offset order per partition), read to the end, so a key not among them is erased."""
    if master is None:
        return Codec(None)
    ring = KeyRing(master)
    by_part: dict[int, list[Any]] = {p: [] for p in range(partitions)}
    for rec in keys_records:
        by_part.setdefault(rec.partition, []).append(rec)
    for p, recs in by_part.items():
        ring.apply(p, recs)
        ring.shard(p).position = 2**63  # read to the end: what is missing is gone
    return Codec(ring)
