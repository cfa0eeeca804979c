"""A session's audit trail, read from its shard's partition of ``changes``.

One consumer per node process, shared under a lock, created on first use (replicator/scan.py). A page is
read by scanning the partition from the start to the end offset taken when the
request began (its finish line), keeping the session's events that count under the
fencing rule (node/shard.py: only events of the latest claim's epoch and node), so
the trail shows exactly what replay applies. Cost is O(partition) per page: the
partition is bounded by the ``changes`` retention.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection
from typing import Any

from aiokafka import TopicPartition

from stickystate.replicator import events
from stickystate.replicator.keys import Codec, KeyErased, KeyNotRead
from stickystate.replicator.scan import SharedConsumer, scan
from stickystate.replicator.settings import ReplicatorSettings


log = logging.getLogger("stickystate.replicator")


class HistoryReader:
    def __init__(self, settings: ReplicatorSettings, client_id: str, codec: Codec | None = None) -> None:
        self.settings = settings
        # Opens sealed events; records whose key is erased are not in the trail (replicator/keys.py).
        self.codec = codec or Codec(None)
        self._reader = SharedConsumer(settings, client_id)

    async def stop(self) -> None:
        await self._reader.stop()

    async def read(self, shard: int, sid: str, after_offset: int, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Events of ``sid`` at offsets > after_offset, oldest first; and whether more follow."""
        out: list[dict[str, Any]] = []
        more = False
        async with self._reader.use() as consumer:
            async for _, event in self._trail(consumer, shard, {sid.encode()}):
                if event["offset"] <= after_offset:
                    continue
                if len(out) == limit:
                    more = True
                    continue
                out.append(event)
        return out, more

    async def read_sessions(self, shard: int, sids: Collection[str]) -> dict[str, list[dict[str, Any]]]:
        """The whole trail of each of ``sids`` (every retained event that counts, oldest
        first), in ONE scan of the partition: what ``read`` pages through for one session,
        for every session of the shard that a watch resume waits for (node/watch.py)."""
        out: dict[str, list[dict[str, Any]]] = {sid: [] for sid in sids}
        keys = {sid.encode(): sid for sid in sids}
        async with self._reader.use() as consumer:
            async for key, event in self._trail(consumer, shard, set(keys)):
                out[keys[key]].append(event)
        return out

    async def _trail(self, consumer: Any, shard: int, keys: set[bytes]) -> AsyncIterator[tuple[bytes, dict[str, Any]]]:
        """The events of the sessions ``keys`` that count under the fencing rule, in log
        order up to the partition's end offset taken now, each with its ``offset``."""
        tp = TopicPartition(self.settings.changes_topic, shard)
        end = (await consumer.end_offsets([tp]))[tp]
        epoch, owner = 0, None
        last_ver: dict[bytes, int] = {}  # per session, of its current lifetime: a re-sent duplicate has ver <= it
        async for rec in scan(consumer, tp, end):
            if rec.key == events.CLAIM_KEY:
                claim = events.decode(rec.value)
                if claim["epoch"] > epoch:
                    epoch, owner = claim["epoch"], claim["node"]
                continue
            if rec.key not in keys:
                continue
            try:
                event = self.codec.decode_change(shard, rec.key, rec.value)
            except (KeyErased, KeyNotRead):
                continue  # erased: history answers nothing for it
            except events.BadEvent as exc:
                log.error("event refused", extra={"shard": shard, "offset": rec.offset, "error": str(exc)})
                continue
            if event.get("epoch") != epoch or event.get("node") != owner:
                continue  # written by a fenced owner: replay ignores it, so does the trail
            if event.get("ver", 0) <= last_ver.get(rec.key, 0):
                continue
            last_ver[rec.key] = 0 if event["op"] in ("delete", "expire") else event.get("ver", 0)
            event.pop("idem", None)
            event["offset"] = rec.offset
            yield rec.key, event
