"""Membership as the router sees it: health checks, placement, pushing assignments.

The router is the placement authority: it computes the placement (router/placement.py)
over the nodes it sees healthy and tells every node which shards it owns and follows
(``POST /internal/assign`` with a generation number). When a node dies (a connection
error, ``health_failures_to_dead`` failed checks, or silence the failure detector finds
too long for that node, router/detector.py) its shards move to the next nodes on the ring. Nodes losing shards are told first (they stop serving them and flush
their replication queue), then the nodes gaining them (they claim and rebuild from
the log). While that runs, ``settled()`` holds requests instead of failing them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from stickystate.router.detector import PhiAccrual
from stickystate.router.placement import Placement
from stickystate.router.settings import RouterSettings

log = logging.getLogger("stickystate.router")


@dataclass
class NodeView:
    id: str
    url: str
    healthy: bool = False
    failures: int = 0
    generation: int = -1
    last_seen: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    detector: PhiAccrual = field(default_factory=PhiAccrual)
    probe: asyncio.Task[None] | None = field(default=None, repr=False)  # at most one in flight
    next_probe: float = 0.0
    was_down: bool = False  # declared down since the router started: rejoins only once stable
    ok_since: float | None = None  # the first of the answers in a row so far
    # When an assignment to it last succeeded: a status answer to a probe sent before then may
    # predate the assignment, and its generation says nothing about what the node holds now.
    assigned_at: float = 0.0
    # Resolved while the node is not healthy; in-flight requests race against it.
    # Created by Cluster.start() on the running loop.
    down: asyncio.Future[None] = field(init=False, repr=False)


class Cluster:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.nodes = {nid: NodeView(nid, url, detector=PhiAccrual(
            threshold=settings.detector_threshold, min_std_s=settings.detector_min_std_s,
            acceptable_pause_s=settings.detector_pause_s, first_interval_s=settings.health_interval_s))
            for nid, url in settings.nodes}
        self.placement = Placement((), settings.partitions, settings.standbys)
        self.generation = 0
        self._settled = asyncio.Event()
        self._lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._rebalance_wanted = asyncio.Event()
        self.internal_headers = {"X-Stickystate-Internal": settings.internal_secret} if settings.internal_secret else {}
        self.failovers_total = 0
        self.rebalances_total = 0

    async def start(self, http: aiohttp.ClientSession) -> None:
        self._http = http
        loop = asyncio.get_running_loop()
        for node in self.nodes.values():
            node.down = loop.create_future()
            node.down.set_result(None)  # not healthy until a probe answers
        await self._probe_all()
        # A restarted router: the nodes hold the previous router's generation, and refuse an
        # assignment older than theirs; continue from the highest one they report.
        self.generation = max([self.generation] + [n.generation for n in self.nodes.values()])
        await self.rebalance()
        self._task = asyncio.create_task(self._run(), name="cluster-rebalance")
        self._watch_task = asyncio.create_task(self._watch(), name="cluster-health")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, self._watch_task, *(n.probe for n in self.nodes.values())) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = self._watch_task = None

    # -- what the forwarder uses -----------------------------------------------------
    def owner(self, shard: int) -> NodeView | None:
        nid = self.placement.owner(shard)
        return self.nodes.get(nid) if nid else None

    async def settled(self) -> None:
        if not self._settled.is_set():
            await asyncio.wait_for(self._settled.wait(), self.settings.settle_timeout_s)

    def mark_dead(self, node: NodeView, reason: str) -> None:
        """A connection to the node failed: stop sending it traffic now."""
        if node.healthy:
            log.warning("node down", extra={"peer": node.id, "reason": reason})
            node.healthy = False
            node.failures = self.settings.health_failures_to_dead
            node.detector.forget_last()
            node.was_down = True
            node.ok_since = None
            if not node.down.done():
                node.down.set_result(None)
            self.failovers_total += 1
            self._settled.clear()
            self._rebalance_wanted.set()

    def resync(self, node: NodeView) -> None:
        """A node answered 421 for a shard we route to it: it may have missed an
        assignment (restart) or be rebuilding; make the health loop re-push."""
        node.generation = -1
        self._rebalance_wanted.set()

    def view(self) -> dict[str, Any]:
        owners = self.placement.owner_map()
        return {
            "generation": self.generation,
            "partitions": self.settings.partitions,
            "standbys_per_shard": self.settings.standbys,
            "settled": self._settled.is_set(),
            "nodes": [{"id": n.id, "url": n.url, "healthy": n.healthy, "generation": n.generation}
                      for n in self.nodes.values()],
            "shards": {str(s): o for s, o in owners.items()},
            "standbys": {str(s): list(self.placement.standbys_of(s)) for s in owners},
        }

    # -- health ------------------------------------------------------------------------
    async def _probe(self, node: NodeView) -> None:
        assert self._http is not None
        sent = time.monotonic()
        try:
            async with self._http.get(f"{node.url}/internal/status", headers=self.internal_headers,
                                      timeout=aiohttp.ClientTimeout(total=self.settings.health_timeout_s)) as resp:
                status = orjson.loads(await resp.read()) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            status = None
        if status is None:
            node.failures += 1
            node.ok_since = None
            if node.healthy and node.failures >= self.settings.health_failures_to_dead:
                self.mark_dead(node, "health checks missed")
            return
        node.failures = 0
        node.last_seen = time.monotonic()
        node.detector.heartbeat(node.last_seen)
        node.status = status
        if sent >= node.assigned_at:
            # Else the answer may predate the assignment that finished meanwhile: taking its
            # older generation made the router push a new placement, whose push an in-flight
            # probe overlapped again, and so on (hundreds of placements a minute once shard
            # acquisition got slower than a probe interval).
            node.generation = int(status.get("generation", -1))
        if node.ok_since is None:
            node.ok_since = node.last_seen
        if not node.healthy and not status.get("draining") and self._stable(node):
            log.info("node up", extra={"peer": node.id})
            node.healthy = True
            if node.down.done():
                node.down = asyncio.get_running_loop().create_future()
            self._rebalance_wanted.set()
        elif node.healthy and status.get("draining"):
            self.mark_dead(node, "draining")
        elif node.healthy and node.generation != self.generation:
            self._rebalance_wanted.set()  # restarted, or missed an assignment

    def _stable(self, node: NodeView) -> bool:
        """A node declared down comes back once it has answered every probe for
        ``rejoin_after_s``: a node that falls silent again at once (paused again, or busy in
        bursts) does not make its shards move back and forth while a handover is running."""
        return not node.was_down or node.last_seen - (node.ok_since or node.last_seen) >= self.settings.rejoin_after_s

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self._probe(n) for n in self.nodes.values()))

    async def _watch(self) -> None:
        """Probe each node every ``health_interval_s`` (one probe in flight per node, so a node
        that hangs delays nobody else's checks) and declare down a healthy node whose silence
        the detector finds too long."""
        tick = min(0.05, self.settings.health_interval_s)
        last_tick = time.monotonic()
        for node in self.nodes.values():
            node.detector.watch_from(last_tick)
        while True:
            now = time.monotonic()
            stall = now - last_tick - tick
            last_tick = now
            for node in self.nodes.values():
                if stall > 0.05:  # our own loop ran late: not the nodes' silence
                    node.detector.excuse(stall)
                if node.probe is None and now >= node.next_probe:
                    node.probe = asyncio.create_task(self._probe_once(node), name=f"probe-{node.id}")
                if node.healthy and node.detector.suspect(now):
                    self.mark_dead(node, f"no answer for {node.detector.silence_s(now):.2f}s "
                                         f"(phi {node.detector.phi(now):.1f})")
            await asyncio.sleep(tick)

    async def _probe_once(self, node: NodeView) -> None:
        try:
            await self._probe(node)
        finally:
            node.probe = None
            node.next_probe = time.monotonic() + self.settings.health_interval_s

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._rebalance_wanted.wait(), self.settings.health_interval_s)
            except asyncio.TimeoutError:
                pass
            if self._rebalance_wanted.is_set():
                await self.rebalance()

    # -- placement -----------------------------------------------------------------------
    async def rebalance(self) -> None:
        async with self._lock:
            for _ in range(10):
                self._rebalance_wanted.clear()
                healthy = sorted(n.id for n in self.nodes.values() if n.healthy)
                new = Placement(tuple(healthy), self.settings.partitions, min(self.settings.standbys,
                                                                              max(0, len(healthy) - 1)))
                stale = [n for n in self.nodes.values() if n.healthy and n.generation != self.generation]
                if new == self.placement and not stale and self._settled.is_set():
                    return
                self._settled.clear()
                self.generation += 1
                self.rebalances_total += 1
                await self._push(self.placement, new)
                self.placement = new
                if not self._rebalance_wanted.is_set():
                    break
            self._settled.set()
            log.info("placement", extra={"generation": self.generation,
                                         "nodes": list(self.placement.nodes)})

    async def _push(self, old: Placement, new: Placement) -> None:
        owners = new.owner_map()
        payload = orjson.dumps({
            "generation": self.generation,
            "owners": {str(s): o for s, o in owners.items()},
            "standbys": {str(s): list(new.standbys_of(s)) for s in owners},
        })
        healthy = [n for n in self.nodes.values() if n.healthy]
        old_owners = old.owner_map()
        losing = [n for n in healthy if any(o == n.id and owners.get(s) != n.id for s, o in old_owners.items())]
        others = [n for n in healthy if n not in losing]
        for group in (losing, others):
            await asyncio.gather(*(self._assign(n, payload) for n in group))

    async def _assign(self, node: NodeView, payload: bytes) -> None:
        """Push an assignment; give up on it as soon as the node is declared down meanwhile
        (a paused node would hold the whole rebalance for the request's timeout)."""
        post = asyncio.ensure_future(self._post_assign(node, payload))
        await asyncio.wait({post, node.down}, return_when=asyncio.FIRST_COMPLETED)
        if not post.done():
            post.cancel()
            await asyncio.gather(post, return_exceptions=True)

    async def _post_assign(self, node: NodeView, payload: bytes) -> None:
        assert self._http is not None
        try:
            async with self._http.post(f"{node.url}/internal/assign", data=payload,
                                       headers={"Content-Type": "application/json", **self.internal_headers},
                                       timeout=aiohttp.ClientTimeout(total=30)) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status, message=body.decode())
                node.generation = self.generation
                node.assigned_at = time.monotonic()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.mark_dead(node, f"assignment failed: {exc!r}")
