"""LangGraph checkpoint savers that keep each thread's checkpoints and pending writes in
stickystate: ``StickyStateSaver`` (sync, on ``stickystate.client.Client``) and
``AsyncStickyStateSaver`` (async, on ``AsyncClient``). ``pip install stickystate[langgraph]``.

    from stickystate.langgraph import StickyStateSaver
    graph = builder.compile(checkpointer=StickyStateSaver(url="http://127.0.0.1:8100"))

The layout, in the sessions of the client's tenant (prefix ``lg`` by default):

=====================  ==================================================================
session                data
=====================  ==================================================================
``lg:t:<thread>``      the thread's index: ``{"thread_id", "ns": {<checkpoint_ns>:
                       {<checkpoint_id>: {"p": parent id, "m": metadata, "r": run id}}}}``
``lg:c:<hash>``        one checkpoint (hash of thread, namespace, id): ``{"t", "ns", "id",
                       "p", "m", "c": the checkpoint with its channel values, "w": its
                       pending writes by "<task id>|<idx>"}``
``lg:r:<run>``         the checkpoints a run wrote: ``{"refs": {<checkpoint session>:
                       [thread, ns, id]}}`` (for ``delete_for_runs``)
``lg:threads``         the directory of threads, for ``list(None)``
=====================  ==================================================================

A put writes the checkpoint's session, then merges its entry into the thread's index
(and the run's refs): a reader never finds an index entry whose checkpoint was not
written. ``get_tuple`` of the latest checkpoint reads the index, then that checkpoint; of
a given checkpoint id, just its session. ``list`` reads the index, filters on its
metadata (``filter``, ``before``, ``limit``), then reads the chosen checkpoints.
Writes go at durability ``log`` (acknowledged once Kafka has them, so a checkpoint
survives the death of its node); sessions get the saver's ``ttl_s`` (None: the server's
``--default-ttl-s``), sliding with each write: a thread left alone that long disappears.
A checkpoint (its channel values, with its writes) must fit in one session: one over the
server's ``max_state_bytes`` or ``max_body_bytes`` raises ``CheckpointTooLarge``, naming
the limit. Versions (``get_next_version``) are ordered as LangGraph's own savers order
them. ``prune(strategy="keep_latest")`` keeps each namespace's newest checkpoint and
drops the others, as LangGraph's savers do (not ``DeltaChannel``-aware: see
``BaseCheckpointSaver.prune``).
"""

from stickystate.langgraph.plans import CheckpointTooLarge
from stickystate.langgraph.saver import AsyncStickyStateSaver, StickyStateSaver

__all__ = ["AsyncStickyStateSaver", "CheckpointTooLarge", "StickyStateSaver"]
