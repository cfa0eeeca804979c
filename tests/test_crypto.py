"""Sealing, wrapping and the key ring, pure: what a reader does with a sealed record
(stickystate/crypto.py, replicator/keys.py). The same behaviour against a real broker is
in tests/test_erasure.py."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from stickystate import crypto
from stickystate.replicator import events
from stickystate.replicator.keys import Codec, KeyErased, KeyNotRead, KeyRing, Tampered, key_record_key


@dataclass
class Rec:
    offset: int
    key: bytes | None
    value: bytes | None


def master(*kids: str) -> crypto.MasterKeys:
    return crypto.parse_master_keys(",".join(crypto.new_master_key_entry(k) for k in kids))


def ring_with(m: crypto.MasterKeys, *sids: str, shard: int = 0) -> tuple[KeyRing, list[Rec]]:
    ring = KeyRing(m)
    recs = []
    for i, sid in enumerate(sids):
        gen = 1000 + i
        recs.append(Rec(i, key_record_key(sid, gen), crypto.wrap(m, crypto.new_data_key(), sid, gen)))
    ring.apply(shard, recs)
    return ring, recs


def event(sid: str, ver: int, text: str) -> dict[str, object]:
    return {"op": "append", "sid": sid, "ver": ver, "at": 1.0, "node": "n1", "epoch": 1, "field": "m",
            "items": [text]}


def test_a_sealed_event_round_trips_and_holds_no_plaintext() -> None:
    ring, _ = ring_with(master("k1"), "a")
    codec = Codec(ring)
    value = codec.encode_change(0, event("a", 1, "MARKER-xyz"))
    assert b"MARKER" not in value and b"append" not in value
    assert codec.decode_change(0, b"a", value)["items"] == ["MARKER-xyz"]


def test_a_record_moved_to_another_session_or_with_a_flipped_byte_is_refused() -> None:
    ring, _ = ring_with(master("k1"), "a", "b")
    codec = Codec(ring)
    value = codec.encode_change(0, event("a", 3, "x"))
    with pytest.raises(Tampered):
        codec.decode_change(0, b"b", value)  # under b's key: b's data key, a's associated data
    for i in range(len(value)):  # every byte: header (generation, key offset, version), nonce, ciphertext, tag
        flipped = bytearray(value)
        flipped[i] ^= 0x01
        with pytest.raises(Tampered):
            codec.decode_change(0, b"a", bytes(flipped))
    with pytest.raises(Tampered):  # a plaintext event where only sealed ones may be
        codec.decode_change(0, b"a", orjson.dumps(event("a", 3, "x")))


def test_a_version_or_kind_cannot_be_rewritten() -> None:
    ring, _ = ring_with(master("k1"), "a")
    codec = Codec(ring)
    value = bytearray(codec.encode_change(0, event("a", 3, "x")))
    value[crypto.HEADER.size - 1] = 9  # ver 3 -> 9 in the header
    with pytest.raises(Tampered):
        codec.decode_change(0, b"a", bytes(value))
    snap = codec.encode_snapshot(0, "a", 3, orjson.dumps({"sid": "a", "state": {}}))
    with pytest.raises(Tampered):  # a snapshot replayed as a change
        codec.decode_change(0, b"a", snap)


def test_an_erased_key_skips_and_an_unread_one_waits() -> None:
    m = master("k1")
    ring, recs = ring_with(m, "a")
    codec = Codec(ring)
    value = codec.encode_change(0, event("a", 1, "x"))
    erased: list[tuple[int, str]] = []
    ring.on_erased = lambda s, sid: erased.append((s, sid))
    ring.apply(0, [Rec(1, recs[0].key, None)])
    assert erased == [(0, "a")]
    with pytest.raises(KeyErased):
        codec.decode_change(0, b"a", value)
    # a record whose key lies past what was read: not yet, rather than gone
    other = KeyRing(m)
    other.shard(0).position = 0
    with pytest.raises(KeyNotRead):
        Codec(other).decode_change(0, b"a", value)


def test_a_key_erased_here_is_not_revived_by_its_record_read_back() -> None:
    m = master("k1")
    ring, recs = ring_with(m, "a")
    ring.erase(0, "a")
    ring.apply(0, [recs[0]])  # the follower reads the key record after the owner erased it
    assert ring.current(0, "a") is None
    ring.apply(0, [Rec(5, recs[0].key, None)])
    assert ring.shard(0).erased == set()


def test_rotation_old_wraps_still_open_and_new_ones_use_the_newest_key() -> None:
    old = master("k1")
    key = crypto.new_data_key()
    wrapped_old = crypto.wrap(old, key, "s", 7)
    rotated = crypto.MasterKeys(old.keys + master("k2").keys)
    assert crypto.wrapped_kid(crypto.wrap(rotated, key, "s", 7)) == "k2"
    assert crypto.unwrap(rotated, wrapped_old, "s", 7) == key
    with pytest.raises(crypto.UnknownMasterKey):
        crypto.unwrap(master("k3"), wrapped_old, "s", 7)
    with pytest.raises(crypto.Tampered):  # a wrapped key moved to another session
        crypto.unwrap(old, wrapped_old, "t", 7)


def test_claims_stay_plaintext_and_encryption_off_is_plain_json() -> None:
    ring, _ = ring_with(master("k1"), "a")
    claim = events.encode(events.claim(0, 2, "n1", 1.0))
    assert Codec(ring).decode_change(0, events.CLAIM_KEY, claim)["op"] == "claim"
    plain = Codec(None)
    value = plain.encode_change(0, event("a", 1, "x"))
    assert orjson.loads(value)["items"] == ["x"]
    with pytest.raises(Tampered):
        plain.decode_change(0, b"a", Codec(ring).encode_change(0, event("a", 1, "x")))


def test_master_keys_parse_and_the_file_must_be_private(tmp_path: Path) -> None:
    spec = crypto.new_master_key_entry("k1") + "\n# a comment\n" + crypto.new_master_key_entry("k2")
    path = tmp_path / "master.keys"
    crypto.write_master_keys_file(path, spec)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert crypto.load_master_keys_file(path).current == "k2"
    os.chmod(path, 0o644)
    with pytest.raises(crypto.CryptoError, match="group or others"):
        crypto.load_master_keys_file(path)
    for bad in ("k1", "k1:!!!", "k1:" + "QUFB", "bad id:" + crypto.new_master_key_entry("x").split(":")[1], ""):
        with pytest.raises(crypto.CryptoError):
            crypto.parse_master_keys(bad)


def test_a_node_without_a_master_key_refuses_to_start() -> None:
    """Encryption is on unless said otherwise; with no key the node stops before touching Kafka."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STICKYSTATE_")}
    args = [sys.executable, "-m", "stickystate.cli", "node", "--kafka-bootstrap", "127.0.0.1:1", "--auth", "open",
            "--port", "0"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no master key is configured" in proc.stderr, proc.stderr
    proc = subprocess.run(args, env=env | {"STICKYSTATE_MASTER_KEYS": "k1:short"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "master keys" in proc.stderr, proc.stderr
    proc = subprocess.run([*args, "--master-keys", "k1:" + "A" * 43 + "="], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "no longer accepted" in proc.stderr and "A" * 43 not in proc.stderr, proc.stderr


@dataclass
class TimedRec:
    offset: int
    key: bytes
    value: bytes | None
    timestamp: int


def test_a_roll_covers_the_newest_tombstone_not_only_the_oldest() -> None:
    """node/erasure.py appends "#roll" once the mark is older than the lag; Kafka rolls the
    active segment only if its first record is older than the lag. A roll sent for an older
    tombstone does not roll out a younger one that began a new segment: the mark must stay
    (a full suite run once left such a key uncompacted for good)."""
    from stickystate.replicator.keys import ROLL_KEY

    ring = KeyRing(master("k1"), roll_lag_ms=4000)
    ring.apply(0, [TimedRec(0, key_record_key("late", 1), None, 10_000)])
    assert ring.shard(0).unrolled_since_ms == 10_000
    ring.apply(0, [TimedRec(1, key_record_key("exp", 2), None, 15_000)])  # began a new segment
    assert ring.shard(0).unrolled_since_ms == 15_000  # the newest waits, not the oldest
    keys = ring.shard(0)
    keys.roll_sent_for_ms = 10_000  # a roll sent for the older one, as before the fix
    ring.apply(0, [TimedRec(2, ROLL_KEY, b"", 14_100)])  # too young to roll out the second
    assert keys.unrolled_since_ms == 15_000 and keys.roll_sent_for_ms is None  # so another roll is due
    ring.apply(0, [TimedRec(3, ROLL_KEY, b"", 19_100)])
    assert keys.unrolled_since_ms is None
