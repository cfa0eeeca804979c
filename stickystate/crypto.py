"""Encryption at rest, pure (no I/O but reading a key file; no asyncio, no Kafka).

Crypto-shredding: every value written for a session (its ``changes`` events and its
``snapshots``) is sealed with AES-256-GCM under the session's own 256-bit data key;
data keys are stored wrapped (AES-256-GCM again) under a master key in the compacted
``keys`` topic (replicator/keys.py). Deleting a data key erases every record sealed
under it, wherever the log was copied.

A sealed record value::

    0x01  kind(1)  gen(8)  koff(8)  ver(8)  nonce(12)  ciphertext+tag

- ``kind``: ``c`` a change event, ``s`` a snapshot: the role of the topic, bound in so
  a record cannot be moved from one topic to the other (the role, not the topic's name,
  so a mirrored topic with another name still decodes);
- ``gen``: the data key's generation (random, 63 bits): a session created again with
  the same id gets a new key, and its old records stay unreadable;
- ``koff``: the offset of the data key's record in the shard's ``keys`` partition: a
  reader that has read past it and does not hold the key knows the key is erased (not
  merely not read yet);
- ``ver``: the session's version the record holds (an event's resulting version, a
  snapshot's state version).

The associated data is the whole header (nonce included) plus the session id (from the
record's key), so a record moved to another session, replayed as another version or
generation, or with any byte changed fails authentication: ``Tampered``. A fresh random
96-bit nonce per record: with at most 2^32 records per key, the collision risk stays
far below NIST's 2^-32 bound.

Master keys: ``kid:base64`` entries (a 256-bit key each); the last one wraps new data
keys, every one unwraps. A wrapped data key::

    0x01  len(kid)(1)  kid  nonce(12)  ciphertext+tag     (AD: "stickystate-key", sid, gen)
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT = 1
CHANGE = b"c"
SNAPSHOT = b"s"
HEADER = struct.Struct(">Bc3Q")  # format, kind, gen, koff, ver
NONCE_BYTES = 12
SEALED_HEADER_BYTES = HEADER.size + NONCE_BYTES
KEY_BYTES = 32
KID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class CryptoError(ValueError):
    pass


class Tampered(CryptoError):
    """A sealed record or wrapped key failed authentication: changed, moved or forged."""


class UnknownMasterKey(CryptoError):
    """A wrapped key names a master key id this process was not given."""


@dataclass(frozen=True)
class Header:
    kind: bytes
    gen: int
    koff: int
    ver: int


def is_sealed(value: bytes) -> bool:
    return bool(value) and value[0] == FORMAT


def header_of(value: bytes) -> Header:
    """The plaintext header of a sealed value (not authenticated until ``open_record``)."""
    if len(value) < SEALED_HEADER_BYTES + 16 or value[0] != FORMAT:
        raise Tampered("not a sealed record of format 1")
    _, kind, gen, koff, ver = HEADER.unpack_from(value)
    return Header(kind, gen, koff, ver)


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def new_generation() -> int:
    return secrets.randbits(63) or 1


def seal(data_key: bytes | AESGCM, kind: bytes, sid: str, gen: int, koff: int, ver: int, plaintext: bytes) -> bytes:
    head = HEADER.pack(FORMAT, kind, gen, koff, ver) + os.urandom(NONCE_BYTES)
    aead = data_key if isinstance(data_key, AESGCM) else AESGCM(data_key)
    return head + aead.encrypt(head[HEADER.size:], plaintext, head + sid.encode())


def open_record(data_key: bytes | AESGCM, kind: bytes, sid: str, value: bytes) -> bytes:
    """The plaintext of a sealed value for session ``sid``; Tampered if anything does not match."""
    if len(value) < SEALED_HEADER_BYTES + 16 or value[0] != FORMAT or value[1:2] != kind:
        raise Tampered(f"not a sealed {kind.decode()!r} record")
    head = value[:SEALED_HEADER_BYTES]
    aead = data_key if isinstance(data_key, AESGCM) else AESGCM(data_key)
    try:
        return aead.decrypt(head[HEADER.size:], value[SEALED_HEADER_BYTES:], head + sid.encode())
    except InvalidTag:
        raise Tampered(f"record of session {sid!r} failed authentication") from None


# -- master keys ------------------------------------------------------------------------
@dataclass(frozen=True)
class MasterKeys:
    """Master keys in the order given: the last one wraps, all of them unwrap."""

    keys: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise CryptoError("no master key")
        for kid, key in self.keys:
            if not KID_PATTERN.match(kid):
                raise CryptoError(f"master key id {kid!r} must be 1-64 of [A-Za-z0-9._-]")
            if len(key) != KEY_BYTES:
                raise CryptoError(f"master key {kid!r} must be 32 bytes (256 bits), got {len(key)}")

    @property
    def current(self) -> str:
        return self.keys[-1][0]

    def get(self, kid: str) -> bytes:
        for k, key in self.keys:
            if k == kid:
                return key
        raise UnknownMasterKey(f"master key {kid!r} is not configured")


def parse_master_keys(spec: str) -> MasterKeys:
    """``kid:base64[,kid:base64...]`` (commas or newlines; ``#`` comments); newest last."""
    entries = []
    for line in spec.replace(",", "\n").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kid, sep, b64 = line.partition(":")
        if not sep:
            raise CryptoError("a master key entry is kid:base64")
        try:
            key = base64.b64decode(b64.strip(), validate=True)
        except ValueError:
            raise CryptoError(f"master key {kid.strip()!r} is not valid base64") from None
        entries.append((kid.strip(), key))
    if len({kid for kid, _ in entries}) != len(entries):
        raise CryptoError("a master key id occurs twice")
    return MasterKeys(tuple(entries))


def load_master_keys_file(path: str | Path) -> MasterKeys:
    """Read master keys from a file only its owner may read or write (mode 0600 or stricter)."""
    p = Path(path)
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CryptoError(f"{p}: master key file must not be accessible to group or others "
                          f"(mode {stat.S_IMODE(mode):04o}; chmod 600 it)")
    return parse_master_keys(p.read_text())


def new_master_key_entry(kid: str) -> str:
    return f"{kid}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"


def write_master_keys_file(path: str | Path, spec: str) -> None:
    """Create (or replace) a key file with mode 0600 from the start."""
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(spec.replace(",", "\n") + "\n")
    os.chmod(p, 0o600)


def _key_ad(sid: str, gen: int) -> bytes:
    return b"stickystate-key\x00" + sid.encode() + b"\x00" + str(gen).encode()


def wrap(master: MasterKeys, data_key: bytes, sid: str, gen: int) -> bytes:
    kid = master.current
    nonce = os.urandom(NONCE_BYTES)
    ct = AESGCM(master.get(kid)).encrypt(nonce, data_key, _key_ad(sid, gen))
    return bytes([FORMAT, len(kid)]) + kid.encode() + nonce + ct


def wrapped_kid(value: bytes) -> str:
    if len(value) < 2 or value[0] != FORMAT:
        raise Tampered("not a wrapped key of format 1")
    return value[2:2 + value[1]].decode("ascii", "replace")


def unwrap(master: MasterKeys, value: bytes, sid: str, gen: int) -> bytes:
    kid = wrapped_kid(value)
    rest = value[2 + value[1]:]
    try:
        key = AESGCM(master.get(kid)).decrypt(rest[:NONCE_BYTES], rest[NONCE_BYTES:], _key_ad(sid, gen))
    except InvalidTag:
        raise Tampered(f"wrapped key of session {sid!r} failed authentication") from None
    if len(key) != KEY_BYTES:
        raise Tampered("wrapped key has the wrong size")
    return key
