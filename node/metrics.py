"""Prometheus metrics of a node (prometheus-client, one registry per app).

Named by the Prometheus conventions; never labelled by session id (unbounded
cardinality). Gauges that describe the store are read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stickystate.protocol import LATENCY_BUCKETS

if TYPE_CHECKING:
    from stickystate.node.store import NodeStore



class NodeMetrics:
    def __init__(self, store: NodeStore) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("stickystate_requests", "HTTP requests handled by the node, by operation and status",
                                ["op", "status"], registry=self.registry)
        self.latency = Histogram("stickystate_request_duration_seconds", "Node request latency by operation",
                                 ["op"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StoreCollector(store))


class _StoreCollector(Collector):
    def __init__(self, store: NodeStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        st = self.store
        sessions = GaugeMetricFamily("stickystate_sessions", "Sessions held in memory, by role", labels=["role"])
        size = GaugeMetricFamily("stickystate_session_bytes", "Bytes of session data held (JSON size), by role",
                                 labels=["role"])
        owned = [st.shards[s] for s in st.serving if s in st.shards]
        standby = [sh for s, sh in st.shards.items() if s not in st.serving]
        for role, of_role in (("owned", owned), ("standby", standby)):
            sessions.add_metric([role], sum(sh.session_count() for sh in of_role))
            size.add_metric([role], sum(sh.data_bytes for sh in of_role))
        yield sessions
        yield size
        shards = GaugeMetricFamily("stickystate_shards", "Shards by role on this node", labels=["role"])
        shards.add_metric(["owned"], len(st.serving))
        shards.add_metric(["recovering"], len(st.recovering))
        shards.add_metric(["standby"], len(st.standby - st.serving))
        yield shards
        rep, own, snaps = st.replicator, st.ownership, st.snapshotting
        yield GaugeMetricFamily("stickystate_replication_queue_depth",
                                "Events queued or in flight to Kafka (not yet acknowledged)", value=rep.depth)
        yield GaugeMetricFamily("stickystate_replication_lag_seconds",
                                "Age of the oldest event not yet acknowledged by Kafka", value=rep.oldest_unacked_age_s())
        counters = (
            ("replication_events_sent", "Events handed to the Kafka producer", rep.sent_total),
            ("replication_snapshot_records_acked", "Records of the snapshots topic acknowledged by Kafka",
             rep.other_acked_total),
            ("replication_events_acked", "Events acknowledged by Kafka (acks=all)", rep.acked_total),
            ("replication_send_seconds", "Sum of enqueue-to-acknowledgement time of acknowledged events",
             rep.send_latency_sum_s),
            ("replication_producer_rebuilds", "Kafka producers rebuilt after a failure", rep.rebuilds_total),
            ("replication_batch_retries", "Record batches sent again, unchanged, after a lost answer or a "
             "retriable error (no leader, not enough replicas)", rep.retries_total),
            ("replication_batches", "Record batches handed to the Kafka producer (one per partition per round, "
             "snapshots' included): the broker's work goes by batches",
             rep.batches_total),
            ("expirations", "Sessions expired by TTL", st.expiry.expired_total),
            ("recoveries", "Shards acquired (rebuilt or promoted)", own.recoveries_total),
            ("recovery_events_replayed", "Change events applied while rebuilding shards", own.recovery_events_total),
            ("recovery_seconds", "Total time spent acquiring shards", own.recovery_seconds_total),
            ("snapshots_written", "Session snapshots handed to the producer", snaps.snapshots_total),
            ("snapshot_tombstones", "Snapshot tombstones (deleted/expired sessions)", snaps.tombstones_total),
            ("snapshot_bytes", "Bytes of session snapshots handed to the producer", snaps.snapshot_bytes_total),
            ("snapshot_checkpoints", "Snapshot checkpoints written", snaps.checkpoints_total),
            ("follower_records", "Records read from Kafka by the follower", st.follower.records_total),
            ("data_keys_written", "Data keys of new sessions written to the keys topic", st.erasure.keys_written_total),
            ("sessions_erased", "Sessions erased (key and snapshot tombstoned) by delete or expiry",
             st.erasure.erased_total),
            ("records_skipped_erased", "Records read whose session's key is erased (not applied)",
             st.erasure.skipped_erased_total),
            ("records_refused", "Records refused: failed authentication, forged or undecodable (logged)",
             st.erasure.refused_total + (st.erasure.ring.refused_total if st.erasure.ring is not None else 0)),
        )
        for name, help_text, value in counters:
            yield CounterMetricFamily(f"stickystate_{name}", help_text, value=value)
        reads = CounterMetricFamily("stickystate_owner_log_reads",
                                    "Times an owned partition was read: to settle a hole in the acknowledgements, "
                                    "because its end moved past our writes (check), or after a stall", labels=["reason"])
        for reason, value in st.verification.owner_log_reads.items():
            reads.add_metric([reason], value)
        yield reads
        yield GaugeMetricFamily("stickystate_snapshot_tail_events",
                                "Change events after the last checkpoint, summed over owned shards (what a rebuild replays)",
                                value=snaps.tail_events())
        hub = st.watch
        yield GaugeMetricFamily("stickystate_watchers", "Open watch streams on this node", value=hub.watchers)
        yield GaugeMetricFamily("stickystate_watch_buffer_peak_events",
                                "Most changes any watcher's buffer has held (bounded by --watch-buffer-events)",
                                value=hub.buffer_peak)
        resets = CounterMetricFamily("stickystate_watch_resets", "Resets sent to watchers, by cause", labels=["cause"])
        for cause, value in hub.resets.items():
            resets.add_metric([cause], value)
        yield resets
        resumed = CounterMetricFamily("stickystate_watch_resumes", "Exact resumes of a watch, by where the changes "
                                      "came from (memory: the ring; log: the partition)", labels=["source"])
        for source, value in hub.resumed.items():
            resumed.add_metric([source], value)
        yield resumed
        yield GaugeMetricFamily("stickystate_ready", "1 when the node is ready to serve", value=1.0 if st.ready else 0.0)
        yield GaugeMetricFamily("stickystate_scrape_timestamp_seconds", "Time of this scrape", value=time.time())
