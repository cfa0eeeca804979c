"""Fault schedule against a LocalCluster: seeded, one fault at a time, every fault timed.

Fault kinds:

- ``kill9``          SIGKILL a node, restart it (empty memory) after ``hold_s``;
- ``sigstop``        SIGSTOP a node (a zombie that still holds its sockets), SIGCONT after ``hold_s``;
- ``graceful``       SIGTERM a node, wait for it to exit, start it again after ``hold_s``;
- ``kafka_restart``  stop the broker cleanly, start it after ``hold_s``   (own broker only);
- ``kafka_kill``     SIGKILL the broker, start it after ``hold_s``        (own broker only);
- ``broker_kill``    SIGKILL one broker of a replicated cluster (``--brokers 3``), start it after ``hold_s``;
- ``broker_restart`` stop one broker of it cleanly, start it after ``hold_s``;
- ``router_kill``    SIGKILL one of several routers (``--routers 2``), start it after ``hold_s``;
- ``router_pause``   SIGSTOP one of several routers, SIGCONT after ``hold_s``.

A router fault's ``detail`` says whether it hit the placement leader.

Faults are strictly sequential: the next one starts only after the previous target is
back AND the cluster is ready again (router settled, every node healthy and serving)
plus a gap of at least ``min_gap_s``. So with 3 nodes at most one is ever down. If the
cluster does not become ready again, no further fault is injected (and that is
reported).

Runs in its own thread (LocalCluster's calls block: waiting for a process to exit,
for the broker to start); the workload keeps running on the asyncio loop meanwhile.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from stickystate.local_cluster import LocalCluster

NODE_KINDS = ("kill9", "sigstop", "graceful")
KAFKA_KINDS = ("kafka_restart", "kafka_kill")
BROKER_KINDS = ("broker_kill", "broker_restart")  # one broker of the run's own replicated cluster
ROUTER_KINDS = ("router_kill", "router_pause")  # one of several routers
ALL_KINDS = NODE_KINDS + KAFKA_KINDS + BROKER_KINDS + ROUTER_KINDS

# hold_s ranges: how long the target stays down / paused
HOLD_RANGES = {
    "kill9": (1.0, 5.0),
    "sigstop": (0.5, 8.0),  # short pauses may end before the router notices (~1 s)
    "graceful": (0.0, 2.0),
    "kafka_restart": (1.0, 5.0),
    "kafka_kill": (1.0, 5.0),
    "broker_kill": (1.0, 5.0),
    "broker_restart": (1.0, 5.0),
    "router_kill": (1.0, 5.0),
    "router_pause": (1.0, 8.0),  # longer than the leader's session timeout: the other takes over
}


@dataclass
class Fault:
    index: int
    kind: str
    target: str  # node id, "kafka", "kafka<broker id>" (BROKER_KINDS) or a router's name (ROUTER_KINDS)
    hold_s: float
    t_fault: float = 0.0  # the fault took effect (signal sent / stop begun), unix s
    t_fault_done: float | None = None  # the fault action returned (process gone, broker stopped)
    t_recover: float | None = None  # restart / SIGCONT issued
    t_recovered: float | None = None  # target back (process started, broker serving)
    t_ready: float | None = None  # cluster ready again
    shards: list[int] = field(default_factory=list)  # shards the target owned when hit (all, for Kafka)
    generation_before: int | None = None
    error: str | None = None
    detail: str = ""  # "active controller" (a broker fault's KRaft leader); "placement leader" (a router fault's)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, float):
                d[k] = round(v, 6)
        return d

    def describe(self) -> str:
        detail = f", {self.detail}" if self.detail else ""
        return f"#{self.index} {self.kind} {self.target} (hold {self.hold_s:.1f}s{detail})"


@dataclass
class ScheduleConfig:
    seed: int = 1
    duration_s: float = 120.0  # no new fault starts after this (unless min_faults not reached)
    min_faults: int = 3
    min_gap_s: float = 5.0
    warmup_s: float = 5.0
    kinds: tuple[str, ...] = NODE_KINDS
    first_kinds: tuple[str, ...] = ()  # forced order of the first faults (quick mode)
    hold_overrides: dict[str, float] = field(default_factory=dict)  # fixed hold per kind (quick mode)
    ready_timeout_s: float = 90.0
    max_faults: int = 1000


class FaultSchedule:
    def __init__(self, cluster: LocalCluster, cfg: ScheduleConfig) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.rng = random.Random(cfg.seed * 7919 + 17)
        kinds = tuple(k for k in cfg.kinds if k in ALL_KINDS)
        if any(k in KAFKA_KINDS for k in kinds) and cluster.kafka is None:
            kinds = tuple(k for k in kinds if k not in KAFKA_KINDS)  # not our broker: never touch it
        if any(k in BROKER_KINDS for k in kinds) and cluster.kafka_cluster is None:
            kinds = tuple(k for k in kinds if k not in BROKER_KINDS)  # no replicated cluster of ours
        if any(k in ROUTER_KINDS for k in kinds) and cluster.routers < 2:
            kinds = tuple(k for k in kinds if k not in ROUTER_KINDS)  # the only router: that is no HA test
        if not kinds:
            raise ValueError("no fault kinds left to inject")
        self.kinds = kinds
        self.faults: list[Fault] = []
        self.events: list[dict[str, Any]] = []  # free-form log of what the schedule did
        self.unrecovered: str | None = None
        self.started_at = 0.0
        self.finished_at: float | None = None
        self._abort = threading.Event()
        self._done = threading.Event()
        self._queue = list(cfg.first_kinds)
        # after the forced ones: every allowed kind once, shuffled, then at random
        rest = list(self.kinds)
        self.rng.shuffle(rest)
        self._queue += [k for k in rest if k not in self._queue]
        self._queue = [k for k in self._queue if k in self.kinds]

    # -- control --------------------------------------------------------------------
    def abort(self) -> None:
        self._abort.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _note(self, what: str, **kw: Any) -> None:
        self.events.append({"t": round(time.time(), 4), "what": what, **kw})

    # -- planning -------------------------------------------------------------------
    def _next_kind(self) -> str:
        if self._queue:
            return self._queue.pop(0)
        return self.rng.choice(self.kinds)

    def _hold(self, kind: str) -> float:
        if kind in self.cfg.hold_overrides:
            return self.cfg.hold_overrides[kind]
        lo, hi = HOLD_RANGES[kind]
        return round(self.rng.uniform(lo, hi), 2)

    def _target(self, kind: str) -> str:
        if kind in KAFKA_KINDS:
            return "kafka"
        if kind in BROKER_KINDS:
            assert self.cluster.kafka_cluster is not None
            return f"kafka{self.rng.choice(self.cluster.kafka_cluster.node_ids())}"
        if kind in ROUTER_KINDS:
            return self.rng.choice(self.cluster.router_names())
        return self.rng.choice(self.cluster.node_ids())

    # -- running --------------------------------------------------------------------
    def run(self) -> None:
        """Inject faults until the duration is over and at least min_faults were injected."""
        self.started_at = time.time()
        deadline = self.started_at + self.cfg.duration_s
        try:
            if self._abort.wait(self.cfg.warmup_s):
                return
            while not self._abort.is_set() and len(self.faults) < self.cfg.max_faults:
                if time.time() >= deadline and len(self.faults) >= self.cfg.min_faults:
                    break
                kind = self._next_kind()
                fault = Fault(len(self.faults) + 1, kind, self._target(kind), self._hold(kind))
                self._inject(fault)
                if self.unrecovered:
                    break
                gap = self.cfg.min_gap_s + self.rng.uniform(0, self.cfg.min_gap_s)
                if time.time() + gap >= deadline and len(self.faults) >= self.cfg.min_faults:
                    break  # the last fault's recovery gets the rest of the run
                if self._abort.wait(gap):
                    break
        except Exception as exc:  # a broken schedule must not leave the run hanging
            self.unrecovered = f"schedule crashed: {exc!r}"
            self._note("schedule crashed", error=traceback.format_exc())
        finally:
            self.finished_at = time.time()
            self._done.set()

    def _owned_shards(self, target: str) -> tuple[list[int], int | None]:
        view = self.cluster.cluster_view()
        shards = view.get("shards", {})
        if target.startswith("kafka") or self.cluster.is_router(target):
            return sorted(int(s) for s in shards), view.get("generation")
        return sorted(int(s) for s, o in shards.items() if o == target), view.get("generation")

    def _inject(self, f: Fault) -> None:
        c = self.cluster
        try:
            f.shards, f.generation_before = self._owned_shards(f.target)
        except Exception as exc:  # the router view is informational here
            f.error = f"router view unavailable: {exc!r}"
        self.faults.append(f)
        self._note("fault", fault=f.describe())
        try:
            if f.kind == "kill9":
                # the dead process: restart_node's stop() is a no-op, then a fresh start
                self._cycle(f, lambda: c.kill_node(f.target), lambda: c.restart_node(f.target))
            elif f.kind == "sigstop":
                self._cycle(f, lambda: c.signal_node(f.target, signal.SIGSTOP),
                            lambda: c.signal_node(f.target, signal.SIGCONT), pause=True)
            elif f.kind == "graceful":
                # SIGTERM, waits for the exit (SIGKILL after 15 s)
                self._cycle(f, c.procs[f.target].stop, lambda: c.restart_node(f.target))
            elif f.kind in KAFKA_KINDS:
                kafka = c.kafka
                assert kafka is not None
                self._cycle(f, kafka.kill if f.kind == "kafka_kill" else kafka.stop, kafka.start)
            elif f.kind in BROKER_KINDS:
                kc = c.kafka_cluster
                assert kc is not None
                broker = int(f.target.removeprefix("kafka"))
                if kc.active_controller() == broker:
                    f.detail = "active controller"
                stop = kc.kill if f.kind == "broker_kill" else kc.stop_broker
                self._cycle(f, lambda: stop(broker), lambda: kc.start_broker(broker))
            elif f.kind in ROUTER_KINDS:
                if (self.cluster.cluster_view().get("router") or {}).get("leader") == f.target:
                    f.detail = "placement leader"
                if f.kind == "router_kill":
                    self._cycle(f, lambda: c.kill_router(f.target), lambda: c.start_router(f.target))
                else:
                    proc = c.procs[f.target]
                    self._cycle(f, lambda: proc.signal(signal.SIGSTOP), lambda: proc.signal(signal.SIGCONT),
                                pause=True)
            else:  # pragma: no cover - guarded by ALL_KINDS
                raise ValueError(f"unknown fault kind {f.kind!r}")
        except Exception as exc:
            f.error = f"{type(exc).__name__}: {exc}"
            self._note("fault action failed", fault=f.describe(), error=traceback.format_exc())
        try:
            self._wait_settled(self.cfg.ready_timeout_s)
            f.t_ready = time.time()
            self._note("ready", fault=f.describe(), after_s=round(f.t_ready - f.t_fault, 3))
        except Exception as exc:
            self.unrecovered = f"cluster not ready {self.cfg.ready_timeout_s}s after {f.describe()}: {exc}"
            f.error = (f.error + "; " if f.error else "") + "cluster did not become ready again"
            self._note("not ready", fault=f.describe(), error=str(exc)[:2000])

    def _cycle(self, f: Fault, fault: Callable[[], object], recover: Callable[[], object], *,
               pause: bool = False) -> None:
        """One fault, timed: ``fault()``, hold for ``f.hold_s`` (or until aborted), ``recover()``.
        A pause is resumed even when the hold is interrupted: a stopped process must not
        outlive the run."""
        f.t_fault = time.time()
        fault()
        f.t_fault_done = time.time()
        held = False
        try:
            self._abort.wait(f.hold_s)
            held = True
        finally:
            if held or pause:
                f.t_recover = time.time()
                recover()
                f.t_recovered = time.time()

    def _wait_settled(self, timeout_s: float) -> None:
        """LocalCluster.wait_ready, plus: every healthy node has the router's current
        generation (wait_ready alone can pass in the instant after a node came back,
        before the router noticed and started the rebalance), twice in a row 0.3 s apart."""
        deadline = time.monotonic() + timeout_s
        good = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"cluster not settled in {timeout_s}s: {self.cluster.cluster_view()}")
            self._check_alive()
            self.cluster.wait_ready(left)
            self._check_alive()
            view = self.cluster.cluster_view()
            healthy = [n for n in view.get("nodes", []) if n.get("healthy")]
            if (view.get("settled") and {n["id"] for n in healthy} == set(self.cluster.node_ids())
                    and all(n.get("generation") == view.get("generation") for n in healthy)):
                good += 1
                if good >= 2:
                    return
            else:
                good = 0
            time.sleep(0.3)

    def _check_alive(self) -> None:
        """wait_ready only looks at live processes: a node that died (or never came back)
        must stop the schedule, or the next fault would take a second node down."""
        for nid in self.cluster.node_ids():
            proc = self.cluster.procs.get(nid)
            if proc is None or not proc.alive():
                code = None if proc is None or proc.popen is None else proc.popen.poll()
                tail = ""
                if proc is not None:
                    try:
                        tail = "\n".join(proc.log_path.read_text(errors="replace").splitlines()[-15:])
                    except OSError:
                        pass
                raise RuntimeError(f"node {nid} is not running (exit code {code}); log tail:\n{tail}")
        if self.cluster.kafka is not None and not self.cluster.kafka.is_running():
            raise RuntimeError("the Kafka broker is not running")
        if self.cluster.kafka_cluster is not None and not self.cluster.kafka_cluster.is_running():
            raise RuntimeError("a Kafka broker of the cluster is not running")

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.cfg.seed,
            "kinds": list(self.kinds),
            "faults": [f.to_json() for f in self.faults],
            "unrecovered": self.unrecovered,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "events": self.events,
        }
