"""Loading a shard from its snapshots, then following its changes (asyncio, no aiohttp).

A shard this node is to hold (owned or standby) starts from the newest checkpoint's
snapshots and follows the ``changes`` partition from the checkpoint's offset; a standby
keeps following, an owner reads on to its claim (node/ownership.py). ``Bootstraps`` owns
one loading task per shard: started when the shard is assigned, waited for by an
acquisition, cancelled when the shard is dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from stickystate.node.erasure import Erasure
from stickystate.node.roles import ShardRoles
from stickystate.node.shard import Shard
from stickystate.node.tasks import cancel_and_wait
from stickystate.replicator.follower import Follower
from stickystate.replicator.snapshots import SnapshotReader

log = logging.getLogger("stickystate.node")


class Bootstraps:
    def __init__(self, roles: ShardRoles, follower: Follower, reader: SnapshotReader, recovery_timeout_s: float,
                 erasure: Erasure) -> None:
        self.roles = roles
        self.erasure = erasure
        self.follower = follower
        self.reader = reader
        self.recovery_timeout_s = recovery_timeout_s
        self._tasks: dict[int, asyncio.Task[None]] = {}  # shard -> loading its snapshots, then following

    def start(self, s: int) -> None:
        """Load shard ``s`` (its Shard object is in ``roles.shards``) unless that is under way."""
        task = self._tasks.get(s)
        if task is not None and not task.done():
            return
        task = self._tasks[s] = asyncio.create_task(self._bootstrap(s), name=f"bootstrap-{s}",
                                                    context=contextvars.Context())
        task.add_done_callback(self._done)

    def cancel(self, s: int) -> None:
        task = self._tasks.pop(s, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        await cancel_and_wait(list(self._tasks.values()))

    @staticmethod
    def _done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("loading a shard from snapshots failed", extra={"task": task.get_name(),
                                                                      "error": repr(task.exception())})

    async def _bootstrap(self, s: int) -> None:
        """Load the shard's snapshots, then follow its changes from their checkpoint."""
        shards = self.roles.shards
        shard = shards.get(s)
        if shard is None:
            return
        # The shard's snapshots and its data keys, read side by side (node/erasure.py reads the
        # keys again if a snapshot names one further than it read).
        loaded, _ = await asyncio.gather(self.reader.load(s, self.recovery_timeout_s, opener=None),
                                         self.erasure.load(s))
        snapshots = await self.erasure.open_snapshots(s, loaded.raw)
        start = await self.reader.changes_start(s)
        if start > loaded.replay_from:
            raise RuntimeError(
                f"shard {s}: the changes partition starts at offset {start} but snapshots cover only the events "
                f"before {loaded.replay_from}: retention removed changes no snapshot holds "
                "(see README 'Snapshots and retention'); refusing to serve a partial state")
        if shards.get(s) is not shard:
            return  # dropped meanwhile
        shard.load(loaded.epoch, loaded.node, loaded.replay_from, snapshots,
                   packed=s not in self.roles.recovering)
        shard.loaded = {"snapshot_sessions": len(snapshots), "snapshot_records": loaded.records_read,
                        "snapshot_epoch": loaded.epoch, "replay_from": loaded.replay_from,
                        "snapshot_load_s": round(loaded.seconds, 4)}
        self.follower.follow(s, loaded.replay_from)
        log.info("shard bootstrapped from snapshots",
                 extra={"shard": s, "snapshot_epoch": loaded.epoch, "sessions": len(snapshots),
                        "snapshot_records": loaded.records_read, "replay_from": loaded.replay_from,
                        "duration_s": round(loaded.seconds, 4)})

    async def ensure_following(self, s: int) -> Shard:
        """The shard object, loaded from snapshots and followed (waits for a running bootstrap)."""
        for _ in range(3):
            shard = self.roles.shards.setdefault(s, Shard(s))
            if s in self.follower.following():
                return shard
            task = self._tasks.get(s)
            if task is None or task.done():
                self._tasks.pop(s, None)
                self.start(s)
                task = self._tasks[s]
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():
                    continue  # dropped and re-assigned meanwhile: start over
                raise
        raise RuntimeError(f"shard {s}: could not load snapshots")
