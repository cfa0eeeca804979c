"""``stickystate up`` as a process manager: when a child (a node, the router, the broker)
exits, say which and how, restart it after a backoff, give up on a crash loop.

Two parts. ``RestartBudget`` is the policy, pure (the clock is passed in): given how a
child exited and when, restart it after how long, or not, and why. ``Supervisor`` is the
I/O: it polls its children, prints what happened, and restarts each in its own thread (a
broker takes seconds to start; the others are watched meanwhile). The rest of the
cluster keeps serving throughout: nothing here stops a child that did not exit.

Policies (``--restart``): ``on-failure`` (the default) restarts a child that exited with
a non-zero code or was killed by a signal; ``always`` also one that exited with 0;
``no`` restarts nothing (the rest keep running). Backoff: ``backoff_s`` doubled for each
restart still inside the window, at most ``backoff_max_s``. Crash-loop bound: a child
that needs more than ``max_restarts`` restarts within ``window_s`` is given up on.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stickystate.kafka_cluster import LocalKafkaCluster
from stickystate.local_cluster import LocalCluster

MODES = ("on-failure", "always", "no")


@dataclass(frozen=True)
class RestartPolicy:
    mode: str = "on-failure"
    backoff_s: float = 0.5  # delay before the first restart in a window
    backoff_max_s: float = 8.0
    max_restarts: int = 5  # more restarts than this within window_s: a crash loop, give up
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"restart policy must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s or self.max_restarts < 1 or self.window_s <= 0:
            raise ValueError("need 0 <= backoff_s <= backoff_max_s, max_restarts >= 1 and window_s > 0")


@dataclass(frozen=True)
class Decision:
    restart: bool
    delay_s: float
    reason: str


def describe_exit(returncode: int) -> str:
    """``exit code 1`` / ``killed by SIGKILL`` (Popen gives -N for death by signal N)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class RestartBudget:
    """One child's restarts: when to restart it, and when to stop trying (pure)."""

    policy: RestartPolicy
    restarts: deque[float] = field(default_factory=deque)  # when each recent restart was decided

    def decide(self, returncode: int, now: float) -> Decision:
        mode = self.policy.mode
        if mode == "no":
            return Decision(False, 0.0, "not restarting (--restart no)")
        if returncode == 0 and mode == "on-failure":
            return Decision(False, 0.0, "exited cleanly: not restarting (--restart on-failure)")
        while self.restarts and now - self.restarts[0] > self.policy.window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.policy.max_restarts:
            return Decision(False, 0.0, f"{len(self.restarts)} restarts in the last {self.policy.window_s:g} s: "
                                        "a crash loop, giving up on it")
        delay = min(self.policy.backoff_max_s, self.policy.backoff_s * 2 ** len(self.restarts))
        self.restarts.append(now)
        return Decision(True, delay, f"restart {len(self.restarts)} of at most {self.policy.max_restarts} "
                                     f"in {self.policy.window_s:g} s")


@dataclass
class Child:
    """What the supervisor needs of a process: start it, its exit code (None while it runs)."""

    name: str
    start: Callable[[], None]
    returncode: Callable[[], int | None]
    pid: Callable[[], int | None]
    log: str
    budget: RestartBudget
    state: str = "running"  # running | restarting | down
    started_at: float = 0.0


def cluster_children(cluster: LocalCluster, policy: RestartPolicy) -> list[Child]:
    """The broker (when the cluster started its own), the nodes and the routers."""
    children = []
    kafka = cluster.kafka
    if kafka is not None:
        def start_kafka() -> None:
            kafka.start()

        children.append(Child("kafka", start_kafka, kafka.returncode, lambda: kafka.pid,
                              str(cluster.data_dir / "kafka.log"), RestartBudget(policy)))
    if cluster.kafka_cluster is not None:
        for broker_id in cluster.kafka_cluster.node_ids():
            children.append(_broker(cluster.kafka_cluster, broker_id, policy))
    for name in list(cluster.procs):
        children.append(_cluster_proc(cluster, name, policy))
    return children


def _broker(brokers: LocalKafkaCluster, broker_id: int, policy: RestartPolicy) -> Child:
    """One broker of a replicated local Kafka (``up --brokers N``)."""
    broker = brokers.node(broker_id)

    def start() -> None:
        broker.start()  # not brokers.start_broker(): a failed start would stop every broker

    return Child(f"kafka-{broker_id}", start, broker.returncode, lambda: broker.pid, str(broker.log_file),
                 RestartBudget(policy))


def _cluster_proc(cluster: LocalCluster, name: str, policy: RestartPolicy) -> Child:
    """A node or a router: restarting one makes a new Proc, so look it up each time."""
    def start() -> None:
        if cluster.is_router(name):
            cluster.start_router(name)
        else:
            cluster.start_node(name)

    def returncode() -> int | None:
        return cluster.procs[name].returncode()

    def pid() -> int | None:
        return cluster.procs[name].pid

    return Child(name, start, returncode, pid, str(cluster.procs[name].log_path), RestartBudget(policy))


class Supervisor:
    """Watches children until ``stop()``; restarts the ones that exit, as their budget says."""

    def __init__(self, children: list[Child], out: Callable[[str], None], poll_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.children = children
        self.out = out
        self.poll_s = poll_s
        self.clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a restart starts a process only while we are not stopping
        self._restarts: list[threading.Thread] = []
        for child in children:
            child.started_at = clock()

    def run(self) -> None:
        """Poll until ``stop()`` (call it from a signal handler or another thread)."""
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.poll_s)

    def check(self) -> None:
        for child in self.children:
            if child.state != "running":
                continue
            code = child.returncode()
            if code is None:
                continue
            now = self.clock()
            decision = child.budget.decide(code, now)
            how = f"{child.name} (pid {child.pid()}) {describe_exit(code)} after {now - child.started_at:.1f} s"
            if not decision.restart:
                child.state = "down"
                self.out(f"{how}; {decision.reason}; the rest keep running (log: {child.log})")
                continue
            child.state = "restarting"
            self.out(f"{how}; restarting it in {decision.delay_s:g} s ({decision.reason})")
            thread = threading.Thread(target=self._restart, args=(child, decision.delay_s),
                                      name=f"restart-{child.name}", daemon=True)
            self._restarts = [t for t in self._restarts if t.is_alive()] + [thread]
            thread.start()

    def _restart(self, child: Child, delay_s: float) -> None:
        while not self._stop.wait(delay_s):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    child.start()
                    error = None
                except Exception as exc:  # e.g. a broker that did not come up in time
                    error = exc
            child.started_at = self.clock()
            if error is None:
                child.state = "running"
                self.out(f"{child.name} restarted (pid {child.pid()})")
                return
            decision = child.budget.decide(1, self.clock())  # a failed start counts as a failure
            why = (str(error).splitlines() or [type(error).__name__])[0]  # the log has the rest
            if not decision.restart:
                child.state = "down"
                self.out(f"{child.name} failed to start ({why}); {decision.reason}; the rest keep running "
                         f"(log: {child.log})")
                return
            self.out(f"{child.name} failed to start ({why}); trying again in {decision.delay_s:g} s "
                     f"({decision.reason})")
            delay_s = decision.delay_s

    def stop(self) -> None:
        """No restart starts after this returns (one in progress is waited for)."""
        self._stop.set()
        with self._lock:
            pass

    def join(self, timeout_s: float) -> None:
        """Wait for the restart threads (after ``stop()`` they end at once, starting nothing)."""
        for thread in list(self._restarts):
            thread.join(timeout_s)
