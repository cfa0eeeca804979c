"""Several local Kafka brokers as one replicated KRaft cluster (``stickystate up --brokers 3``).

Each node is a :class:`~stickystate.kafka_local.LocalKafka` in combined broker+controller
mode: three JVMs make both a controller quorum of three (a majority of two survives one
death) and three brokers, so topics can have replication factor 3 with
``min.insync.replicas=2``. One controller plus three brokers would need a fourth JVM on a
2-core machine and leave the quorum itself a single point of failure.

The quorum is static (``controller.quorum.voters`` lists the three nodes); every node is
formatted with the same cluster id. All nodes start together: none becomes ready before
a majority of voters is up.

Failure detection is tuned down from Kafka's defaults so that a broker killed with -9
stops holding up ``acks=all`` writes quickly: the controller fences a broker (drops it
from every ISR and moves its leaderships) when its heartbeats stop for
``broker.session.timeout.ms``; defaults (9 s) are what made a broker kill cost seconds.

    with LocalKafkaCluster(tmp_path / "kafka", brokers=3) as kafka:
        kafka.kill(1)    # SIGKILL node 1
        kafka.start_broker(1)
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from stickystate.kafka_local import LocalKafka, _free_port, random_cluster_id

__all__ = ["CLUSTER_JVM_OPTS", "LocalKafkaCluster", "replicated_props"]

# KRaft logs every Raft state change of a node: "[<time>] INFO [RaftManager id=2] Completed
# transition to Leader(...)". A node restarted after being the leader logs ResignedState.
_RAFT_TRANSITION = re.compile(r"^\[(?P<ts>[^\]]+)\] INFO \[RaftManager id=\d+\] Completed transition to (?P<state>\w+)",
                              re.MULTILINE)

# Three JVMs on a small machine: a small heap each (the local cluster's topics are small).
CLUSTER_JVM_OPTS = (
    "-Xms128m",
    "-Xmx384m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)


def replicated_props(brokers: int) -> dict[str, object]:
    """Broker settings of a cluster of ``brokers`` nodes: topics at RF min(3, n),
    ``min.insync.replicas`` 2 from three brokers on, never an unclean leader."""
    rf = min(3, brokers)
    min_isr = 2 if rf >= 3 else 1
    return {
        "default.replication.factor": rf,
        "min.insync.replicas": min_isr,
        "unclean.leader.election.enable": "false",
        "offsets.topic.replication.factor": rf,
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": min_isr,
        # A dead broker is fenced (out of every ISR, its leaderships moved) after this;
        # the single broker's 4 s would stall acks=all writes for 4 s per broker kill.
        # Not lower on a loaded 2-core machine: at 1 s, killing the active controller left
        # the new one so busy it fenced the two live brokers too (10 s of 503s).
        "broker.heartbeat.interval.ms": 250,
        "broker.session.timeout.ms": 1500,
        # A dead active controller: the others notice after the fetch timeout, then elect.
        "controller.quorum.fetch.timeout.ms": 1500,
        "controller.quorum.election.timeout.ms": 500,
        # A follower that stops fetching but is not fenced leaves the ISR after this.
        "replica.lag.time.max.ms": 5000,
        "num.io.threads": 2,
        "background.threads": 2,
    }


class LocalKafkaCluster:
    """``brokers`` combined broker+controller nodes (ids 1..n) on 127.0.0.1, one
    ``LocalKafka`` each in ``data_dir/broker<i>``; logs in ``data_dir/broker<i>.log``
    (or ``log_dir``)."""

    def __init__(self, data_dir: Path, brokers: int = 3, *, ports: list[int] | None = None,
                 log_dir: Path | None = None, extra_props: dict[str, object] | None = None,
                 jvm_opts: tuple[str, ...] | list[str] = CLUSTER_JVM_OPTS) -> None:
        if brokers < 1:
            raise ValueError("brokers must be >= 1")
        self.data_dir = Path(data_dir).resolve()
        ports = list(ports or [])
        while len(ports) < brokers:
            p = _free_port()
            if p not in ports:  # the kernel may hand out one free port twice in a row
                ports.append(p)
        controller_ports: list[int] = []
        while len(controller_ports) < brokers:
            p = _free_port()
            if p not in ports and p not in controller_ports:
                controller_ports.append(p)
        voters = ",".join(f"{i + 1}@127.0.0.1:{cp}" for i, cp in enumerate(controller_ports))
        props = replicated_props(brokers) | {"controller.quorum.voters": voters} | dict(extra_props or {})
        logs = Path(log_dir).resolve() if log_dir else self.data_dir
        self.nodes = [LocalKafka(self.data_dir / f"broker{i + 1}", port=ports[i], controller_port=controller_ports[i],
                                 log_file=logs / f"broker{i + 1}.log", extra_props=props, jvm_opts=jvm_opts,
                                 node_id=i + 1)
                      for i in range(brokers)]
        self.cluster_id = random_cluster_id()

    @property
    def bootstrap(self) -> str:
        """Every broker, comma-separated (clients find the others through any one)."""
        return ",".join(n.bootstrap for n in self.nodes)

    def node(self, node_id: int) -> LocalKafka:
        return self.nodes[node_id - 1]

    def node_ids(self) -> list[int]:
        return [n.node_id for n in self.nodes]

    def is_running(self) -> bool:
        return all(n.is_running() for n in self.nodes)

    def active_controller(self) -> int | None:
        """The running node whose latest Raft transition (in its log) is to Leader: the
        active controller, as far as the logs say; None if none does."""
        best: tuple[str, int] | None = None
        for n in self.nodes:
            if not n.is_running():
                continue
            try:
                text = n.log_file.read_text(errors="replace")
            except OSError:
                continue
            last = None
            for m in _RAFT_TRANSITION.finditer(text):
                last = m
            if last is not None and last["state"] == "Leader" and (best is None or last["ts"] > best[0]):
                best = (last["ts"], n.node_id)
        return best[1] if best else None

    def start(self, timeout_s: float = 120) -> LocalKafkaCluster:
        """Start every stopped node at once (a node is ready only with a quorum); on a
        failure stop them all and raise the first error."""
        self._start_nodes([n for n in self.nodes if not n.is_running()], timeout_s)
        return self

    def start_broker(self, node_id: int, timeout_s: float = 120) -> None:
        """Start one node again (same ports and data: it rejoins and catches up)."""
        self._start_nodes([self.node(node_id)], timeout_s)

    def _start_nodes(self, nodes: list[LocalKafka], timeout_s: float) -> None:
        for n in nodes:
            if n.cluster_id is None and not n.is_formatted():
                n.cluster_id = self.cluster_id
        errors: list[BaseException] = []

        def run(n: LocalKafka) -> None:
            try:
                n.start(timeout_s=timeout_s)
            except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(n,), name=f"kafka-start-{n.node_id}") for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (no clean shutdown)."""
        self.node(node_id).kill()

    def stop_broker(self, node_id: int) -> None:
        """Clean shutdown of one node (controlled shutdown: leaderships move first)."""
        self.node(node_id).stop()

    def stop(self) -> None:
        """Stop every node; all at once, so no node waits on a quorum that is going away."""
        threads = [threading.Thread(target=n.stop, name=f"kafka-stop-{n.node_id}") for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def __enter__(self) -> LocalKafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalKafkaCluster({self.bootstrap}, {self.data_dir})"
