"""``stickystate``: up | node | router | kafka | chaos | bench | bench-rebuild."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stickystate import config
from stickystate.config import Option

if TYPE_CHECKING:
    from stickystate.crypto import MasterKeys


def _node(ns: argparse.Namespace) -> None:
    from stickystate.node.server import serve
    from stickystate.node.settings import NodeSettings
    from stickystate.node.validate import Limits
    from stickystate.node.watch import WatchLimits
    from stickystate.replicator.settings import ReplicatorSettings
    from stickystate import logs

    secret, keys = _secrets(ns)
    logs.setup(ns.log_level, node=ns.node_id)
    master = _master_keys(ns)
    rep = ReplicatorSettings(kafka_bootstrap=ns.kafka_bootstrap, changes_topic=ns.changes_topic,
                             snapshots_topic=ns.snapshots_topic, changes_retention_ms=ns.changes_retention_ms,
                             keys_topic=ns.keys_topic, keys_compaction_lag_ms=ns.keys_compaction_lag_ms,
                             partitions=ns.partitions, replication_factor=ns.replication_factor,
                             min_insync_replicas=ns.min_insync_replicas,
                             queue_max=ns.queue_max, kafka_deadline_s=ns.kafka_deadline_s,
                             linger_ms=ns.linger_ms, fetch_max_wait_ms=ns.fetch_max_wait_ms,
                             fetch_min_bytes=ns.fetch_min_bytes)
    limits = Limits(max_body_bytes=ns.max_body_bytes, max_state_bytes=ns.max_state_bytes,
                    max_list_len=ns.max_list_len, max_depth=ns.max_depth)
    settings = NodeSettings(node_id=ns.node_id, host=ns.host, port=ns.port, liveness_port=ns.liveness_port,
                            default_ttl_s=ns.default_ttl_s,
                            default_durability=ns.default_durability, limits=limits, replicator=rep,
                            replication=ns.replication, fast_path=ns.fast_path, auth=ns.auth,
                            internal_secret=secret, api_keys=tuple(keys.items()),
                            rate_limit_rps=ns.rate_limit_rps, rate_limit_burst=ns.rate_limit_burst,
                            snapshot_every_events=ns.snapshot_every_events,
                            snapshot_max_age_s=ns.snapshot_max_age_s, encryption=ns.encryption, master_keys=master,
                            watch=WatchLimits(per_session=ns.watch_max_per_session, per_node=ns.watch_max_per_node,
                                              buffer_events=ns.watch_buffer_events,
                                              buffer_bytes=ns.watch_buffer_bytes, ring_events=ns.watch_ring_events,
                                              ring_bytes=ns.watch_ring_bytes,
                                              heartbeat_s=ns.watch_heartbeat_s))
    # What the imports made (modules, classes, functions: ~45k objects) lives as long as the
    # process: keep it out of the cyclic GC's full passes, which otherwise walk it every
    # time and hold every request in flight (the router does the same, router/server.py).
    gc.collect()
    gc.freeze()
    _install_uvloop()
    asyncio.run(serve(settings))


def _master_keys(ns: argparse.Namespace) -> MasterKeys | None:
    """The node's master keys, or exit: encryption on without a key refuses to start."""
    from stickystate import credentials, crypto

    if not ns.encryption:
        return None
    try:
        if ns.master_keys_file:
            return crypto.load_master_keys_file(ns.master_keys_file)
        from_env = os.environ.get(credentials.MASTER_KEYS_ENV, "")
        if from_env:  # like the other secrets: the environment or a 0600 file, never argv
            return crypto.parse_master_keys(from_env)
    except (OSError, crypto.CryptoError) as exc:
        sys.exit(f"stickystate node: master keys: {exc}")
    if not ns.replication:
        return None
    sys.exit("stickystate node: refusing to start: encryption is on and no master key is configured. Give "
             "--master-keys-file (or STICKYSTATE_MASTER_KEYS_FILE / STICKYSTATE_MASTER_KEYS), or --encryption off "
             "to store sessions in plaintext (README 'Encryption and erasure')")


def _router(ns: argparse.Namespace) -> None:
    from stickystate.router.server import serve
    from stickystate.router.settings import RouterSettings, parse_nodes
    from stickystate import logs

    secret, keys = _secrets(ns)
    logs.setup(ns.log_level, node="router")
    settings = RouterSettings(host=ns.host, port=ns.port, nodes=parse_nodes(ns.nodes), partitions=ns.partitions,
                              standbys=ns.standbys, health_interval_s=ns.health_interval_s,
                              health_failures_to_dead=ns.health_failures_to_dead,
                              detector_threshold=ns.detector_threshold, detector_min_std_s=ns.detector_min_std_s,
                              detector_pause_s=ns.detector_pause_s, liveness_interval_s=ns.liveness_interval_s,
                              loop_stall_s=ns.loop_stall_s,
                              auth=ns.auth,
                              api_keys=tuple(keys.items()), internal_secret=secret,
                              rate_limit_rps=ns.rate_limit_rps, rate_limit_burst=ns.rate_limit_burst,
                              placement_kafka=ns.placement_kafka, router_id=ns.router_id, router_url=ns.router_url,
                              placement_topic=ns.placement_topic, router_group=ns.router_group,
                              leader_session_timeout_ms=ns.leader_session_timeout_ms)
    _install_uvloop()
    asyncio.run(serve(settings))


def _secrets(ns: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """The internal secret and the API keys, from the environment or 0600 files only."""
    from stickystate import credentials

    try:
        return credentials.internal_secret(ns.internal_secret_file), credentials.api_keys(ns.api_keys_file)
    except credentials.SecretError as exc:
        sys.exit(f"stickystate {ns.command}: error: {exc}")


class _Refused(argparse.Action):
    """A flag that used to take a secret on the command line: refused, saying what to do instead.
    It takes an optional value so that the refusal (and not "expected one argument") is what the
    user sees whatever the value looks like; the value itself is never printed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from stickystate.credentials import refused_flag_message

        parser.error(refused_flag_message(self.dest))


def _refuse_secret_flags(parser: argparse.ArgumentParser) -> None:
    from stickystate.credentials import REFUSED_FLAGS

    for flag in REFUSED_FLAGS:
        parser.add_argument(flag, dest=flag, nargs="?", action=_Refused, help=argparse.SUPPRESS)


def _up(ns: argparse.Namespace) -> None:
    from stickystate.local_cluster import run_local_cluster

    sys.exit(run_local_cluster(nodes=ns.node_count, base_port=ns.base_port, kafka_port=ns.kafka_port,
                               kafka_bootstrap=ns.kafka_bootstrap, data_dir=ns.data_dir,
                               partitions=ns.partitions, standbys=ns.standbys, brokers=ns.brokers,
                               restart=ns.restart, routers=ns.routers))


def _kafka(ns: argparse.Namespace) -> None:
    from stickystate import kafka_local

    kafka_local.main(["--data-dir", ns.data_dir, "--port", str(ns.kafka_port)])


def _restart_mode(value: str) -> str:
    from stickystate.supervisor import MODES

    if value not in MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(MODES)}")
    return value


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


UP = [
    Option("node_count", int, 3, "number of nodes"),
    Option("base_port", int, 8100, "router port; nodes get the next ports"),
    Option("kafka_port", int, 9092, "port of the local Kafka broker"),
    Option("routers", int, 1, "routers (2 or more: one placement leader elected through Kafka, the others "
           "follow it; each serves any request)"),
    Option("brokers", int, 1, "local Kafka brokers (3: a replicated KRaft cluster, topics at RF 3, "
           "min.insync.replicas 2)"),
    Option("kafka_bootstrap", str, "", "use this Kafka instead of starting one (KAFKA_BOOTSTRAP also works)"),
    Option("data_dir", str, ".run", "where the local broker keeps its data and logs"),
    Option("partitions", int, 64, "shards (partitions of the changes topic)"),
    Option("standbys", int, 1, "standby replicas per shard"),
    Option("restart", _restart_mode, "on-failure", "when a node, the router or the broker exits: on-failure "
           "restarts it if it failed (non-zero exit or a signal), always also after a clean exit, no never; "
           "backoff 0.5 s doubling to 8 s, giving up after 5 restarts in 60 s"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stickystate", description="Sticky in-memory sessions, replicated to Kafka.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start a local cluster: Kafka, nodes, router (Ctrl-C stops it)")
    config.add_options(p, UP)
    p.set_defaults(func=_up)
    p = sub.add_parser("node", help="run one node")
    config.add_options(p, config.NODE + config.KAFKA)
    _refuse_secret_flags(p)
    p.set_defaults(func=_node)
    p = sub.add_parser("router", help="run the router")
    config.add_options(p, config.ROUTER)
    _refuse_secret_flags(p)
    p.set_defaults(func=_router)
    p = sub.add_parser("kafka", help="run only a local Kafka broker (KRaft) in the foreground")
    config.add_options(p, [Option("kafka_port", int, 9092, "broker port"),
                           Option("data_dir", str, ".run/kafka", "broker data directory")])
    p.set_defaults(func=_kafka)
    sub.add_parser("chaos", help="chaos run: faults under load, then an independent check (see --help)", add_help=False)
    sub.add_parser("bench", help="benchmark against Redis and client-side state (see --help)", add_help=False)
    sub.add_parser("bench-rebuild", help="shard rebuild time for 20 vs 2,000 changes per session (see --help)",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("chaos", "bench", "bench-rebuild"):
        import importlib

        module = {"chaos": "stickystate.chaos.cli", "bench": "stickystate.bench.cli",
                  "bench-rebuild": "stickystate.bench.rebuild"}[args[0]]
        sys.exit(importlib.import_module(module).main(args[1:]))
    ns = build_parser().parse_args(args)
    ns.func(ns)


if __name__ == "__main__":
    main()
