from __future__ import annotations

from dataclasses import dataclass, field

from stickystate.crypto import MasterKeys
from stickystate.node.validate import DURABILITIES, Limits
from stickystate.node.watch import WatchLimits
from stickystate.replicator.settings import ReplicatorSettings


@dataclass(frozen=True)
class NodeSettings:
    node_id: str = "n1"
    host: str = "127.0.0.1"
    port: int = 8101
    liveness_port: int = 0  # UDP echo of the routers' liveness pings (node/liveness.py); 0: any free; -1: none
    default_ttl_s: float = 3600.0
    default_durability: str = "memory"
    recovery_timeout_s: float = 60.0  # a request for a shard being rebuilt waits at most this
    hold_timeout_s: float = 10.0  # how long a request waits for its shard to become ready
    replication: bool = True  # False: no Kafka at all (benchmark baseline; state dies with the node)
    fast_path: bool = True  # False: aiohttp serves the port itself (node/server.py)
    # "keys": the internal secret (routers, peers) or a client's API key (node/access.py);
    # "open": clients need no key (the open cluster's one namespace); the secret still guards
    # /internal/* and the tenant headers, and with no secret at all anyone may call anything
    auth: str = "keys"
    internal_secret: str = ""
    api_keys: tuple[tuple[str, str], ...] = ()  # (key, tenant): clients that talk to the node directly
    rate_limit_rps: float = 1000.0  # per tenant, for those clients; 0 = unlimited
    rate_limit_burst: float = 2000.0
    snapshot_every_events: int = 100  # a session is snapshotted after this many changes (0: never)
    snapshot_max_age_s: float = 30.0  # ... or at the latest this long after its first unsnapshotted change
    # Per-session encryption at rest (node/erasure.py): on needs master keys to start; off
    # only when asked for explicitly (--encryption off)
    encryption: bool = True
    master_keys: MasterKeys | None = None
    limits: Limits = field(default_factory=Limits)
    watch: WatchLimits = field(default_factory=WatchLimits)
    replicator: ReplicatorSettings = field(default_factory=ReplicatorSettings)

    def __post_init__(self) -> None:
        if self.default_durability not in DURABILITIES:
            raise ValueError(f"default_durability must be one of {DURABILITIES}")
        if self.auth not in ("keys", "open"):
            raise ValueError("auth must be 'keys' or 'open'")
        if self.auth == "keys" and len(self.internal_secret) < 16:
            raise ValueError("auth=keys needs an internal secret of at least 16 characters "
                             "(STICKYSTATE_INTERNAL_SECRET or --internal-secret-file), or --auth open for local development")
        if self.rate_limit_rps < 0 or self.rate_limit_burst < 1:
            raise ValueError("rate_limit_rps must be >= 0 and rate_limit_burst >= 1")
        if not -1 <= self.liveness_port <= 65535:
            raise ValueError("liveness_port must be in -1..65535 (0: any free port, -1: no liveness echo)")
        if self.snapshot_every_events < 0:
            raise ValueError("snapshot_every_events must be >= 0")
        if self.snapshot_max_age_s <= 0:
            raise ValueError("snapshot_max_age_s must be > 0")
        if self.default_ttl_s <= 0:
            raise ValueError("default_ttl_s must be > 0")
        if not self.node_id or not self.node_id.replace("-", "").replace("_", "").isalnum():
            raise ValueError("node_id must be alphanumeric (with - or _)")
