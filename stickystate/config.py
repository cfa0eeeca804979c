"""Settings from flags and ``STICKYSTATE_*`` environment variables (flag > env > default).

Each command declares its options once; ``add_options`` makes ``--foo-bar`` flags whose
defaults come from ``STICKYSTATE_FOO_BAR``, and the help text names the variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    name: str
    type: Callable[[str], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        return "STICKYSTATE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for opt in options:
        raw = os.environ.get(opt.env)
        if opt.name == "kafka_bootstrap" and raw is None:
            raw = os.environ.get("KAFKA_BOOTSTRAP")
        # A string default is converted by argparse only for the command that runs, so a
        # bad variable of another command does not break this one.
        default = opt.default if raw is None else raw
        parser.add_argument(opt.flag, dest=opt.name, type=opt.type, default=default,
                            help=f"{opt.help} [env {opt.env}; default {opt.default!r}]")


def values(ns: argparse.Namespace, options: Sequence[Option]) -> dict[str, Any]:
    return {o.name: getattr(ns, o.name) for o in options}


def _onoff(value: str) -> bool:
    v = value.strip().lower()
    if v in ("on", "true", "1", "yes"):
        return True
    if v in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"expected on|off, got {value!r}")


KAFKA = [
    Option("kafka_bootstrap", str, "127.0.0.1:9092", "Kafka bootstrap host:port (KAFKA_BOOTSTRAP also works)"),
    Option("partitions", int, 64, "shards = partitions of the changes topic (fixed at topic creation)"),
    Option("changes_topic", str, "changes", "Kafka topic of change events"),
    Option("snapshots_topic", str, "", "compacted Kafka topic of session snapshots "
           "(empty: 'snapshots', or '<changes-topic>-snapshots' for another changes topic)"),
    Option("keys_topic", str, "", "compacted Kafka topic of the sessions' wrapped data keys "
           "(empty: 'keys', or '<changes-topic>-keys' for another changes topic)"),
    Option("keys_compaction_lag_ms", int, 3_600_000, "max.compaction.lag.ms (and segment.ms) of the keys topic "
           "when it is created: about how long a deleted session's key may stay on the broker's disk"),
    Option("changes_retention_ms", int, -1, "retention.ms of the changes topic when it is created "
           "(-1: forever; see README 'Snapshots and retention' for the safe bound)"),
    Option("replication_factor", int, 0, "replication factor when creating the topics (0: min(3, brokers))"),
    Option("min_insync_replicas", int, 0, "min.insync.replicas of the topics when creating them "
           "(0: 2 from a replication factor of 3 on, else 1)"),
]

NODE = [
    Option("node_id", str, "n1", "this node's id (unique in the cluster)"),
    Option("host", str, "127.0.0.1", "listen address"),
    Option("port", int, 8101, "listen port"),
    Option("liveness_port", int, 0, "UDP port echoing the routers' liveness pings from a thread, so that a paused "
           "process is told from a busy one (0: any free port, named in /internal/status; -1: none)"),
    Option("default_ttl_s", float, 3600.0, "sliding session TTL when a create gives none"),
    Option("default_durability", str, "memory", "memory|log: when writes are acknowledged by default"),
    Option("queue_max", int, 10_000, "replication queue bound; a full queue answers 503"),
    Option("kafka_deadline_s", float, 5.0, "Kafka must acknowledge within this, else 503"),
    Option("linger_ms", int, 5, "under load, at most one produce round to Kafka per this many ms: "
           "fewer requests (less CPU on node and broker) against a longer window in which a memory "
           "write is answered but not yet in Kafka (log writes and claims never wait for it)"),
    Option("fetch_max_wait_ms", int, 200, "a standby's fetch waits at most this long for fetch_min_bytes: "
           "fewer fetch requests (less CPU on node and broker) against standbys further behind (a takeover "
           "or a hole is read by a second, eager reader)"),
    Option("fetch_min_bytes", int, 256 * 1024, "bytes a standby's fetch waits for (up to fetch_max_wait_ms)"),
    Option("max_body_bytes", int, 1_048_576, "request body limit (413)"),
    Option("max_state_bytes", int, 1_048_576, "session data size limit, as JSON (413)"),
    Option("max_list_len", int, 10_000, "longest list an append may produce (413)"),
    Option("max_depth", int, 32, "deepest JSON nesting accepted (413)"),
    Option("snapshot_every_events", int, 100, "snapshot a session after this many changes (0: no snapshots)"),
    Option("snapshot_max_age_s", float, 30.0, "snapshot a changed session at the latest after this long"),
    Option("replication", _onoff, True, "on|off: off keeps no log at all (benchmark baseline only)"),
    Option("fast_path", _onoff, True, "on|off: on answers session requests with the httptools front, "
           "relaying the rest to the aiohttp app; off: aiohttp serves the port"),
    Option("auth", str, "keys", "keys: the internal secret (routers, peers) or a client's API key on every request; "
           "open: clients need no key (the open cluster's one namespace; local dev)"),
    Option("internal_secret_file", str, "", "file holding the cluster's internal secret (at least 16 characters; "
           "mode 0600), or set STICKYSTATE_INTERNAL_SECRET; never on the command line"),
    Option("api_keys_file", str, "", "file of 'key tenant' lines of clients that call the node directly (mode 0600; "
           "as the router's), merged with STICKYSTATE_API_KEYS=key=tenant,..."),
    Option("rate_limit_rps", float, 1000.0, "requests per second per tenant of direct clients (0 = unlimited); "
           "over it: 429"),
    Option("rate_limit_burst", float, 2000.0, "burst size of that per-tenant rate limit"),
    Option("watch_max_per_session", int, 100, "watchers one session may have on this node; over it: 429"),
    Option("watch_max_per_node", int, 10_000, "watchers this node serves; over it: 503"),
    Option("watch_buffer_events", int, 1000, "changes buffered per watcher that does not keep up; "
           "over it the buffer is dropped and the watcher gets a reset"),
    Option("watch_buffer_bytes", int, 4 * 1024 * 1024, "and at most this many bytes of them (the changes' "
           "JSON); over it, the same"),
    Option("watch_ring_events", int, 128, "recent changes kept per watched session, to resume from memory"),
    Option("watch_ring_bytes", int, 256 * 1024, "at most this many bytes of those changes (JSON) per watched "
           "session; the newest is always kept"),
    Option("watch_heartbeat_s", float, 15.0, "a comment line on every watch stream this often"),
    Option("encryption", _onoff, True, "on|off: on seals every session record under its own data key "
           "(needs master keys); off stores plaintext and a delete erases nothing (must be said explicitly)"),
    Option("master_keys_file", str, "", "file of kid:base64 lines (256-bit keys; mode 0600; the last wraps new data "
           "keys, all unwrap), or set STICKYSTATE_MASTER_KEYS=kid:base64,...; never on the command line"),
    Option("log_level", str, "info", "log level"),
]

ROUTER = [
    Option("host", str, "127.0.0.1", "listen address"),
    Option("port", int, 8100, "listen port"),
    Option("nodes", str, "n1=http://127.0.0.1:8101,n2=http://127.0.0.1:8102,n3=http://127.0.0.1:8103",
           "cluster nodes as id=url,..."),
    Option("partitions", int, 64, "shard count; must match the nodes' --partitions"),
    Option("standbys", int, 1, "standby replicas per shard (0..nodes-1; more is clamped)"),
    Option("health_interval_s", float, 0.1, "health check period (a probe this long after the last one ended)"),
    Option("health_failures_to_dead", int, 3, "failed checks in a row (refused, error, 1 s timeout) before a "
           "node is declared dead"),
    Option("detector_threshold", float, 8.0, "phi accrual failure detector: a silent node is declared dead when "
           "phi (-log10 of the chance that an answer is still this late) reaches this"),
    Option("detector_min_std_s", float, 0.07, "floor of the standard deviation of a node's answer intervals"),
    Option("detector_pause_s", float, 0.1, "silence always tolerated on top of a node's mean answer interval"),
    Option("liveness_interval_s", float, 0.1, "UDP ping to each node's liveness echo this often; a second detector "
           "over the echoes declares a stopped process dead whatever its load (0: no pings)"),
    Option("loop_stall_s", float, 2.0, "while a node's liveness echo answers, its HTTP answers may be this late "
           "(a busy event loop) before it is declared dead; nodes without an echo: the detector alone"),
    Option("auth", str, "keys", "keys: every request needs an API key; open: none (local development, logged loudly)"),
    Option("api_keys_file", str, "", "file of 'key tenant' lines (mode 0600), merged with "
           "STICKYSTATE_API_KEYS=key=tenant,... (keys of at least 16 characters)"),
    Option("internal_secret_file", str, "", "file holding the cluster's internal secret, sent to the nodes "
           "(mode 0600), or set STICKYSTATE_INTERNAL_SECRET; never on the command line"),
    Option("rate_limit_rps", float, 1000.0, "requests per second per tenant (0 = unlimited); over it: 429"),
    Option("rate_limit_burst", float, 2000.0, "burst size of the per-tenant rate limit"),
    Option("placement_kafka", str, "", "several routers: the Kafka (host:port,...) through which they elect "
           "one placement leader and share the shard map; empty: this router alone decides placement"),
    Option("router_id", str, "", "this router's id among several (default host:port); unique"),
    Option("router_url", str, "", "how clients and other routers reach this router (default http://host:port)"),
    Option("placement_topic", str, "placement", "compacted one-partition topic of the routers' election and map"),
    Option("router_group", str, "stickystate-routers", "Kafka consumer group of the routers' election"),
    Option("leader_session_timeout_ms", int, 6000, "a placement leader that stops heartbeating loses the role after "
           "this (within the broker's group.min/max.session.timeout.ms)"),
    Option("log_level", str, "info", "log level"),
]
