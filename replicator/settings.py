from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicatorSettings:
    """Kafka side of a node. Units in names; validated once."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    changes_topic: str = "changes"
    snapshots_topic: str = ""  # "": "snapshots" next to "changes", else "<changes_topic>-snapshots"
    keys_topic: str = ""  # "": "keys" next to "changes", else "<changes_topic>-keys" (replicator/keys.py)
    # How long a deleted session's wrapped data key may stay on the broker's disk, about
    # (README "Encryption and erasure"): the keys topic's max.compaction.lag.ms.
    keys_compaction_lag_ms: int = 3_600_000
    changes_retention_ms: int = -1  # retention.ms of the changes topic when it is created (-1: forever)
    partitions: int = 64
    # Topics created by a node: replication factor (0: min(3, brokers in the cluster)) and
    # min.insync.replicas (0: 2 when the factor is 3 or more, else 1). With acks=all (the
    # producer's) and min.insync.replicas=2 an acknowledged event is on two brokers.
    replication_factor: int = 0
    min_insync_replicas: int = 0
    queue_max: int = 10_000  # events queued or in flight before writes get 503
    kafka_deadline_s: float = 5.0  # oldest unacknowledged event older than this -> 503
    linger_ms: int = 5  # at most one produce round per 5 ms under load; Durability: log and claims skip it (producer.py)
    request_timeout_ms: int = 10_000
    # The follower's lazy reader reads standby partitions: a fetch waits for this many
    # bytes, or at most fetch_max_wait_ms, so one fetch carries many produce rounds' records
    # instead of one each. Whoever waits for a position (a takeover, a hole) has the shard
    # read by the eager reader meanwhile (replicator/follower.py).
    fetch_max_wait_ms: int = 200
    fetch_min_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if not self.snapshots_topic:
            derived = "snapshots" if self.changes_topic == "changes" else f"{self.changes_topic}-snapshots"
            object.__setattr__(self, "snapshots_topic", derived)
        if not self.keys_topic:
            object.__setattr__(self, "keys_topic",
                               "keys" if self.changes_topic == "changes" else f"{self.changes_topic}-keys")
        if len({self.changes_topic, self.snapshots_topic, self.keys_topic}) != 3:
            raise ValueError("changes_topic, snapshots_topic and keys_topic must differ")
        if self.keys_compaction_lag_ms < 1000:
            raise ValueError("keys_compaction_lag_ms must be >= 1000")
        if self.snapshots_topic == self.changes_topic:
            raise ValueError("snapshots_topic must differ from changes_topic")
        if self.changes_retention_ms < -1 or self.changes_retention_ms == 0:
            raise ValueError("changes_retention_ms must be -1 (forever) or > 0")
        if not self.kafka_bootstrap:
            raise ValueError("kafka_bootstrap is required")
        if not 1 <= self.partitions <= 4096:
            raise ValueError("partitions must be in 1..4096")
        if self.replication_factor < 0 or self.min_insync_replicas < 0:
            raise ValueError("replication_factor and min_insync_replicas must be >= 0 (0: automatic)")
        if self.replication_factor and self.min_insync_replicas > self.replication_factor:
            raise ValueError("min_insync_replicas must not exceed replication_factor")
        if self.queue_max < 1:
            raise ValueError("queue_max must be >= 1")
        if not 0 <= self.linger_ms <= 10_000:
            raise ValueError("linger_ms must be in 0..10000")
        if not 0 <= self.fetch_max_wait_ms <= 60_000 or self.fetch_min_bytes < 1:
            raise ValueError("fetch_max_wait_ms must be in 0..60000 and fetch_min_bytes >= 1")
        if self.kafka_deadline_s <= 0:
            raise ValueError("kafka_deadline_s must be > 0")
