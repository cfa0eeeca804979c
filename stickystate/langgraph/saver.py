"""``StickyStateSaver`` (on the sync ``Client``) and ``AsyncStickyStateSaver`` (on the
``AsyncClient``): LangGraph checkpoint savers. What they store where is
stickystate/langgraph/layout.py; what each operation reads and writes is
stickystate/langgraph/plans.py, shared by both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (BaseCheckpointSaver, ChannelVersions, Checkpoint, CheckpointMetadata,
                                       CheckpointTuple, SerializerProtocol)

from stickystate.client import AsyncClient, Client
from stickystate.langgraph import plans
from stickystate.langgraph.layout import Layout, next_version


class _Base(BaseCheckpointSaver[str]):
    def __init__(self, *, prefix: str, ttl_s: float | None, durability: str,
                 serde: SerializerProtocol | None) -> None:
        super().__init__(serde=serde)
        if durability not in ("memory", "log"):
            raise ValueError("durability must be 'memory' or 'log'")
        self.layout = Layout(prefix, self.serde)
        self.options = plans.Options(durability=durability, ttl_s=ttl_s)

    def get_next_version(self, current: str | None, channel: None) -> str:
        return next_version(current)


class StickyStateSaver(_Base):
    """A LangGraph checkpointer keeping threads in stickystate, on the sync ``Client``.

    ``StickyStateSaver(client)`` or ``StickyStateSaver(url=..., api_key=...)`` (then it
    owns its client and closes it). ``durability``: of every write, ``log`` by default (a
    checkpoint is acknowledged once Kafka has it: it survives the loss of its node).
    ``ttl_s``: the TTL of the sessions a thread is kept in (None: the server's
    ``--default-ttl-s``); each session's TTL slides with its writes. The async methods
    run the sync ones in a worker thread.
    """

    def __init__(self, client: Client | None = None, *, url: str | Sequence[str] | None = None,
                 api_key: str | None = None, prefix: str = "lg", ttl_s: float | None = None,
                 durability: str = "log", serde: SerializerProtocol | None = None) -> None:
        super().__init__(prefix=prefix, ttl_s=ttl_s, durability=durability, serde=serde)
        self._owned = client is None
        self.client = client if client is not None else Client(url, api_key)

    def _run(self, plan: plans.Plan) -> Any:
        return plans.run_sync(self.client, plan, self.options)

    def close(self) -> None:
        if self._owned:
            self.client.close()

    def __enter__(self) -> StickyStateSaver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- sync ---------------------------------------------------------------------------------
    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        result: CheckpointTuple | None = self._run(plans.get_tuple(self.layout, config))
        return result

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None) -> Iterator[CheckpointTuple]:
        yield from self._run(plans.list_(self.layout, config, filter, before, limit))

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> RunnableConfig:
        result: RunnableConfig = self._run(plans.put(self.layout, config, checkpoint, metadata))
        return result

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                   task_path: str = "") -> None:
        self._run(plans.put_writes(self.layout, config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        self._run(plans.delete_thread(self.layout, str(thread_id)))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._run(plans.delete_for_runs(self.layout, list(run_ids)))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._run(plans.copy_thread(self.layout, str(source_thread_id), str(target_thread_id)))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._run(plans.prune(self.layout, [str(t) for t in thread_ids], strategy))

    # -- async: the sync methods in a worker thread --------------------------------------------------
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None, limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        found = await asyncio.to_thread(lambda: [*self.list(config, filter=filter, before=before, limit=limit)])
        for item in found:
            yield item

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
                   new_versions: ChannelVersions) -> RunnableConfig:
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                          task_path: str = "") -> None:
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await asyncio.to_thread(self.delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await asyncio.to_thread(self.delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await asyncio.to_thread(self.copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await asyncio.to_thread(self.prune, thread_ids, strategy=strategy)


class AsyncStickyStateSaver(_Base):
    """A LangGraph checkpointer keeping threads in stickystate, on the ``AsyncClient``
    (independent reads of ``list``, ``copy_thread``, ``delete_*`` run concurrently).

    Options as ``StickyStateSaver``. Use ``async with``, or ``await aclose()``. The sync
    methods may be called from another thread than the event loop's (they are run on
    it, as LangGraph's async Postgres saver does); on the loop's own thread they raise.
    """

    def __init__(self, client: AsyncClient | None = None, *, url: str | Sequence[str] | None = None,
                 api_key: str | None = None, prefix: str = "lg", ttl_s: float | None = None,
                 durability: str = "log", serde: SerializerProtocol | None = None) -> None:
        super().__init__(prefix=prefix, ttl_s=ttl_s, durability=durability, serde=serde)
        self._owned = client is None
        self.client = client if client is not None else AsyncClient(url, api_key)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _run(self, plan: plans.Plan) -> Any:
        self._loop = asyncio.get_running_loop()
        return await plans.run_async(self.client, plan, self.options)

    async def aclose(self) -> None:
        if self._owned:
            await self.client.close()

    async def __aenter__(self) -> AsyncStickyStateSaver:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- async ----------------------------------------------------------------------------------
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        result: CheckpointTuple | None = await self._run(plans.get_tuple(self.layout, config))
        return result

    async def alist(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None, limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        for item in await self._run(plans.list_(self.layout, config, filter, before, limit)):
            yield item

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
                   new_versions: ChannelVersions) -> RunnableConfig:
        result: RunnableConfig = await self._run(plans.put(self.layout, config, checkpoint, metadata))
        return result

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                          task_path: str = "") -> None:
        await self._run(plans.put_writes(self.layout, config, writes, task_id, task_path))

    async def adelete_thread(self, thread_id: str) -> None:
        await self._run(plans.delete_thread(self.layout, str(thread_id)))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._run(plans.delete_for_runs(self.layout, list(run_ids)))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._run(plans.copy_thread(self.layout, str(source_thread_id), str(target_thread_id)))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self._run(plans.prune(self.layout, [str(t) for t in thread_ids], strategy))

    # -- sync: run on the event loop from another thread ----------------------------------------
    def _on_loop(self, coro: Any) -> Any:
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and (loop is None or running is loop):
            coro.close()
            raise asyncio.InvalidStateError(
                "AsyncStickyStateSaver's sync methods cannot run on its event loop's thread: use the a* methods "
                "(graph.ainvoke), or StickyStateSaver for graph.invoke")
        if loop is None or loop.is_closed():
            coro.close()
            raise asyncio.InvalidStateError("AsyncStickyStateSaver has no running event loop yet: use the a* methods")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        result: CheckpointTuple | None = self._on_loop(self.aget_tuple(config))
        return result

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None) -> Iterator[CheckpointTuple]:
        yield from self._on_loop(self._run(plans.list_(self.layout, config, filter, before, limit)))

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> RunnableConfig:
        result: RunnableConfig = self._on_loop(self.aput(config, checkpoint, metadata, new_versions))
        return result

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                   task_path: str = "") -> None:
        self._on_loop(self.aput_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        self._on_loop(self.adelete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._on_loop(self.adelete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._on_loop(self.acopy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._on_loop(self.aprune(thread_ids, strategy=strategy))
