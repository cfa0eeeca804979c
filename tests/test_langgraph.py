"""stickystate.langgraph against real clusters (a real Kafka broker): LangGraph's own
conformance suite (every capability, the optional ones too), real StateGraphs run with
the sync saver (invoke) and the async one (ainvoke) and resumed by new saver instances,
a graph that keeps going in the same process after its thread's owner is killed -9
between two steps, and a checkpoint over the server's limit."""

from __future__ import annotations

import operator
import uuid
from collections.abc import AsyncGenerator
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import ProgressCallbacks
from langgraph.graph import END, START, StateGraph

from stickystate.client import Client, RetryPolicy
from stickystate.langgraph import AsyncStickyStateSaver, CheckpointTooLarge, StickyStateSaver
from stickystate.local_cluster import LocalCluster

pytestmark = pytest.mark.kafka

KEY = "langgraph-key-0123456789"
SECRET = "langgraph-secret-0123456789"


@pytest.fixture(scope="module")
def cluster_options() -> dict[str, Any]:
    return {"auth": "keys", "api_keys": f"{KEY}=agents", "internal_secret": SECRET,
            "node_env": {"STICKYSTATE_MAX_STATE_BYTES": "200000", "STICKYSTATE_MAX_BODY_BYTES": "1000000"}}


def prefix() -> str:
    return "t" + uuid.uuid4().hex[:8]


# -- the conformance suite ----------------------------------------------------------------------


async def test_conformance_suite_passes_every_capability(cluster: LocalCluster) -> None:
    @checkpointer_test(name="AsyncStickyStateSaver")
    async def saver_factory() -> AsyncGenerator[AsyncStickyStateSaver, None]:
        async with AsyncStickyStateSaver(url=cluster.router_url, api_key=KEY, prefix=prefix()) as saver:
            yield saver

    report = await validate(saver_factory, progress=ProgressCallbacks.verbose())
    report.print_report()
    results = report.results
    summary = {cap: (r.detected, r.passed, r.tests_passed, r.tests_failed) for cap, r in results.items()}
    print("conformance:", report.conformance_level(), summary,
          "tests passed:", sum(r.tests_passed for r in results.values()),
          "failed:", sum(r.tests_failed for r in results.values()))
    assert set(results) == {"put", "put_writes", "get_tuple", "list", "delete_thread", "delete_for_runs",
                            "copy_thread", "prune"}
    assert all(r.detected and r.passed for r in results.values()), summary
    assert report.passed_all() and report.conformance_level() == "FULL"
    assert sum(r.tests_passed for r in results.values()) >= 70


# -- real graphs ------------------------------------------------------------------------------------


class Steps(TypedDict):
    done: Annotated[list[str], operator.add]


def counting_graph(ran: list[str], steps: int, on_step: Any = None) -> StateGraph:
    """step1 -> step2 -> ... -> stepN: each appends its name to the state and to ``ran``
    (what really ran, outside the checkpoints)."""
    builder = StateGraph(Steps)

    def make(name: str) -> Any:
        def step(state: Steps) -> dict[str, Any]:
            if on_step is not None:
                on_step(name, state)
            ran.append(name)
            return {"done": [name]}
        return step

    names = [f"step{i}" for i in range(1, steps + 1)]
    for name in names:
        builder.add_node(name, make(name))
    builder.add_edge(START, names[0])
    for a, b in zip(names, names[1:]):
        builder.add_edge(a, b)
    builder.add_edge(names[-1], END)
    return builder


def test_a_graph_with_the_sync_saver_runs_invoke_and_resumes_in_a_new_saver(cluster: LocalCluster) -> None:
    ran: list[str] = []
    thread = {"configurable": {"thread_id": f"sync-{uuid.uuid4().hex[:8]}"}}
    p = prefix()
    with StickyStateSaver(url=cluster.router_url, api_key=KEY, prefix=p) as saver:
        graph = counting_graph(ran, 4).compile(checkpointer=saver, interrupt_before=["step3"])
        assert graph.invoke({"done": []}, thread) == {"done": ["step1", "step2"]}
        assert ran == ["step1", "step2"]
        history = list(saver.list(thread))
        assert len(history) >= 3 and history[0].metadata["step"] > history[-1].metadata["step"]
    with StickyStateSaver(url=cluster.router_url, api_key=KEY, prefix=p) as fresh:  # a new process would do the same
        graph = counting_graph(ran, 4).compile(checkpointer=fresh, interrupt_before=["step3"])
        assert graph.get_state(thread).values == {"done": ["step1", "step2"]}
        assert graph.get_state(thread).next == ("step3",)
        assert graph.invoke(None, thread) == {"done": ["step1", "step2", "step3", "step4"]}
    assert ran == ["step1", "step2", "step3", "step4"]


async def test_a_graph_with_the_async_saver_runs_ainvoke_and_resumes_in_a_new_saver(cluster: LocalCluster) -> None:
    ran: list[str] = []
    thread = {"configurable": {"thread_id": f"async-{uuid.uuid4().hex[:8]}"}}
    p = prefix()
    async with AsyncStickyStateSaver(url=cluster.router_url, api_key=KEY, prefix=p) as saver:
        graph = counting_graph(ran, 5).compile(checkpointer=saver, interrupt_after=["step2"])
        assert await graph.ainvoke({"done": []}, thread) == {"done": ["step1", "step2"]}
        assert [c.metadata["step"] async for c in saver.alist(thread, limit=2)] == [2, 1]
    async with AsyncStickyStateSaver(url=cluster.router_url, api_key=KEY, prefix=p) as fresh:
        graph = counting_graph(ran, 5).compile(checkpointer=fresh, interrupt_after=["step2"])
        state = await graph.aget_state(thread)
        assert state.values == {"done": ["step1", "step2"]} and state.next == ("step3",)
        assert await graph.ainvoke(None, thread) == {"done": [f"step{i}" for i in range(1, 6)]}
        # the thread lives in stickystate: copy, prune and delete it through the saver
        copy = {"configurable": {"thread_id": thread["configurable"]["thread_id"] + "-copy"}}
        await fresh.acopy_thread(thread["configurable"]["thread_id"], copy["configurable"]["thread_id"])
        assert (await graph.aget_state(copy)).values == (await graph.aget_state(thread)).values
        await fresh.aprune([copy["configurable"]["thread_id"]])
        assert len([c async for c in fresh.alist(copy)]) == 1
        await fresh.adelete_thread(thread["configurable"]["thread_id"])
        assert await fresh.aget_tuple(thread) is None
    assert ran == [f"step{i}" for i in range(1, 6)]


def test_the_thread_ttl_is_the_sessions_ttl(cluster: LocalCluster) -> None:
    thread = {"configurable": {"thread_id": "ttl-thread"}}
    p = prefix()
    with StickyStateSaver(url=cluster.router_url, api_key=KEY, prefix=p, ttl_s=123) as saver:
        graph = counting_graph([], 1).compile(checkpointer=saver)
        graph.invoke({"done": []}, thread)
        with Client(cluster.router_url, api_key=KEY) as client:
            assert client.meta(f"{p}:t:pttl-thread")["ttl_s"] == 123
            assert client.meta(saver.layout.checkpoint_session(
                "ttl-thread", "", saver.get_tuple(thread).config["configurable"]["checkpoint_id"]))["ttl_s"] == 123


def test_a_checkpoint_over_the_server_limit_is_a_clear_error(cluster: LocalCluster) -> None:
    thread = {"configurable": {"thread_id": "too-big"}}

    class Big(TypedDict):
        blob: str

    builder = StateGraph(Big)
    builder.add_node("grow", lambda state: {"blob": "x" * 300_000})
    builder.add_edge(START, "grow")
    builder.add_edge("grow", END)
    with StickyStateSaver(url=cluster.router_url, api_key=KEY, prefix=prefix()) as saver:
        graph = builder.compile(checkpointer=saver)
        with pytest.raises(CheckpointTooLarge) as too_large:
            graph.invoke({"blob": ""}, thread)
    assert too_large.value.limit == "max_state_bytes"
    assert "max_state_bytes" in str(too_large.value) and "too-big" in str(too_large.value)


# -- failover -----------------------------------------------------------------------------------------


def test_a_graph_continues_after_its_threads_owner_is_killed_between_steps(start_cluster: Any) -> None:
    """Six steps; during step 4 (after step 3's checkpoint was acknowledged, at the
    saver's durability log) the node owning the thread's index is killed with -9. The same invoke() goes on:
    step 4's checkpoint is retried on the new owner, steps 5 and 6 follow, and every step
    ran exactly once, in order."""
    cluster: LocalCluster = start_cluster(nodes=3, standbys=1, partitions=8)
    ran: list[str] = []
    thread_id = "failover-thread"
    thread = {"configurable": {"thread_id": thread_id}}
    killed: list[str] = []

    with Client(cluster.router_url, retry=RetryPolicy(total_timeout_s=60)) as client, \
            StickyStateSaver(client, prefix="fo") as saver:
        def on_step(name: str, state: Steps) -> None:
            if name == "step4":
                assert state["done"] == ["step1", "step2", "step3"]  # from the last checkpoint
                owner = client.meta(saver.layout.thread_session(thread_id))["owner"]
                cluster.kill_node(owner)
                killed.append(owner)

        graph = counting_graph(ran, 6, on_step).compile(checkpointer=saver)
        # durability="sync": each step's checkpoint is saved before the next step starts
        # (LangGraph's default, "async", saves it while the next step runs)
        result = graph.invoke({"done": []}, thread, durability="sync")
        assert killed and result == {"done": [f"step{i}" for i in range(1, 7)]}
        assert ran == [f"step{i}" for i in range(1, 7)]  # none lost, none run twice
        assert client.core.counts["transport_errors"] + client.core.counts["not_owner"] >= 1  # the kill was felt
        assert client.meta(saver.layout.thread_session(thread_id))["owner"] != killed[0]
        steps = [c.metadata["step"] for c in saver.list(thread)]
        assert steps == sorted(steps, reverse=True) and steps[0] == 6 and len(steps) == len(set(steps))
