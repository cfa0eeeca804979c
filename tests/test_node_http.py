"""The node's HTTP edge in-process, with the store's collaborators faked at their seams."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
from aiohttp.test_utils import make_mocked_request

from stickystate.node.handlers import NodeHandlers
from stickystate.node.settings import NodeSettings


async def test_history_waits_for_the_shards_queued_changes_before_reading_the_log() -> None:
    """Durability: memory answers before Kafka has the event; /history must still show
    every change answered before it, so it flushes the shard's queue first."""
    calls: list[Any] = []

    async def serving_shard(sid: str) -> Any:
        return SimpleNamespace(id=3, my_epoch=1)

    async def flush(partitions: list[int], timeout_s: float) -> None:
        calls.append(("flush", list(partitions)))

    async def read(shard: int, sid: str, after: int, limit: int) -> tuple[list[dict[str, Any]], bool]:
        calls.append(("read", shard))
        return [{"op": "create", "sid": sid, "ver": 1, "offset": 0}], False

    store = SimpleNamespace(serving_shard=serving_shard, replicator=SimpleNamespace(flush=flush),
                            history=SimpleNamespace(read=read), me="n1")
    handlers = NodeHandlers(store, NodeSettings(auth="open"))  # type: ignore[arg-type]
    request = make_mocked_request("GET", "/v1/sessions/s-1/history", match_info={"sid": "s-1"})
    resp = await handlers.history(request)
    assert calls == [("flush", [3]), ("read", 3)]
    assert orjson.loads(resp.body)["events"][0]["ver"] == 1  # type: ignore[arg-type]
