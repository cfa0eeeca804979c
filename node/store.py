"""The node's session store: a thin facade over its parts (asyncio, no aiohttp).

Handlers in node/http.py and node/fastpath.py parse, call and render; they use the
store's public API (``serving_shard``, ``read``, ``write``, ``confirm``, ``assign``,
``drain``, ``start``, ``stop``, ``status``, ``ready``, ...). Each concern is a part
that owns its state and its background task, started and stopped here:

- node/roles.py        ``ShardRoles``: which shards are held in which role (shared)
- node/writes.py       ``Writes``: the gate every request passes, reads, the write path, confirm
- node/ownership.py    ``Ownership``: assignment, acquiring (claims), release, log -> memory
- node/bootstrap.py    ``Bootstraps``: loading a shard from snapshots, then following it
- node/verification.py ``OwnerVerification``: acknowledgements, holes, the owner check;
                       ``StallGuard``: stall detection and re-verification
- node/expiry.py       ``Expiry``: the TTL heap and its reaper
- node/snapshotting.py ``Snapshotting``: snapshot rounds, full sets, checkpoints, cleanup
- node/erasure.py      ``Erasure``: per-session data keys (the keys follower, the codec), erasure

The store itself owns the Kafka clients (one producer, one follower, the history and
snapshot readers: one each per process) and the node's lifecycle (drain, stop).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from stickystate.node.bootstrap import Bootstraps
from stickystate.node.erasure import Erasure
from stickystate.node.expiry import Expiry
from stickystate.node.ownership import Ownership
from stickystate.node.roles import ShardRoles
from stickystate.node.settings import NodeSettings
from stickystate.node.shard import Shard
from stickystate.node.snapshotting import Snapshotting
from stickystate.node.verification import OwnerVerification, StallGuard
from stickystate.node.watch import SharedLogReads, WatchHub
from stickystate.node.writes import WriteResult, Writes, fingerprint
from stickystate.replicator.follower import Follower
from stickystate.replicator.history import HistoryReader
from stickystate.replicator.producer import Replicator
from stickystate.replicator.snapshots import SnapshotReader

__all__ = ["Clock", "NodeStore", "WriteResult", "fingerprint"]  # node/http.py imports the last two from here

log = logging.getLogger("stickystate.node")

Clock = Callable[[], float]


class NodeStore:
    def __init__(self, settings: NodeSettings, clock: Clock = time.time) -> None:
        self.settings = settings
        self.me = settings.node_id
        self.clock = clock
        self.partitions = settings.replicator.partitions
        replication = settings.replication
        rep = settings.replicator
        self.replicator = Replicator(rep, client_id=f"stickystate-{self.me}", on_acked=self._on_acked)
        self.follower = Follower(rep, client_id=f"stickystate-{self.me}-follower", on_records=self._on_records)
        self.snapshot_reader = SnapshotReader(rep, client_id=f"stickystate-{self.me}-snapshots")
        replicating = self.replicator if replication else None
        self.roles = ShardRoles(self.partitions)
        self.erasure = Erasure(rep, settings.master_keys if settings.encryption else None, self.replicator,
                               self.roles, self.me)
        self.history = HistoryReader(rep, client_id=f"stickystate-{self.me}-history", codec=self.erasure.codec)
        self.verification = OwnerVerification(self.roles, self.follower)
        self.stall = StallGuard(self.roles, self.verification, self.follower, settings.hold_timeout_s)
        self.expiry = Expiry(self.roles, self.stall, replicating, self.me, clock, self.erasure)
        self.snapshotting = Snapshotting(self.roles, self.stall, self.replicator, self.snapshot_reader, self.me, clock,
                                         settings.snapshot_every_events, settings.snapshot_max_age_s,
                                         settings.recovery_timeout_s, self.erasure.codec)
        self.bootstraps = Bootstraps(self.roles, self.follower, self.snapshot_reader, settings.recovery_timeout_s,
                                     self.erasure)
        self.ownership = Ownership(self.roles, self.me, clock, self.replicator, self.follower, self.bootstraps,
                                   self.verification, self.expiry, self.snapshotting, replication,
                                   settings.recovery_timeout_s, rep.kafka_deadline_s, self.erasure)
        self.writes = Writes(self.roles, self.stall, self.verification, self.expiry, replicating, self.follower,
                             self.me, clock, settings.limits, settings.hold_timeout_s, rep.kafka_deadline_s,
                             self.erasure)
        # Watchers: told of every change, and of every shard this node stops owning.
        self.watch = WatchHub(settings.watch)
        self.watch.log_reads = SharedLogReads(self._watch_log)
        self.writes.on_change = self.expiry.on_change = self.watch.changed
        self.ownership.on_lost = self.watch.shard_lost
        # The request path, bound once: a call costs what it did before the split.
        self.serving_shard = self.writes.serving_shard
        self.read = self.writes.read
        self.write = self.writes.write
        self.confirm = self.writes.confirm
        self.assign = self.ownership.assign
        self.draining = False  # advertised to the router: move my shards away
        self.last_probe = 0.0  # monotonic time of the router's last status probe
        self.liveness_port: int | None = None  # set by node/server.py once its liveness echo is bound

    async def _watch_log(self, s: int, sids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The resumes' read (node/watch.py SharedLogReads): every retained event of each of
        ``sids`` as /history reads them, in one scan of the partition, after the shard's
        queued changes are in Kafka."""
        await self.replicator.flush([s], timeout_s=self.settings.replicator.kafka_deadline_s)
        return await self.history.read_sessions(s, sids)

    # the follower's and the producer's callbacks (the parts are made after the clients)
    def _on_records(self, s: int, records: Sequence[Any]) -> None:
        self.ownership.apply_records(s, records)

    def _on_acked(self, s: int, acked: list[tuple[int, Any]]) -> None:
        self.verification.on_acked(s, acked)

    # -- what is held ---------------------------------------------------------------
    @property
    def shards(self) -> dict[int, Shard]:
        return self.roles.shards

    @property
    def serving(self) -> set[int]:
        return self.roles.serving

    @property
    def recovering(self) -> dict[int, asyncio.Event]:
        return self.roles.recovering

    @property
    def standby(self) -> set[int]:
        return self.roles.standby

    @property
    def generation(self) -> int:
        return self.roles.generation

    @property
    def refusing(self) -> bool:
        return self.roles.refusing

    def shard_for(self, sid: str) -> int:
        return self.roles.shard_for(sid)

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        from stickystate.replicator.topics import ensure_topics

        if not self.settings.replication:
            log.warning("replication is OFF: sessions are lost when this node stops")
            self.expiry.start()
            return
        if self.settings.encryption and self.settings.master_keys is None:
            raise RuntimeError("refusing to start: encryption is on and no master key is configured "
                               "(--master-keys-file / STICKYSTATE_MASTER_KEYS, or --encryption off explicitly)")
        if not self.settings.encryption:
            log.warning("encryption is OFF: session data is stored in Kafka in plaintext and a delete "
                        "does not erase its history")
        await ensure_topics(self.settings.replicator)
        await self.replicator.start()
        await self.erasure.start()
        await self.follower.start()
        self.expiry.start()
        self.stall.start()
        self.verification.start()
        if self.settings.snapshot_every_events:
            self.snapshotting.start()

    async def drain(self, timeout_s: float = 15.0) -> None:
        """Leave gracefully: refuse new requests, flush replication, then ask the
        router to move the shards, and wait until it has (its assignment takes them
        away from us, after their queues are flushed). Nothing acknowledged is lost, even at
        durability memory: every queued event is in Kafka before any new claim."""
        if self.roles.refusing:
            return
        self.roles.refusing = True
        log.info("draining: flushing replication", extra={"queued": self.replicator.depth if self.settings.replication else 0})
        if self.settings.replication:
            try:
                await self.replicator.flush(timeout_s=timeout_s)
            except asyncio.TimeoutError:
                log.error("drain: replication not flushed in time", extra={"queued": self.replicator.depth})
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.roles.serving and self.settings.replication and time.monotonic() < deadline:
            if time.monotonic() - self.last_probe > 2.0:
                break  # no router is watching (whole cluster stopping): nobody will take over
            await asyncio.sleep(0.05)
        log.info("drained", extra={"still_serving": sorted(self.roles.serving)})

    async def stop(self) -> None:
        self.roles.refusing = self.draining = True
        self.watch.close_all()
        await self.ownership.stop()
        await self.bootstraps.stop()
        await self.snapshotting.stop()
        await self.expiry.stop()
        await self.stall.stop()
        await self.verification.stop()
        if self.settings.replication:
            await self.erasure.stop()
            await self.replicator.stop()
            await self.follower.stop()
            await self.history.stop()
            await self.snapshot_reader.stop()

    @property
    def ready(self) -> bool:
        return (not self.draining and (self.follower.alive or not self.settings.replication)
                and not self.roles.recovering and self.roles.generation >= 0)

    # -- introspection -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self.last_probe = time.monotonic()
        roles = self.roles
        return {
            "node": self.me,
            "generation": roles.generation,
            "ready": self.ready,
            "draining": self.draining,
            "serving": sorted(roles.serving),
            "recovering": sorted(roles.recovering),
            "standby": sorted(roles.standby),
            "following": sorted(self.follower.following()) if self.settings.replication else [],
            "owner_log_reads": dict(self.verification.owner_log_reads),
            "sessions": sum(len(roles.shards[s].sessions) for s in roles.serving),
            "replication_queue": self.replicator.depth,
            "recoveries": list(self.ownership.recoveries),
            "recoveries_total": self.ownership.recoveries_total,  # shards acquired since start
            "liveness_port": self.liveness_port,  # UDP, node/liveness.py; None: no echo
            "watch": self.watch.status(),
            "keys": self.erasure.status(),
        }
