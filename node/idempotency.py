"""A shard's idempotency cache, pure (no I/O, no asyncio): what a retried write answers.

Owns the records of the last ``IDEM_PER_SHARD`` writes that carried an Idempotency-Key
(``records``, oldest first) and, per session, its most recent keys (``recent``: they go
into the session's snapshot, so a key outlives a failover). The owner fills it from its
live writes, a standby and a rebuild from the events they apply (the events carry the
key) and from loaded snapshots.

A record is a plain tuple (fingerprint, status, state, epoch, delivery), so that the
cyclic GC stops tracking it once it holds only atomic values (no state, its delivery
settled to an offset). The cache holds up to IDEM_PER_SHARD of them per shard, as owner
and as standby; as objects holding the state after the write and the event, they made
the node's full collections walk millions of objects (0.1-0.5 s pauses).
  state: the state right after the write (immutable: apply is copy-on-write); None for
         a router key, and on a standby until promotion
  epoch: of the write's event (None: loaded from a snapshot)
  delivery: live writes: the replication future, so a retry waits for the same log
         ack; once it succeeded, the offset it got (an int)
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stickystate.node.ops import Op, Session
from stickystate.protocol import RETRY_KEY_PREFIXES  # keys a router or client adds: their records keep no state

IDEM_PER_SHARD = 4096
IDEM_PER_SESSION_SNAPSHOT = 8  # idempotency keys kept in a session's snapshot (recent writes only)

STATUS_OF_OP = {"create": 201, "delete": 204}

IdemEntry = tuple[Any, ...]
FP, STATUS, STATE, EPOCH, DELIVERY = range(5)


@dataclass(slots=True)
class IdempotencyCache:
    # (sid, key) -> record (module docstring), least recently written first
    records: OrderedDict[tuple[str, str], IdemEntry] = field(default_factory=OrderedDict)
    recent: dict[str, deque[str]] = field(default_factory=dict)  # sid -> its recent keys, oldest first

    def remember(self, event: Op, state: Session | None) -> None:
        """Record a write (live or replayed) whose event carries a key; ``state``: after it."""
        idem = event.get("idem")
        if not idem:
            return
        key = (event["sid"], idem[0])
        status = 201 if event["op"] == "replace" and event.get("ver") == 1 else STATUS_OF_OP.get(event["op"], 200)
        light = idem[0].startswith(RETRY_KEY_PREFIXES)
        records = self.records
        records[key] = (idem[1], status, None if light else state, event.get("epoch"), None)
        records.move_to_end(key)
        while len(records) > IDEM_PER_SHARD:
            records.popitem(last=False)
        recent = self.recent.get(key[0])
        if recent is None:
            recent = self.recent[key[0]] = deque(maxlen=IDEM_PER_SESSION_SNAPSHOT)
        recent.append(idem[0])

    def answered(self, key: tuple[str, str], status: int, delivery: asyncio.Future[int] | None) -> None:
        """A live write's answer and its replication future, on the record ``remember`` made."""
        fp, _, state, epoch, _ = self.records[key]
        self.records[key] = (fp, status, state, epoch, delivery)

    def settle(self, key: tuple[str, str], delivery: asyncio.Future[int]) -> None:
        """A cached write's event is in Kafka: keep its offset instead of the future (a
        record of atomic values only is not tracked by the cyclic GC)."""
        entry = self.records.get(key)
        if entry is not None and entry[DELIVERY] is delivery and not delivery.cancelled() and delivery.exception() is None:
            self.records[key] = (*entry[:DELIVERY], delivery.result())

    def forget_session(self, sid: str) -> None:
        """The session is gone: its keys no longer go into a snapshot (their records age out)."""
        self.recent.pop(sid, None)

    def erase(self, sid: str) -> None:
        """The session is erased: drop its records (they may hold its state), but a
        delete's (it holds none, and a retried delete answers as the first did)."""
        self.recent.pop(sid, None)
        for key in [k for k, entry in self.records.items() if k[0] == sid and entry[STATUS] != 204]:
            del self.records[key]

    def of_session(self, sid: str) -> list[list[Any]]:
        """The session's recent keys as a snapshot keeps them: [key, fingerprint, status]."""
        out = []
        for key in self.recent.get(sid, ()):
            entry = self.records.get((sid, key))
            if entry is not None:
                out.append([key, entry[FP], entry[STATUS]])
        return out

    def load(self, sid: str, keys: Iterable[list[Any]], state: Session | None) -> None:
        """A snapshot's keys of ``sid`` ([key, fingerprint, status]); ``state``: the snapshot's
        state (None in the compact standby form)."""
        for key, fp, status in keys:
            self.records[(sid, key)] = (fp, status, state, None, None)
            self.recent.setdefault(sid, deque(maxlen=IDEM_PER_SESSION_SNAPSHOT)).append(key)

    def fill_states(self, sessions: Mapping[str, Session]) -> None:
        """Promotion: records of client keys answer with the state as of now."""
        for key, entry in list(self.records.items()):
            if entry[STATE] is None and entry[STATUS] != 204 and not key[1].startswith(RETRY_KEY_PREFIXES):
                self.records[key] = (*entry[:STATE], sessions.get(key[0]), *entry[STATE + 1:])

    def drop_states(self) -> None:
        """Back to the compact standby form: records keep no state."""
        for key, entry in list(self.records.items()):
            if entry[STATE] is not None:
                self.records[key] = (*entry[:STATE], None, *entry[STATE + 1:])

    def reset(self) -> None:
        self.records.clear()
        self.recent.clear()
