"""A whole cluster on this machine as child processes: Kafka (unless given), nodes, routers.

Used by ``stickystate up`` and by the integration tests and chaos scripts, which need
real processes they can kill -9, pause and restart.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from stickystate import credentials
from stickystate.kafka_cluster import LocalKafkaCluster
from stickystate.kafka_local import LocalKafka


def free_port(avoid: Collection[int] = ()) -> int:
    """A port nothing listens on now, and none of ``avoid``: the kernel may hand out the same
    free port twice in a row (two nodes of one cluster got one port in a CI run: the second
    could not bind, and the cluster never became ready)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port


def http_json(url: str, timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - loopback only
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError):
        return 0, {}


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        log.close()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def returncode(self) -> int | None:
        """The exit code (-N: killed by signal N); None while it runs or before it started."""
        return None if self.popen is None else self.popen.poll()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            os.kill(self.popen.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def kill(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait()


@dataclass
class LocalCluster:
    data_dir: Path
    nodes: int = 3
    router_port: int = 0
    node_ports: list[int] = field(default_factory=list)
    kafka_bootstrap: str = ""
    kafka_port: int = 0
    partitions: int = 64
    standbys: int = 1
    node_env: dict[str, str] = field(default_factory=dict)
    router_env: dict[str, str] = field(default_factory=dict)
    kafka: LocalKafka | None = None
    procs: dict[str, Proc] = field(default_factory=dict)
    topic: str = "changes"
    auth: str = "open"  # router: keys|open; nodes check internal_secret whenever it is set
    api_keys: str = ""  # key=tenant,...
    internal_secret: str = ""
    # the nodes' master keys (kid:base64,...): made for each cluster unless given; "" with
    # node_env STICKYSTATE_ENCRYPTION=off runs plaintext
    master_keys: str = ""
    initial_nodes: int | None = None  # start only the first k nodes; the others can join later
    stopped: set[str] = field(default_factory=set)  # nodes stopped on purpose (not expected healthy)
    brokers: int = 1  # own Kafka: > 1 runs a replicated KRaft cluster (kafka_cluster.py)
    kafka_cluster: LocalKafkaCluster | None = None
    # Routers: procs "router" (at router_port), then "router2", ... (router_ports). More than
    # one: they elect a placement leader through Kafka (router/control.py).
    routers: int = 1
    router_ports: list[int] = field(default_factory=list)
    # A silent placement leader loses the role after this (0: the router's default, 6 s; the
    # brokers started here accept down to 1 s)
    leader_session_timeout_ms: int = 0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.routers < 1:
            raise ValueError("routers must be >= 1")
        taken = lambda: {self.router_port, *self.router_ports, *self.node_ports}  # noqa: E731
        if not self.router_port:
            self.router_port = self.router_ports[0] if self.router_ports else free_port(taken())
        if not self.router_ports:
            self.router_ports = [self.router_port]
        while len(self.router_ports) < self.routers:
            self.router_ports.append(free_port(taken()))
        if not self.master_keys:
            from stickystate.crypto import new_master_key_entry

            self.master_keys = new_master_key_entry("local-1")
        while len(self.node_ports) < self.nodes:
            self.node_ports.append(free_port(taken()))

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def router_names(self) -> list[str]:
        return ["router" if i == 0 else f"router{i + 1}" for i in range(self.routers)]

    @property
    def router_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.router_ports[: self.routers]]

    def url_of_router(self, name: str) -> str:
        return self.router_urls[self.router_names().index(name)]

    @staticmethod
    def is_router(name: str) -> bool:
        return name.startswith("router")

    def node_ids(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.nodes)]

    def node_url(self, node_id: str) -> str:
        return f"http://127.0.0.1:{self.node_ports[int(node_id[1:]) - 1]}"

    def start(self, timeout_s: float = 120.0) -> None:
        """Start everything and wait until ready; on any failure stop what was started."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        if not self.kafka_bootstrap and self.brokers > 1:
            self.kafka_cluster = LocalKafkaCluster(self.data_dir / "kafka", self.brokers,
                                                   ports=[self.kafka_port] if self.kafka_port else None,
                                                   log_dir=self.data_dir)
            self.kafka_cluster.start()
            self.kafka_bootstrap = self.kafka_cluster.bootstrap
        if not self.kafka_bootstrap:
            self.kafka = LocalKafka(self.data_dir / "kafka", port=self.kafka_port,
                                    log_file=self.data_dir / "kafka.log")
            self.kafka.start()
            self.kafka_bootstrap = self.kafka.bootstrap
        for nid in self.node_ids()[: self.initial_nodes or self.nodes]:
            self._make_node(nid).start()
        for name in self.router_names():
            self._make_router(name).start()
        self.wait_ready(timeout_s)

    def _base_env(self) -> dict[str, str]:
        """The children's environment: ours, with the cluster's secrets instead of any we have.
        Secrets travel only here (readable by their owner alone), never in argv, which `ps`
        and /proc/<pid>/cmdline show every user of the machine (stickystate/credentials.py)."""
        env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP" and k not in credentials.ALL_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        env[credentials.SECRET_ENV] = self.internal_secret
        env[credentials.KEYS_ENV] = self.api_keys
        return env

    def _make_node(self, nid: str) -> Proc:
        # Nodes authenticate direct clients as the router does: same auth mode, same API keys;
        # the master keys (secret too) travel like the other secrets, in the environment only.
        env = self._base_env() | {"STICKYSTATE_MASTER_KEYS": self.master_keys} | self.node_env
        port = self.node_ports[int(nid[1:]) - 1]
        args = [sys.executable, "-m", "stickystate.cli", "node", "--node-id", nid, "--port", str(port),
                "--kafka-bootstrap", self.kafka_bootstrap, "--partitions", str(self.partitions),
                "--changes-topic", self.topic, "--auth", self.auth if self.internal_secret else "open"]
        proc = Proc(nid, args, env, self.data_dir / f"{nid}.log")
        self.procs[nid] = proc
        return proc

    def _make_router(self, name: str = "router") -> Proc:
        env = self._base_env() | self.router_env
        spec = ",".join(f"{nid}={self.node_url(nid)}" for nid in self.node_ids())
        url = self.url_of_router(name)
        args = [sys.executable, "-m", "stickystate.cli", "router", "--port", url.rsplit(":", 1)[1],
                "--nodes", spec, "--partitions", str(self.partitions), "--standbys", str(self.standbys),
                "--auth", self.auth]
        if self.routers > 1:
            args += ["--placement-kafka", self.kafka_bootstrap, "--router-id", name, "--router-url", url,
                     "--placement-topic", f"{self.topic}-placement", "--router-group", f"{self.topic}-routers"]
            if self.leader_session_timeout_ms:
                args += ["--leader-session-timeout-ms", str(self.leader_session_timeout_ms)]
        proc = Proc(name, args, env, self.data_dir / f"{name}.log")
        self.procs[name] = proc
        return proc

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Routers ready and agreeing on the map, every live node healthy in their view, every
        node serving its shards."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.popen is not None and proc.popen.poll() is not None and self.is_router(name) \
                        and name not in self.stopped:
                    raise RuntimeError(f"{name} exited: see {proc.log_path}")
            try:
                views = [http_json(self.url_of_router(name) + "/v1/cluster", headers=self.client_headers)
                         for name in self.router_names() if name not in self.stopped]
                code, view = views[0]
                started = {n for n, p in self.procs.items() if not self.is_router(n) and p.popen is not None} \
                    - self.stopped
                live = {n for n in started if self.procs[n].alive()}
                healthy = {n["id"]: n for n in view["nodes"] if n["healthy"]}
                current = all(n["generation"] == view["generation"] for n in healthy.values())
                agree = all(c == 200 and v["settled"] and v["generation"] == view["generation"]
                            and v["shards"] == view["shards"] for c, v in views)
                ready = all(http_json(self.node_url(n) + "/readyz")[0] == 200 for n in live)
                last = view
                if code == 200 and view["settled"] and set(healthy) == live == started and current and ready \
                        and agree:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"cluster not ready in {timeout_s}s; last view: {last}; logs in {self.data_dir}")

    @property
    def client_headers(self) -> dict[str, str]:
        """Credentials of the first API key, if the router requires keys."""
        if not self.api_keys:
            return {}
        return {"Authorization": "Bearer " + self.api_keys.split(",")[0].split("=")[0]}

    def cluster_view(self) -> dict:
        """The first live router's ``/v1/cluster`` ({} if none answers)."""
        for name in self.router_names():
            if name in self.stopped:
                continue
            code, view = http_json(self.url_of_router(name) + "/v1/cluster", headers=self.client_headers)
            if code == 200:
                return view
        return {}

    def owner_of_shard(self, shard: int) -> str:
        return self.cluster_view()["shards"][str(shard)]

    def kill_node(self, nid: str) -> None:
        self.stopped.add(nid)
        self.procs[nid].kill()

    def signal_node(self, nid: str, sig: int) -> None:
        self.procs[nid].signal(sig)

    def start_node(self, nid: str) -> None:
        self.stopped.discard(nid)
        self._make_node(nid).start()

    def start_router(self, name: str = "router") -> None:
        self.stopped.discard(name)
        self._make_router(name).start()

    def kill_router(self, name: str = "router") -> None:
        self.stopped.add(name)
        self.procs[name].kill()

    def restart_node(self, nid: str) -> None:
        self.procs[nid].stop()
        self.start_node(nid)

    def stop(self) -> None:
        for name in self.router_names():
            router = self.procs.get(name)
            if router:
                router.stop()
        nodes = [p for name, p in self.procs.items() if not self.is_router(name)]
        for proc in nodes:  # all at once: with the router gone nobody takes shards over
            proc.signal(signal.SIGCONT)
            proc.signal(signal.SIGTERM)
        for proc in nodes:
            proc.stop()
        if self.kafka is not None:
            self.kafka.stop()
        if self.kafka_cluster is not None:
            self.kafka_cluster.stop()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_local_cluster(*, nodes: int, base_port: int, kafka_port: int, kafka_bootstrap: str, data_dir: str,
                      partitions: int, standbys: int, brokers: int = 1, restart: str = "on-failure",
                      routers: int = 1) -> int:
    """``stickystate up``: start the cluster, supervise it (stickystate/supervisor.py) until
    SIGINT/SIGTERM, then stop everything."""
    import secrets

    from stickystate.supervisor import RestartPolicy, Supervisor, cluster_children

    policy = RestartPolicy(mode=restart)
    data = Path(data_dir)
    # Local development: the router is open (no API keys; it says so loudly in its log),
    # the nodes are not: an internal secret known only to the router (STICKYSTATE_INTERNAL_SECRET
    # if set, else a fresh random one), handed to the children through their environment only.
    secret = os.environ.get(credentials.SECRET_ENV) or secrets.token_urlsafe(24)
    # A master key of its own, kept in the data directory (mode 0600) so that a restart on the
    # same directory reads what it wrote; production supplies its own (README).
    from stickystate.crypto import load_master_keys_file, new_master_key_entry, write_master_keys_file

    data.mkdir(parents=True, exist_ok=True)
    key_file = data / "master.keys"
    if not key_file.exists():
        write_master_keys_file(key_file, new_master_key_entry("local-1"))
    master = load_master_keys_file(key_file)
    master_spec = ",".join(f"{kid}:{base64.b64encode(key).decode()}" for kid, key in master.keys)
    # Ports: the first router at base_port, the nodes after it, further routers after the nodes.
    cluster = LocalCluster(data, nodes=nodes, router_port=base_port, master_keys=master_spec,
                           node_ports=[base_port + 1 + i for i in range(nodes)], routers=routers,
                           leader_session_timeout_ms=0 if kafka_bootstrap else 3000,
                           router_ports=[base_port] + [base_port + 1 + nodes + i for i in range(routers - 1)],
                           kafka_bootstrap=kafka_bootstrap, kafka_port=kafka_port,
                           partitions=partitions, standbys=standbys, auth="open", internal_secret=secret,
                           brokers=brokers, topic=os.environ.get("STICKYSTATE_CHANGES_TOPIC") or "changes")

    def say(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} up: {text}", flush=True)

    supervisor: Supervisor | None = None
    stop = {"now": False, "stopping": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True
        if supervisor is not None:
            supervisor.stop()
        elif not stop["stopping"]:
            raise KeyboardInterrupt  # still starting: cluster.start() stops what it started

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not kafka_bootstrap:
            say(f"starting Kafka (KRaft, {brokers} broker{'s' if brokers > 1 else ''}) on 127.0.0.1:{kafka_port}"
                + (" and free ports" if brokers > 1 else "") + " ...")
        cluster.start()
        say(f"stickystate is up: {nodes} nodes, Kafka at {cluster.kafka_bootstrap}, logs in {data}/")
        if routers == 1:
            say(f"router: {cluster.router_url}  (auth: open, for local development)")
        else:
            say(f"routers: {','.join(cluster.router_urls)}  (auth: open, for local development; one placement "
                "leader elected through Kafka; give the client all of them: STICKYSTATE_URL=<that list>)")
        pids = ", ".join(f"{c.name} {c.pid()}" for c in cluster_children(cluster, policy))
        say(f"pids: {pids}; --restart {policy.mode}. Ctrl-C stops everything.")
        supervisor = Supervisor(cluster_children(cluster, policy), say)
        if not stop["now"]:
            supervisor.run()
    except KeyboardInterrupt:
        pass
    finally:
        stop["stopping"] = True  # a second Ctrl-C must not interrupt the stopping
        if supervisor is not None:
            supervisor.stop()
        say("stopping ...")
        cluster.stop()
        say("stopped.")
    return 0
