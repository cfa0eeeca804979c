"""Prometheus metrics of the router (one registry per app)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stickystate.protocol import LATENCY_BUCKETS
from stickystate.router.cluster import Cluster


class RouterMetrics:
    def __init__(self, cluster: Cluster) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("stickystate_router_requests", "Requests answered by the router, by method and status",
                                ["method", "status"], registry=self.registry)
        self.latency = Histogram("stickystate_router_request_duration_seconds", "Router request latency, by method",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.retries = Counter("stickystate_router_retries", "Requests re-sent to a node after a failure or a 421",
                               registry=self.registry)
        self.rate_limited = Counter("stickystate_router_rate_limited", "Requests refused by a tenant's rate limit",
                                    registry=self.registry)
        self.registry.register(_ClusterCollector(cluster))


class _ClusterCollector(Collector):
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        healthy = GaugeMetricFamily("stickystate_router_node_healthy", "1 if the router sees the node healthy",
                                    labels=["node"])
        for node in self.cluster.nodes.values():
            healthy.add_metric([node.id], 1.0 if node.healthy else 0.0)
        yield healthy
        yield CounterMetricFamily("stickystate_router_failovers", "Nodes declared dead (connection error, missed "
                                  "health checks, or draining)", value=self.cluster.failovers_total)
        yield CounterMetricFamily("stickystate_router_rebalances", "Placements pushed to the nodes",
                                  value=self.cluster.rebalances_total)
        yield GaugeMetricFamily("stickystate_router_generation", "Current placement generation",
                                value=self.cluster.generation)
