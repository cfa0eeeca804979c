"""A stickystate cluster on three real Kafka brokers (KRaft, a quorum of three combined
nodes; stickystate/kafka_cluster.py): topics at replication factor 3 with
min.insync.replicas=2, and a broker killed with -9 under `log` writes loses nothing.

The writer is the chaos workload (chaos/workload.py: unique tokens per session, one
append in flight per session, every outcome recorded) and the verdict is the chaos
checker's (chaos/checker.py): every acknowledged append is in the final state and in the
log-rebuilt state, once and in order.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stickystate.chaos import checker
from stickystate.chaos.workload import Observation, Workload, WorkloadConfig
from stickystate.kafka_cluster import LocalKafkaCluster
from stickystate.local_cluster import LocalCluster
from tests.helpers import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory, kafka_cluster3: LocalKafkaCluster) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("on3"), kafka_bootstrap=kafka_cluster3.bootstrap, partitions=8,
                     topic=f"changes-{uuid.uuid4().hex[:10]}")
    c.start()
    try:
        yield c
    finally:
        c.stop()


async def _topic_shape(bootstrap: str, topic: str) -> tuple[set[int], str, str]:
    """(replica counts of the topic's partitions, its min.insync.replicas, its unclean.leader.election.enable)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        desc = await admin.describe_topics([topic])
        replicas = {len(p["replicas"]) for p in desc[0]["partitions"]}
        configs = _configs_of(await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)]))
        return replicas, configs["min.insync.replicas"], configs["unclean.leader.election.enable"]
    finally:
        await admin.close()


def _configs_of(responses: list[Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for resp in responses:
        for resource in resp.resources:
            for entry in resource[4]:  # (name, value, read_only, is_default, is_sensitive[, synonyms])
                out[entry[0]] = entry[1]
    return out


async def _isr_sizes(bootstrap: str, topic: str) -> set[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        desc = await admin.describe_topics([topic])
        return {len(p["isr"]) for p in desc[0]["partitions"]}
    finally:
        await admin.close()


async def _leaders(bootstrap: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        desc = await admin.describe_topics([topic])
        return {int(p["partition"]): int(p["leader"]) for p in desc[0]["partitions"]}
    finally:
        await admin.close()


def write_outage(appends: list[Observation], t_fault: float) -> dict[str, float | None]:
    """First failed append sent after the fault -> first successful append after it; and the
    fault -> the first success after the last failure (the longer, stricter figure)."""
    done = sorted((o for o in appends if o.done is not None and o.sent >= t_fault), key=lambda o: o.done or 0)
    failed = [o for o in done if not o.ok]
    first_failed = failed[0].done if failed else None
    last_failed = failed[-1].done if failed else t_fault
    after = [o.done for o in done if o.ok and (o.done or 0) > (first_failed or t_fault)]
    after_last = [o.done for o in done if o.ok and (o.done or 0) > (last_failed or t_fault)]
    return {"failed_appends": float(len(failed)),
            "first_failed_to_first_ok_s": None if first_failed is None or not after else after[0] - first_failed,
            "fault_to_first_ok_after_last_failure_s": after_last[0] - t_fault if after_last else None}


async def test_topics_are_created_at_rf3_min_insync_2(cluster3: LocalCluster) -> None:
    for topic in (cluster3.topic, f"{cluster3.topic}-snapshots"):
        replicas, min_isr, unclean = await _topic_shape(cluster3.kafka_bootstrap, topic)
        assert replicas == {3}, (topic, replicas)
        assert (min_isr, unclean) == ("2", "false"), topic


async def test_killing_a_broker_loses_no_acknowledged_log_write(cluster3: LocalCluster,
                                                                kafka_cluster3: LocalKafkaCluster) -> None:
    leaders = await _leaders(cluster3.kafka_bootstrap, cluster3.topic)
    # The hardest broker to lose: the active controller (a new one is elected, then fences the
    # dead broker); it leads partitions too. Else the leader of the most partitions.
    controller = kafka_cluster3.active_controller()
    victim = controller or max(set(leaders.values()), key=lambda b: sum(v == b for v in leaders.values()))
    cfg = WorkloadConfig(sessions=12, log_fraction=1.0, rate=60.0, read_rate=5.0, seed=15,
                         run_id=uuid.uuid4().hex[:6], request_timeout_s=60.0, drain_timeout_s=65.0)
    async with aiohttp.ClientSession() as http:
        wl = Workload(cluster3.router_url, cfg)
        await wl.setup(http)
        task = asyncio.create_task(wl.run(http))
        await wait_until(lambda: sum(o.ok for o in wl.appends) >= 60, timeout_s=60, what="60 appends before")
        t_kill = time.time()
        await asyncio.to_thread(kafka_cluster3.kill, victim)
        # writes go on without the broker: successes sent after the kill
        await wait_until(lambda: sum(o.ok and o.sent > t_kill + 1 for o in wl.appends) >= 60, timeout_s=90,
                         what="60 appends with the broker dead")
        outage = write_outage(wl.appends, t_kill)
        t_restart = time.time()
        await asyncio.to_thread(kafka_cluster3.start_broker, victim)
        t_back = time.time()
        await wait_until(lambda: sum(o.ok and o.sent > t_back for o in wl.appends) >= 60, timeout_s=90,
                         what="60 appends after the broker's restart")
        # the restarted broker caught up and is back in every partition's ISR
        async def isr_full() -> bool:
            return await _isr_sizes(cluster3.kafka_bootstrap, cluster3.topic) == {3}

        await wait_until(isr_full, timeout_s=90, what="the restarted broker back in every ISR", interval_s=0.5)
        wl.stop()
        await task
        await asyncio.to_thread(cluster3.wait_ready, 60)
        final = await wl.read_all(http)
    partitions, records, _, codec = await checker.read_sealed_log(cluster3.kafka_bootstrap, cluster3.topic,
                                                                  cluster3.master_keys)
    replay = checker.replay(records, partitions, {s.sid for s in wl.sessions}, codec)
    fault = {"index": 1, "kind": "broker_kill", "target": f"kafka{victim}", "t_fault": t_kill,
             "detail": "active controller" if victim == controller else "",
             "t_recover": t_restart, "t_ready": t_back, "shards": list(range(partitions)), "hold_s": t_restart - t_kill}
    rep = checker.check(sessions=wl.durability_of, appends=wl.appends, reads=wl.reads, final=final, log=replay,
                        faults=[fault], partitions=partitions)
    print(f"\nbroker {victim} ({'the active controller, ' if victim == controller else ''}leader of "
          f"{sum(v == victim for v in leaders.values())}/{len(leaders)} partitions) "
          f"killed -9 under log appends: {outage}; restart took {t_back - t_restart:.1f}s")
    print(checker.summary_text(rep))
    acked = rep["appends"]["acknowledged"]["log"]
    assert acked >= 180 and rep["lost_acked"]["log"] == 0 and rep["order_violations"]["count"] == 0, rep["failures"]
    assert rep["lost_acked"]["not_in_log_state"]["log"] == 0
    assert rep["log_vs_router"]["agree"] == rep["log_vs_router"]["compared"] == len(wl.sessions)
    assert rep["ok"], rep["failures"]
