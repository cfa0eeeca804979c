"""In-process micro-benchmark of the node's write path: CPU time per operation, no Kafka,
no HTTP. For A/B checks of changes to node/ (run it on both trees, alternating, on the
same machine); not a test, and its figures are this machine's.

- store.write: NodeStore.write with replication off (serving_shard, apply, limits,
  commit), with and without an Idempotency-Key per write (the router adds one to every
  write it forwards), and with 10 watchers on every session (the watch hook: a change
  into each watcher's buffer; the frames are made by the streams, not here); and on the
  benchmark's own shape (1,000 sessions, each a window of 50 messages of ~300 bytes, turns
  spread over them: the states are cold in the caches, as on a node);
- standby replay + promotion: Shard.apply_record over a log of appends as a standby
  (the compact form), then unpack_all;
- own_acked: the owner verifying its records from Kafka's acknowledgements, in batches;
- encode + decode of a turn's event, plaintext (encryption off) and sealed under the
  session's data key (replicator/keys.py Codec): the owner encodes each event once, each
  standby (and a rebuild) decodes it once; the difference is what encryption adds to a
  turn's CPU across the cluster (with one standby), next to the whole turn's node CPU that
  ``stickystate bench`` measures (direct-raw vs direct-plain).

    python -m stickystate.bench.write_path [--ops 10000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from stickystate import crypto
from stickystate.bench.loadgen import message_doc
from stickystate.node.ops import apply
from stickystate.replicator.keys import Codec, KeyRing
from stickystate.node.settings import NodeSettings
from stickystate.node.shard import Shard
from stickystate.node.store import NodeStore
from stickystate.node.watch import WatchLimits, life_of

SESSIONS = 200
ACK_BATCH = 50


def _claimed(me: str) -> Shard:
    shard = Shard(0)
    shard.apply_record(0, {"op": "claim", "shard": 0, "epoch": 1, "node": "n1", "at": 0}, me, 0.0)
    return shard


def _log(ops: int) -> list[dict[str, Any]]:
    """The events of ``ops`` writes to SESSIONS sessions, as the owner logs them."""
    owner = _claimed("n1")
    owner.my_epoch = 1
    out = []
    for i in range(ops):
        sid = f"s{i % SESSIONS}"
        current = owner.sessions.get(sid)
        op = ({"op": "create", "sid": sid, "data": {"m": []}, "ttl_s": 3600.0} if current is None else
              {"op": "append", "sid": sid, "field": "m", "items": [{"n": i}], "max_len": 20})
        op["idem"] = [f"router-{i}", "fp"]
        new, event = apply(current, op, 1.0)
        event["node"], event["epoch"] = "n1", 1
        owner.commit(event, new)
        out.append(event)
    return out


@contextlib.asynccontextmanager
async def _serving_store(settings: NodeSettings) -> AsyncIterator[NodeStore]:
    """A started store serving every shard (replication off), stopped on the way out."""
    store = NodeStore(settings)
    await store.start()
    try:
        await store.assign(0, {s: store.me for s in range(store.partitions)}, {})
        while store.recovering:
            await asyncio.sleep(0.001)
        yield store
    finally:
        await asyncio.sleep(0.01)
        await store.stop()


async def _store_writes(ops: int, rounds: int, idem: bool, watchers: int = 0) -> list[float]:
    settings = NodeSettings(auth="open", replication=False, snapshot_every_events=0,
                            watch=WatchLimits(buffer_events=ops * rounds, per_node=SESSIONS * 100))
    async with _serving_store(settings) as store:
        sids = [f"bench-{i}" for i in range(SESSIONS)]
        for sid in sids:
            result = await store.write({"op": "create", "sid": sid, "data": {"m": []}, "ttl_s": 3600.0})
            assert result.state is not None
            for _ in range(watchers):  # subscribed, never read (node/watch.py: each change goes to their buffers)
                store.watch.subscribe(result.shard, sid, life_of(result.state))
        out, k = [], 0
        for _ in range(rounds):
            batch = [{"op": "append", "sid": sids[i % SESSIONS], "field": "m",
                      "items": [{"role": "user", "text": "hi"}], "max_len": 20} for i in range(ops)]
            gc.collect()
            t0 = time.process_time()
            for op in batch:
                if idem:
                    k += 1
                    await store.write(op, idem=f"router-{k}", request_fingerprint="fp")
                else:
                    await store.write(op)
            out.append(time.process_time() - t0)
        return out


async def _window_writes(ops: int, rounds: int, sessions: int = 1000, window: int = 50) -> list[float]:
    """``stickystate bench``'s turn: an append to a 50-message window, over 1,000 sessions."""
    async with _serving_store(NodeSettings(auth="open", replication=False, snapshot_every_events=0)) as store:
        sids = [f"bench-{i}" for i in range(sessions)]
        for i, sid in enumerate(sids):
            await store.write({"op": "create", "sid": sid, "ttl_s": 3600.0,
                               "data": {"messages": [message_doc(i * window + n, 300) for n in range(window)]}})
        out, n = [], sessions * window
        for _ in range(rounds):
            batch = [{"op": "append", "sid": sids[(i * 7919) % sessions], "field": "messages",
                      "items": [message_doc(n + i, 300)], "max_len": window} for i in range(ops)]
            n += ops
            gc.collect()
            t0 = time.process_time()
            for op in batch:
                await store.write(op, appended_field="messages")
            out.append(time.process_time() - t0)
        return out


def _standby_replay(log: list[dict[str, Any]]) -> float:
    t0 = time.process_time()
    shard = _claimed("n2")
    for offset, event in enumerate(log, start=1):
        shard.apply_record(offset, event, "n2", 0.0)
    shard.unpack_all()
    return time.process_time() - t0


def _own_acked(log: list[dict[str, Any]]) -> float:
    shard = _claimed("n1")
    shard.my_epoch = 1
    shard.acks.start(1)
    metas = [(offset, (e["sid"], e["ver"])) for offset, e in enumerate(log, start=1)]
    batches = [metas[i:i + ACK_BATCH] for i in range(0, len(metas), ACK_BATCH)]
    t0 = time.process_time()
    for batch in batches:
        shard.own_acked(batch, 0.0)
    return time.process_time() - t0


def _codec_round_trip(log: list[dict[str, Any]], codec: Codec) -> float:
    t0 = time.process_time()
    for event in log:
        value = codec.encode_change(0, event)
        codec.decode_change(0, event["sid"].encode(), value)
    return time.process_time() - t0


def _sealing_codec() -> Codec:
    ring = KeyRing(crypto.parse_master_keys(crypto.new_master_key_entry("bench")))
    for i in range(SESSIONS):
        ring.add(0, f"s{i}", i + 1, i, crypto.new_data_key())
    ring.shard(0).position = SESSIONS
    return Codec(ring)


def _rounds(rounds: int, run: Callable[[], float]) -> list[float]:
    out = []
    for _ in range(rounds):
        gc.collect()
        out.append(run())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=10_000, help="operations per round")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # "replication is OFF"
    log = _log(args.ops)
    sealing = _sealing_codec()
    results = {
        "store.write": asyncio.run(_store_writes(args.ops, args.rounds, idem=False)),
        "store.write + idem key": asyncio.run(_store_writes(args.ops, args.rounds, idem=True)),
        "store.write, 10 watchers": asyncio.run(_store_writes(args.ops, args.rounds, idem=False, watchers=10)),
        "store.write, bench window": asyncio.run(_window_writes(args.ops, args.rounds)),
        "standby replay + promote": _rounds(args.rounds, lambda: _standby_replay(log)),
        "own_acked (per record)": _rounds(args.rounds, lambda: _own_acked(log)),
        "event encode+decode plain": _rounds(args.rounds, lambda: _codec_round_trip(log, Codec(None))),
        "event encode+decode sealed": _rounds(args.rounds, lambda: _codec_round_trip(log, sealing)),
    }
    for name, times in results.items():
        per_op = [t * 1e6 / args.ops for t in times]
        print(f"{name:27s} median {statistics.median(per_op):6.2f} us  min {min(per_op):6.2f} us  "
              f"(CPU per op, {args.rounds} rounds of {args.ops})")


if __name__ == "__main__":
    main()
