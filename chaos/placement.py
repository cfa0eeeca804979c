"""Placement agreement of a run with several routers: did shards move only when they had to?

Two sources, read after the run:
- the maps the placement leaders published (the placement topic, router/control.py),
  in order, keeping only those the routers would follow (generation above every earlier
  one, term not below the newest leader claim read so far): the *real ownership changes*
  of a shard are the times its owner differs from the previous followed map (the first
  map counts one per shard: the first owner);
- the claims in the changes log (the checker's replay): a node claims a shard each time
  it takes it over.

Flip-flopping (two routers pushing competing placements, or a leader moving shards for
nothing) shows as more claims than ownership changes. A shard that returns to its
previous owner (a node killed and restarted gets its shards back) is counted apart, as
``returns``: those are real moves, each with its claim. Pure except ``read_maps``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from stickystate.router.control import TERM_SHIFT


async def read_maps(bootstrap: str, topic: str) -> list[tuple[int, bytes, dict[str, Any]]]:
    """(offset, key, value) of every leader and map record of the placement topic."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        out: list[tuple[int, bytes, dict[str, Any]]] = []
        while end and (await consumer.position(tp)) < end:
            batches = await consumer.getmany(tp, timeout_ms=1000)
            for rec in batches.get(tp, ()):
                if rec.value is not None and rec.key in (b"leader", b"map"):
                    out.append((rec.offset, rec.key, orjson.loads(rec.value)))
        return out
    finally:
        await consumer.stop()


def followed_maps(records: Iterable[tuple[int, bytes, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The maps a router reading the topic would have followed, in order."""
    newest_term, last_gen, out = 0, 0, []
    for offset, key, doc in records:
        if key == b"leader":
            newest_term = max(newest_term, offset + 1)
            continue
        gen = int(doc["generation"])
        if gen > last_gen and gen >> TERM_SHIFT >= newest_term:
            last_gen = gen
            out.append(doc)
    return out


def agreement(maps: list[dict[str, Any]], claims: dict[int, list[Any]], partitions: int,
              views: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Claims per shard against ownership changes per shard, and whether the routers'
    final views agree.

    The owners a shard's maps name in turn and the nodes that claimed it in turn (claims:
    ``(offset, epoch, node, effective)`` in log order) are matched in order: a move whose
    new owner claimed the shard is *taken*; a move undone by a later map before its owner
    claimed (a node declared down, then up again within the handover) is *undone*; a claim
    that matches no move is *unexplained*, which is what competing leaders would cause."""
    changes = dict.fromkeys(range(partitions), 0)
    owners: dict[int, list[str]] = {s: [] for s in range(partitions)}
    returns = 0
    for doc in maps:
        shards = doc.get("shards") or {}
        for s in range(partitions):
            owner = shards.get(str(s))
            h = owners[s]
            if owner is not None and (not h or owner != h[-1]):
                changes[s] += 1
                if len(h) >= 2 and h[-2] == owner:
                    returns += 1  # back to the owner before last: A -> B -> A
                h.append(owner)
    claimed = {s: len(claims.get(s, [])) for s in range(partitions)}
    taken = 0
    unexplained: dict[int, int] = {}
    for s in range(partitions):
        seq, i = owners[s], 0
        extra = 0
        for claim in claims.get(s, []):
            node = claim[2]
            j = i
            while j < len(seq) and seq[j] != node:
                j += 1
            if j < len(seq):
                taken += 1
                i = j + 1
            else:
                extra += 1
        if extra:
            unexplained[s] = extra
    finals = {name: (v.get("generation"), v.get("shards")) for name, v in views.items()}
    agree = len({orjson.dumps(f) for f in finals.values()}) == 1 and all(
        v.get("settled") for v in views.values())
    return {"maps_followed": len(maps), "ownership_changes": sum(changes.values()),
            "claims": sum(claimed.values()), "moves_taken": taken,
            "moves_undone_before_claim": sum(changes.values()) - taken,
            "unexplained_claims": unexplained, "returns": returns, "routers_agree": agree,
            "final_generations": {name: f[0] for name, f in finals.items()},
            "leaders": sorted({str(d.get("leader")) for d in maps})}


def summary_line(rep: dict[str, Any]) -> str:
    return (f"PLACEMENT {rep['maps_followed']} maps from leaders {', '.join(rep['leaders']) or '-'}; "
            f"ownership changes {rep['ownership_changes']} (taken {rep['moves_taken']}, undone before the new "
            f"owner claimed {rep['moves_undone_before_claim']}), claims {rep['claims']} (matching no move: "
            f"{sum(rep['unexplained_claims'].values())}); "
            f"of the changes, returns to the owner before: {rep['returns']}; routers agree at the end: "
            f"{rep['routers_agree']}")
