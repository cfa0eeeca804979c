"""What each saver operation does, once for both savers: a plan is a generator that
yields the session operations it needs (``Op``) and is sent their results, without
doing I/O. ``run_sync`` drives a plan with the sync ``Client``, ``run_async`` with the
``AsyncClient`` (which runs the independent reads of a ``Batch`` concurrently).

Every write goes at the saver's durability (``log`` by default); sessions a plan creates
get the saver's TTL. A client error inside an operation is thrown into the plan, which
handles the ones it expects (``Conflict`` on a create race) and lets the rest through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, CheckpointMetadata, CheckpointTuple, get_checkpoint_id

from stickystate.client import AsyncClient, Client, Conflict, NotFound, TooLarge
from stickystate.langgraph.layout import Layout, candidates, config_of, latest_first, thread_of


class CheckpointTooLarge(ValueError):
    """A checkpoint (or its writes) is over one of the server's limits (``limit`` names
    it: ``max_state_bytes``, ``max_body_bytes``, ``max_depth``, ``max_list_len``)."""

    def __init__(self, what: str, limit: str | None, detail: str) -> None:
        super().__init__(f"{what} is over the stickystate server's limit {limit}: {detail} "
                         f"(raise the nodes' --{(limit or 'max-state-bytes').replace('_', '-')}, or keep less "
                         f"state in the graph)")
        self.limit = limit


@dataclass(frozen=True)
class Op:
    """One session operation: ``get`` (None if absent), ``create``, ``patch``,
    ``delete`` (absent is fine)."""

    kind: str
    sid: str
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Batch:
    """Independent operations; their results (or the errors they raised) in order."""

    ops: Sequence[Op]


Plan = Generator[Op | Batch, Any, Any]


@dataclass(frozen=True)
class Options:
    durability: str | None
    ttl_s: float | None


# -- the drivers --------------------------------------------------------------------------------


def _sync_op(client: Client, op: Op, opt: Options) -> Any:
    if op.kind == "get":
        try:
            return client.get(op.sid)["data"]
        except NotFound:
            return None
    if op.kind == "create":
        return client.create(op.sid, op.data, ttl_s=opt.ttl_s, durability=opt.durability, minimal=True)
    if op.kind == "patch":
        return client.patch(op.sid, op.data or {}, durability=opt.durability, minimal=True)
    if op.kind == "delete":
        try:
            client.delete(op.sid, durability=opt.durability)
        except NotFound:
            pass
        return None
    raise ValueError(op.kind)


async def _async_op(client: AsyncClient, op: Op, opt: Options) -> Any:
    if op.kind == "get":
        try:
            return (await client.get(op.sid))["data"]
        except NotFound:
            return None
    if op.kind == "create":
        return await client.create(op.sid, op.data, ttl_s=opt.ttl_s, durability=opt.durability, minimal=True)
    if op.kind == "patch":
        return await client.patch(op.sid, op.data or {}, durability=opt.durability, minimal=True)
    if op.kind == "delete":
        try:
            await client.delete(op.sid, durability=opt.durability)
        except NotFound:
            pass
        return None
    raise ValueError(op.kind)


def _advance(plan: Plan, result: Any = None, error: Exception | None = None) -> tuple[bool, Any]:
    """Hand the plan its step's result (or throw the step's error into it): (False, its
    next step), or (True, what it returned)."""
    try:
        return False, plan.throw(error) if error is not None else plan.send(result)
    except StopIteration as stop:
        return True, stop.value


def run_sync(client: Client, plan: Plan, opt: Options) -> Any:
    done, step = _advance(plan)
    while not done:
        try:
            if isinstance(step, Batch):
                result: Any = []
                for op in step.ops:
                    try:
                        result.append(_sync_op(client, op, opt))
                    except Exception as exc:  # noqa: BLE001 - handed to the plan
                        result.append(exc)
            else:
                result = _sync_op(client, step, opt)
        except Exception as exc:  # noqa: BLE001 - thrown into the plan, which decides
            done, step = _advance(plan, error=exc)
            continue
        done, step = _advance(plan, result)
    return step


async def run_async(client: AsyncClient, plan: Plan, opt: Options, concurrency: int = 16) -> Any:
    gate = asyncio.Semaphore(concurrency)

    async def one(op: Op) -> Any:
        async with gate:
            return await _async_op(client, op, opt)

    done, step = _advance(plan)
    while not done:
        try:
            if isinstance(step, Batch):
                result: Any = list(await asyncio.gather(*(one(op) for op in step.ops), return_exceptions=True))
                for item in result:
                    if isinstance(item, BaseException) and not isinstance(item, Exception):
                        raise item  # cancellation and the like: not the plan's to handle
            else:
                result = await _async_op(client, step, opt)
        except Exception as exc:  # noqa: BLE001 - thrown into the plan, which decides
            done, step = _advance(plan, error=exc)
            continue
        done, step = _advance(plan, result)
    return step


def _check(results: Iterable[Any]) -> list[Any]:
    """A batch's results, raising the first error (absent sessions are None, not errors)."""
    out = list(results)
    for item in out:
        if isinstance(item, Exception):
            raise item
    return out


# -- the plans -------------------------------------------------------------------------------------


def upsert(sid: str, patch: Mapping[str, Any], created: Mapping[str, Any]) -> Plan:
    """Merge ``patch`` into the session, creating it as ``created`` if absent."""
    try:
        yield Op("patch", sid, patch)
        return False
    except NotFound:
        pass
    try:
        yield Op("create", sid, created)
        return True
    except Conflict:  # created in between by someone else
        yield Op("patch", sid, patch)
        return False


def put(layout: Layout, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata) -> Plan:
    thread_id, ns, parent_id = thread_of(config)
    checkpoint_id = checkpoint["id"]
    csid = layout.checkpoint_session(thread_id, ns, checkpoint_id)
    doc = layout.checkpoint_doc(thread_id, ns, checkpoint, metadata, parent_id)
    try:
        try:
            yield Op("create", csid, {**doc, "w": {}})
        except Conflict:  # the same checkpoint again: new contents, its writes kept
            yield Op("patch", csid, doc)
    except TooLarge as exc:
        raise CheckpointTooLarge(f"checkpoint {checkpoint_id} of thread {thread_id!r}", exc.limit,
                                 exc.message) from exc
    entry = layout.index_entry(metadata, parent_id, doc["m"])
    created = yield from upsert(layout.thread_session(thread_id), {"ns": {ns: {checkpoint_id: entry}}},
                                {"thread_id": thread_id, "ns": {ns: {checkpoint_id: entry}}})
    if created:
        yield from upsert(layout.directory, {"t": {_key(layout, thread_id): thread_id}},
                          {"t": {_key(layout, thread_id): thread_id}})
    if entry["r"] is not None:
        ref = {"refs": {csid: [thread_id, ns, checkpoint_id]}}
        yield from upsert(layout.run_session(entry["r"]), ref, ref)
    return config_of(thread_id, ns, checkpoint_id)


def put_writes(layout: Layout, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
               task_path: str) -> Plan:
    thread_id, ns, checkpoint_id = thread_of(config)
    if checkpoint_id is None:
        raise ValueError('put_writes needs configurable["checkpoint_id"]')
    patch = layout.writes_patch(writes, task_id, task_path)
    try:
        yield from upsert(layout.checkpoint_session(thread_id, ns, checkpoint_id), patch,
                          {"t": thread_id, "ns": ns, "id": checkpoint_id, **patch})
    except TooLarge as exc:
        raise CheckpointTooLarge(f"the writes of task {task_id} to checkpoint {checkpoint_id} of thread {thread_id!r}",
                                 exc.limit,
                                 exc.message) from exc


def get_tuple(layout: Layout, config: RunnableConfig) -> Plan:
    thread_id, ns, checkpoint_id = thread_of(config)
    if checkpoint_id is not None:
        doc = yield Op("get", layout.checkpoint_session(thread_id, ns, checkpoint_id))
        return layout.tuple_of(doc) if doc is not None and "c" in doc else None
    index = yield Op("get", layout.thread_session(thread_id))
    if index is None:
        return None
    # the newest whose session is there (an older one may have expired before the index)
    for cid in sorted((index.get("ns") or {}).get(ns, {}), reverse=True):
        doc = yield Op("get", layout.checkpoint_session(thread_id, ns, cid))
        if doc is not None and "c" in doc:
            return layout.tuple_of(doc)
    return None


def list_(layout: Layout, config: RunnableConfig | None, filter: Mapping[str, Any] | None,
          before: RunnableConfig | None, limit: int | None) -> Plan:
    before_id = get_checkpoint_id(before) if before is not None else None
    if config is not None:
        thread_id, _, checkpoint_id = thread_of(config)
        threads = [thread_id]
        configurable = config.get("configurable") or {}
        ns = configurable.get("checkpoint_ns")
        ns = None if ns is None else str(ns)
    else:
        directory = yield Op("get", layout.directory)
        threads = sorted(set((directory or {}).get("t", {}).values()))
        ns, checkpoint_id = None, None
    indexes = _check((yield Batch([Op("get", layout.thread_session(t)) for t in threads])))
    found = []
    for thread_id, index in zip(threads, indexes):
        if index is not None:
            found += candidates(index, thread_id, ns, checkpoint_id, before_id)
    chosen: list[tuple[str, str, str, Mapping[str, Any]]] = []
    for item in latest_first(found):
        if limit is not None and len(chosen) >= limit:
            break
        if layout.matches(item[3], filter):
            chosen.append(item)
    docs = _check((yield Batch([Op("get", layout.checkpoint_session(t, space, cid)) for cid, t, space, _ in chosen])))
    tuples: list[CheckpointTuple] = [layout.tuple_of(doc) for doc in docs if doc is not None and "c" in doc]
    return tuples


def delete_thread(layout: Layout, thread_id: str) -> Plan:
    index = yield Op("get", layout.thread_session(thread_id))
    if index is None:
        return None
    sids = [layout.checkpoint_session(thread_id, ns, cid)
            for ns, entries in (index.get("ns") or {}).items() for cid in entries]
    _check((yield Batch([Op("delete", sid) for sid in sids])))
    yield Op("delete", layout.thread_session(thread_id))
    try:
        yield Op("patch", layout.directory, {"t": {_key(layout, thread_id): None}})
    except NotFound:
        pass
    return None


def delete_for_runs(layout: Layout, run_ids: Sequence[str]) -> Plan:
    runs = _check((yield Batch([Op("get", layout.run_session(str(r))) for r in run_ids])))
    removed: dict[str, dict[str, dict[str, None]]] = {}
    deletes = []
    for run in runs:
        for csid, (thread_id, ns, cid) in ((run or {}).get("refs") or {}).items():
            deletes.append(Op("delete", csid))
            removed.setdefault(thread_id, {}).setdefault(ns, {})[cid] = None
    _check((yield Batch(deletes)))
    patched = yield Batch([Op("patch", layout.thread_session(t), {"ns": spaces}) for t, spaces in removed.items()])
    for result in patched:
        if isinstance(result, Exception) and not isinstance(result, NotFound):
            raise result
    _check((yield Batch([Op("delete", layout.run_session(str(r))) for r in run_ids])))
    return None


def copy_thread(layout: Layout, source: str, target: str) -> Plan:
    index = yield Op("get", layout.thread_session(source))
    if index is None:
        return None
    entries = [(ns, cid, entry) for ns, spaces in (index.get("ns") or {}).items() for cid, entry in spaces.items()]
    docs = _check((yield Batch([Op("get", layout.checkpoint_session(source, ns, cid)) for ns, cid, _ in entries])))
    copied: dict[str, dict[str, Any]] = {}
    writes = []
    runs: dict[str, dict[str, Any]] = {}
    for (ns, cid, entry), doc in zip(entries, docs):
        if doc is None or "c" not in doc:
            continue
        csid = layout.checkpoint_session(target, ns, cid)
        writes.append(Op("create", csid, {**doc, "t": target}))
        copied.setdefault(ns, {})[cid] = entry
        if entry.get("r") is not None:
            runs.setdefault(str(entry["r"]), {})[csid] = [target, ns, cid]
    for result in (yield Batch(writes)):
        if isinstance(result, Exception) and not isinstance(result, Conflict):
            raise result
    if not copied:
        return None
    created = yield from upsert(layout.thread_session(target), {"ns": copied}, {"thread_id": target, "ns": copied})
    if created:
        yield from upsert(layout.directory, {"t": {_key(layout, target): target}},
                          {"t": {_key(layout, target): target}})
    for run_id, refs in runs.items():
        yield from upsert(layout.run_session(run_id), {"refs": refs}, {"refs": refs})
    return None


def prune(layout: Layout, thread_ids: Sequence[str], strategy: str) -> Plan:
    if strategy == "delete":
        for thread_id in thread_ids:
            yield from delete_thread(layout, thread_id)
        return None
    if strategy != "keep_latest":
        raise ValueError(f"unknown prune strategy {strategy!r} (keep_latest or delete)")
    indexes = _check((yield Batch([Op("get", layout.thread_session(t)) for t in thread_ids])))
    for thread_id, index in zip(thread_ids, indexes):
        if index is None:
            continue
        drop = {ns: sorted(entries)[:-1] for ns, entries in (index.get("ns") or {}).items() if len(entries) > 1}
        if not drop:
            continue
        _check((yield Batch([Op("delete", layout.checkpoint_session(thread_id, ns, cid))
                             for ns, cids in drop.items() for cid in cids])))
        yield Op("patch", layout.thread_session(thread_id),
                 {"ns": {ns: {cid: None for cid in cids} for ns, cids in drop.items()}})
    return None


def _key(layout: Layout, thread_id: str) -> str:
    return layout.thread_session(thread_id).rsplit(":", 1)[1]
