"""How the savers lay LangGraph threads out in stickystate sessions, without I/O: session
ids, the JSON documents, and the conversions to and from LangGraph's types. Both savers
(stickystate/langgraph/saver.py) read and write exactly these documents.

Sessions, for a saver with prefix ``P`` (default ``lg``), all in the client's tenant:

- ``P:t:<thread>`` one per thread, the thread's index:
  ``{"thread_id": ..., "ns": {<checkpoint_ns>: {<checkpoint_id>: {"p": parent id,
  "m": metadata, "r": run id}}}}``. Small (metadata only), read by ``list``; a put adds
  its entry with a JSON merge patch, so concurrent puts to one thread never lose each
  other's entries.
- ``P:c:<hash of thread, namespace, checkpoint id>`` one per checkpoint:
  ``{"t", "ns", "id", "p", "m", "c": the checkpoint with its channel values, "w": {<task
  id>|<idx>: [task id, channel, value, task path]}}``: the pending writes live with their
  checkpoint (``put_writes`` is one merge patch of ``w``), so one read returns a tuple.
  A checkpoint's size is bounded by the server's ``max_state_bytes`` (and a request by
  ``max_body_bytes``): one checkpoint, not the thread's history, must fit.
- ``P:r:<run>`` one per run id seen in metadata: ``{"refs": {<checkpoint session>:
  [thread, ns, checkpoint id]}}``, what ``delete_for_runs`` deletes.
- ``P:threads`` the directory of threads, ``{"t": {<thread key>: thread id}}``, for
  ``list(None)`` (every thread); written when a thread is created or deleted.

``<thread>`` is the thread id itself when it is 1-80 characters of ``[A-Za-z0-9._-]``
(prefixed ``p``), else ``h`` + 40 hex digits of its SHA-256; the documents keep the real
ids. Values (checkpoints, metadata, writes) are the saver's serde output
(``dumps_typed``: a type name and bytes), stored as ``[type, base64]``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (WRITES_IDX_MAP, Checkpoint, CheckpointMetadata, CheckpointTuple, PendingWrite,
                                       SerializerProtocol, get_checkpoint_id, writes_sort_key)

_PLAIN = re.compile(r"[A-Za-z0-9._-]{1,80}")
PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,16}")


def name_part(value: str) -> str:
    if _PLAIN.fullmatch(value):
        return "p" + value
    return "h" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:40]


class Layout:
    """Session ids and documents of one saver (its prefix and serde)."""

    def __init__(self, prefix: str, serde: SerializerProtocol) -> None:
        if not PREFIX_RE.fullmatch(prefix):
            raise ValueError("prefix must be 1-16 characters of [A-Za-z0-9._-]")
        self.prefix = prefix
        self.serde = serde
        self.directory = f"{prefix}:threads"

    # -- session ids -------------------------------------------------------------------------
    def thread_session(self, thread_id: str) -> str:
        return f"{self.prefix}:t:{name_part(thread_id)}"

    def checkpoint_session(self, thread_id: str, ns: str, checkpoint_id: str) -> str:
        digest = hashlib.sha256("\0".join((thread_id, ns, checkpoint_id)).encode("utf-8", "surrogatepass"))
        return f"{self.prefix}:c:{digest.hexdigest()[:40]}"

    def run_session(self, run_id: str) -> str:
        return f"{self.prefix}:r:{name_part(run_id)}"

    # -- values ----------------------------------------------------------------------------------
    def dump(self, value: Any) -> list[str]:
        kind, data = self.serde.dumps_typed(value)
        return [kind, base64.b64encode(data).decode()]

    def load(self, stored: list[str]) -> Any:
        return self.serde.loads_typed((stored[0], base64.b64decode(stored[1])))

    # -- documents -------------------------------------------------------------------------------
    def checkpoint_doc(self, thread_id: str, ns: str, checkpoint: Checkpoint, metadata: CheckpointMetadata,
                       parent_id: str | None) -> dict[str, Any]:
        """The checkpoint session's data (without writes). Channel values are kept for the
        channels the checkpoint has versions of, as LangGraph's savers load them."""
        versions = checkpoint.get("channel_versions", {})
        values = {k: v for k, v in checkpoint.get("channel_values", {}).items() if k in versions}
        return {"t": thread_id, "ns": ns, "id": checkpoint["id"], "p": parent_id, "m": self.dump(metadata),
                "c": self.dump({**checkpoint, "channel_values": values})}

    def index_entry(self, metadata: CheckpointMetadata, parent_id: str | None, stored: list[str]) -> dict[str, Any]:
        run_id = metadata.get("run_id") if isinstance(metadata, Mapping) else None
        return {"p": parent_id, "m": stored, "r": str(run_id) if run_id is not None else None}

    def writes_patch(self, writes: Iterable[tuple[str, Any]], task_id: str, task_path: str) -> dict[str, Any]:
        """``{"w": {...}}``: each write under ``<task id>|<idx>`` (special channels under
        their fixed negative index, as LangGraph's savers key them)."""
        out: dict[str, Any] = {}
        for idx, (channel, value) in enumerate(writes):
            i = WRITES_IDX_MAP.get(channel, idx)
            out[f"{task_id}|{i}"] = [task_id, channel, self.dump(value), task_path]
        return {"w": out}

    def tuple_of(self, doc: Mapping[str, Any]) -> CheckpointTuple:
        thread_id, ns, checkpoint_id, parent_id = doc["t"], doc["ns"], doc["id"], doc.get("p")
        stored = doc.get("w") or {}

        def order(key: str) -> tuple[str, str, int]:
            task_id, _, idx = key.rpartition("|")
            return writes_sort_key(stored[key][3], task_id, int(idx))

        pending: list[PendingWrite] = [(stored[k][0], stored[k][1], self.load(stored[k][2]))
                                       for k in sorted(stored, key=order)]
        return CheckpointTuple(
            config=config_of(thread_id, ns, checkpoint_id),
            checkpoint=self.load(doc["c"]),
            metadata=self.load(doc["m"]),
            parent_config=config_of(thread_id, ns, parent_id) if parent_id else None,
            pending_writes=pending,
        )

    def matches(self, entry: Mapping[str, Any], filter: Mapping[str, Any] | None) -> bool:
        if not filter:
            return True
        metadata = self.load(entry["m"])
        return all(metadata.get(k) == v for k, v in filter.items())


def config_of(thread_id: str, ns: str, checkpoint_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": checkpoint_id}}


def thread_of(config: RunnableConfig) -> tuple[str, str, str | None]:
    """(thread id, checkpoint namespace, checkpoint id or None) of a config."""
    configurable = config.get("configurable") or {}
    thread_id = configurable.get("thread_id")
    if thread_id is None:
        raise ValueError('the config needs configurable["thread_id"]')
    return str(thread_id), str(configurable.get("checkpoint_ns", "") or ""), get_checkpoint_id(config)


def candidates(index: Mapping[str, Any], thread_id: str, ns: str | None, checkpoint_id: str | None,
               before_id: str | None) -> list[tuple[str, str, str, Mapping[str, Any]]]:
    """(checkpoint id, thread, ns, index entry) of a thread's index that ``list`` may
    return, before the metadata filter: the namespace (all if None), the id, ``before``."""
    out = []
    for space, entries in (index.get("ns") or {}).items():
        if ns is not None and space != ns:
            continue
        for cid, entry in entries.items():
            if checkpoint_id is not None and cid != checkpoint_id:
                continue
            if before_id is not None and cid >= before_id:
                continue
            out.append((cid, thread_id, space, entry))
    return out


def latest_first(found: list[tuple[str, str, str, Mapping[str, Any]]]) -> list[tuple[str, str, str, Mapping[str, Any]]]:
    """Newest first: checkpoint ids are uuid6, ordered by time as strings (as LangGraph's savers sort them)."""
    return sorted(found, key=lambda item: (item[0], item[1], item[2]), reverse=True)


def next_version(current: str | int | float | None) -> str:
    """As LangGraph's own savers (InMemorySaver, PostgresSaver): a zero-padded counter
    (ordered as strings) and a random fraction."""
    import random

    if current is None:
        n = 0
    elif isinstance(current, (int, float)):
        n = int(current)
    else:
        n = int(current.split(".")[0])
    return f"{n + 1:032}.{random.random():016}"
