from __future__ import annotations

from dataclasses import dataclass


def parse_nodes(spec: str) -> tuple[tuple[str, str], ...]:
    """``"n1=http://127.0.0.1:8101,n2=http://..."`` -> ((id, url), ...)."""
    nodes = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        node_id, sep, url = part.partition("=")
        if not sep or not node_id or not url.startswith(("http://", "https://")):
            raise ValueError(f"bad node {part!r}: expected id=http://host:port")
        nodes.append((node_id.strip(), url.strip().rstrip("/")))
    if len({n for n, _ in nodes}) != len(nodes):
        raise ValueError("node ids must be unique")
    return tuple(nodes)


@dataclass(frozen=True)
class RouterSettings:
    host: str = "127.0.0.1"
    port: int = 8100
    nodes: tuple[tuple[str, str], ...] = ()
    partitions: int = 64
    standbys: int = 1  # clamped to nodes-1 by the placement
    health_interval_s: float = 0.1  # a probe (GET /internal/status) this long after the last one ended
    health_timeout_s: float = 1.0  # a probe unanswered this long counts as a failed check
    health_failures_to_dead: int = 3  # failed checks (refused, error, timeout) in a row: down
    # Silence: the phi accrual failure detector (router/detector.py) over each node's answers
    detector_threshold: float = 8.0
    detector_min_std_s: float = 0.07
    detector_pause_s: float = 0.1
    # UDP pings to each node's liveness echo (node/liveness.py) this often; 0: none (only the
    # HTTP probe's detector judges a node)
    liveness_interval_s: float = 0.1
    # With its echo answering, a node's HTTP answers may be this late (a busy loop) before it
    # is declared dead (a loop stuck for good); without an echo the HTTP detector decides alone
    loop_stall_s: float = 2.0
    rejoin_after_s: float = 1.0  # a node declared down is up again after answering every probe this long
    request_timeout_s: float = 30.0
    max_attempts: int = 6
    settle_timeout_s: float = 20.0
    auth: str = "keys"  # "keys": every request needs an API key (-> tenant); "open": none (local development)
    api_keys: tuple[tuple[str, str], ...] = ()  # (key, tenant)
    internal_secret: str = ""  # sent to nodes; they refuse requests without it
    rate_limit_rps: float = 1000.0  # per tenant; 0 = unlimited
    rate_limit_burst: float = 2000.0
    max_request_bytes: int = 16 * 1024 * 1024  # request body limit at the router (413); the nodes' is lower
    max_head_bytes: int = 64 * 1024  # request line and headers (400 beyond)
    keepalive_timeout_s: float = 75.0  # idle client connections are closed after this
    # Several routers (router/control.py): "" = this router alone decides placement; else the
    # Kafka through which the routers elect a placement leader and share the shard map.
    placement_kafka: str = ""
    router_id: str = ""  # unique among the routers ("": host:port)
    router_url: str = ""  # how others reach this router, shown in /v1/cluster ("": http://host:port)
    placement_topic: str = "placement"
    router_group: str = "stickystate-routers"
    leader_session_timeout_ms: int = 6000  # a silent leader loses the role after this (the broker's minimum: 6000)
    placement_replication_factor: int = 0  # of the placement topic when created (0: min(3, brokers))

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("at least one node is required (--nodes id=url,...)")
        if not 1 <= self.partitions <= 4096:
            raise ValueError("partitions must be in 1..4096")
        if self.standbys < 0:
            raise ValueError("standbys must be >= 0 (more than nodes-1 is clamped)")
        if self.health_interval_s <= 0 or self.health_timeout_s <= 0:
            raise ValueError("health interval and timeout must be > 0")
        if self.liveness_interval_s < 0:
            raise ValueError("liveness_interval_s must be >= 0 (0: no liveness pings)")
        if self.loop_stall_s <= 0:
            raise ValueError("loop_stall_s must be > 0")
        if self.detector_threshold <= 0 or self.detector_min_std_s <= 0 or self.detector_pause_s < 0:
            raise ValueError("detector threshold and min std must be > 0, the pause >= 0")
        if self.auth not in ("keys", "open"):
            raise ValueError("auth must be 'keys' or 'open'")
        if self.auth == "keys" and not self.api_keys:
            raise ValueError("auth=keys needs API keys (STICKYSTATE_API_KEYS=key=tenant,... or --api-keys-file), "
                             "or --auth open for local development")
        if self.rate_limit_rps < 0 or self.rate_limit_burst < 1:
            raise ValueError("rate_limit_rps must be >= 0 and rate_limit_burst >= 1")
        if not self.router_id:
            object.__setattr__(self, "router_id", f"{self.host}:{self.port}")
        if not self.router_url:
            object.__setattr__(self, "router_url", f"http://{self.host}:{self.port}")
        if self.leader_session_timeout_ms < 1000:
            raise ValueError("leader_session_timeout_ms must be >= 1000")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
