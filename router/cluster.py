"""Membership as the router sees it: health checks, placement, pushing assignments.

The router is the placement authority: it computes the placement (router/placement.py)
over the nodes it sees healthy and tells every node which shards it owns and follows
(``POST /internal/assign`` with a generation number). When a node dies (a connection
error, ``health_failures_to_dead`` failed checks, or silence the failure detector finds
too long for that node, router/detector.py) its shards move to the next nodes on the ring. Nodes losing shards are told first (they stop serving them and flush
their replication queue), then the nodes gaining them (they claim and rebuild from
the log). While that runs, ``settled()`` holds requests instead of failing them.

With several routers (``--placement-kafka``, router/control.py) only the placement leader
does that; the others follow the map it publishes, health-check the nodes themselves (a
node that fails them stops getting their traffic at once, and they report it to the
leader, which probes it), and when the owner of a request's shard is down or answers 421
they wait for the leader's next map (or the node's recovery) before retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from stickystate.router.control import Control, ControlHandler, TERM_SHIFT, term_base
from stickystate.router.detector import PhiAccrual
from stickystate.router.liveness import EchoChannel
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
    suspected: bool = False  # another router reported it dead: the next failed probe declares it down
    # The process's liveness echo (node/liveness.py, router/liveness.py): its own detector,
    # over answers that a busy event loop does not delay; None until the node names its port.
    liveness: PhiAccrual = field(default_factory=PhiAccrual)
    echo: EchoChannel | None = field(default=None, repr=False)
    next_ping: float = 0.0
    # Resolved while the node is not healthy; in-flight requests race against it.
    # Created by Cluster.start() on the running loop.
    down: asyncio.Future[None] = field(init=False, repr=False)


class Cluster(ControlHandler):
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.nodes = {nid: NodeView(nid, url, detector=self._new_detector(settings.health_interval_s))
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
        # Several routers: only the leader places; the others follow its maps.
        self.control: Control | None = None
        if settings.placement_kafka:
            self.control = Control(bootstrap=settings.placement_kafka, topic=settings.placement_topic,
                                   group=settings.router_group, router_id=settings.router_id,
                                   router_url=settings.router_url,
                                   session_timeout_ms=settings.leader_session_timeout_ms, handler=self,
                                   replication_factor=settings.placement_replication_factor)
        self.leading = self.control is None
        self.term = 0  # of this router's leadership
        self.leader: str | None = settings.router_id if self.control is None else None
        self.leader_url: str | None = settings.router_url if self.control is None else None
        self.leader_term = 0  # the newest leader record read
        self.map_generation = 0  # of the newest map published (leader) or read (follower)
        self.leaderships_total = 0
        self.maps_applied_total = 0
        self._changed: asyncio.Future[None] | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        self._http = http
        loop = asyncio.get_running_loop()
        for node in self.nodes.values():
            node.down = loop.create_future()
            node.down.set_result(None)  # not healthy until a probe answers
        self._changed = loop.create_future()
        await self._probe_all()
        if self.control is not None:
            await self.control.start()  # a follower until the election says otherwise
        else:
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
        for node in self.nodes.values():
            if node.echo is not None:
                node.echo.close()
                node.echo = None
        if self.control is not None:
            await self.control.stop()  # leaves the group: the next leader is chosen at once

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
            node.liveness.forget_last()
            node.was_down = True
            node.ok_since = None
            node.suspected = False
            if not node.down.done():
                node.down.set_result(None)
            self.failovers_total += 1
            if self.leading:
                self._settled.clear()
                self._rebalance_wanted.set()
            elif self.control is not None:
                self.control.report_suspect(node.id, reason)
            self._notify()

    def resync(self, node: NodeView) -> None:
        """A node answered 421 for a shard we route to it: it may have missed an
        assignment (restart) or be rebuilding; make the health loop re-push."""
        node.generation = -1
        self._rebalance_wanted.set()

    async def reroute_wait(self) -> None:
        """A follower that cannot reach a shard's owner (declared down, or it answered 421)
        waits for the leader's next map or the node's recovery, at most a second; the
        retry then goes where that says. The leader moves the shard itself: no wait."""
        if not self.leading:
            with contextlib.suppress(asyncio.TimeoutError):
                await self.wait_change(1.0)

    async def wait_change(self, timeout_s: float) -> None:
        """Until the next map, change of role, or node recovery."""
        assert self._changed is not None
        await asyncio.wait_for(asyncio.shield(self._changed), timeout_s)

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
            self._changed = asyncio.get_running_loop().create_future()

    # -- several routers: what the control channel says (router/control.py) ---------------
    @property
    def role(self) -> str:
        return "single" if self.control is None else "leader" if self.leading else "follower"

    async def lead(self, term: int) -> None:
        """We were elected: the newest map (read up to our claim) is what the nodes hold;
        place from our own view of health, numbering assignments in our term."""
        if self.term and term <= self.term:
            return
        self.term = term
        self.leader, self.leader_url = self.settings.router_id, self.settings.router_url
        self.generation = max(self.generation, term_base(term))
        self.leading = True
        self.leaderships_total += 1
        self._rebalance_wanted.set()
        self._notify()

    def step_down(self, reason: str) -> None:
        if self.control is None or not self.leading:
            return
        log.warning("placement leader no more", extra={"reason": reason, "term": self.term})
        self.leading = False
        if self.map_generation:
            self._settled.set()  # forward by the newest map, as any follower
        self._notify()

    def leader_record(self, term: int, doc: dict[str, Any]) -> None:
        if term <= self.leader_term:
            return
        self.leader_term = term
        self.leader, self.leader_url = str(doc.get("router")), str(doc.get("url"))
        if self.leading and term > self.term:
            self.step_down(f"router {self.leader} leads from term {term}")

    def map_record(self, doc: dict[str, Any]) -> None:
        try:
            generation = int(doc["generation"])
            if generation <= self.map_generation or generation >> TERM_SHIFT < self.leader_term:
                return  # ours, or a deposed leader's late one
            if self.leading and generation >> TERM_SHIFT <= self.term:
                self.map_generation = generation
                return  # our own
            placement = Placement.published(  # no owners: the leader sees no healthy node (503 no_nodes)
                tuple(doc["nodes"]), int(doc["partitions"]), int(doc["standbys_per_shard"]),
                {int(s): str(o) for s, o in doc["shards"].items()},
                {int(s): tuple(str(n) for n in chain) for s, chain in doc["standbys"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            log.error("placement map refused", extra={"error": repr(exc)})
            return
        if placement.partitions != self.settings.partitions:
            log.error("placement map refused: other partition count",
                      extra={"theirs": placement.partitions, "ours": self.settings.partitions})
            return
        if self.leading:
            self.step_down(f"a map of a later term ({generation >> TERM_SHIFT})")
        self.map_generation = self.generation = generation
        self.placement = placement
        self.maps_applied_total += 1
        self._settled.set()
        self._notify()

    def suspect_record(self, router: str, doc: dict[str, Any]) -> None:
        node = self.nodes.get(str(doc.get("node")))
        if not self.leading or router == self.settings.router_id or node is None or not node.healthy:
            return
        log.info("node reported down by another router: probing it", extra={"peer": node.id, "router": router})
        node.suspected = True
        node.next_probe = 0.0

    def map_doc(self) -> dict[str, Any]:
        return {"generation": self.generation, "term": self.term, "leader": self.settings.router_id,
                "nodes": list(self.placement.nodes), **self._shard_maps()}

    def _shard_maps(self) -> dict[str, Any]:
        owners = self.placement.owner_map()
        return {"partitions": self.settings.partitions, "standbys_per_shard": self.placement.standbys,
                "shards": {str(s): o for s, o in owners.items()},
                "standbys": {str(s): list(self.placement.standbys_of(s)) for s in owners}}

    def view(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            **self._shard_maps(),
            "standbys_per_shard": self.settings.standbys,  # configured (the map's: those in use)
            "settled": self._settled.is_set(),
            "nodes": [{"id": n.id, "url": n.url, "healthy": n.healthy, "generation": n.generation,
                       "liveness_echoes": n.echo.echoes_total if n.echo is not None else None}
                      for n in self.nodes.values()],
            "router": {"id": self.settings.router_id, "role": self.role, "leader": self.leader,
                       "leader_url": self.leader_url, "term": self.term if self.leading else self.leader_term},
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
            if node.healthy and node.suspected:
                self.mark_dead(node, "reported by another router, and a health check failed")
            elif node.healthy and node.failures >= self.settings.health_failures_to_dead \
                    and not self._only_busy(node, time.monotonic()):
                self.mark_dead(node, "health checks missed")
            return
        node.failures = 0
        node.suspected = False
        node.last_seen = time.monotonic()
        node.detector.heartbeat(node.last_seen)
        node.status = status
        await self._follow_liveness(node, status.get("liveness_port"))
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
            self._notify()
        elif node.healthy and status.get("draining"):
            self.mark_dead(node, "draining")
        elif node.healthy and node.generation != self.generation:
            self._rebalance_wanted.set()  # restarted, or missed an assignment

    def _new_detector(self, interval_s: float) -> PhiAccrual:
        s = self.settings
        return PhiAccrual(threshold=s.detector_threshold, min_std_s=s.detector_min_std_s,
                          acceptable_pause_s=s.detector_pause_s, first_interval_s=interval_s)

    async def _follow_liveness(self, node: NodeView, port: Any) -> None:
        """Ping the port the node's status names (a restarted node has a new one: a new
        detector too, nothing learned from the old process)."""
        if not self.settings.liveness_interval_s or not isinstance(port, int) or port <= 0:
            port = 0
        if node.echo is not None and node.echo.port == port:
            return
        if node.echo is not None:
            node.echo.close()
            node.echo = None
        if not port:
            return
        node.liveness = self._new_detector(self.settings.liveness_interval_s)
        host = urlsplit(node.url).hostname or "127.0.0.1"
        try:
            node.echo = await EchoChannel.open(host, port, node.liveness)
        except OSError as exc:
            log.warning("liveness echo unreachable", extra={"peer": node.id, "port": port, "error": repr(exc)})
            return
        node.liveness.watch_from(time.monotonic())
        node.next_ping = 0.0

    def _only_busy(self, node: NodeView, now: float) -> bool:
        """The node's HTTP answers are late but its process echoes: a busy event loop (taking
        shards over, a burst), not a dead node, until the silence reaches ``loop_stall_s``
        (a loop stuck for good). Without a proven echo the HTTP detector alone decides."""
        echo_proven = node.echo is not None and len(node.liveness.intervals) >= node.liveness.min_samples
        return (echo_proven and not node.liveness.suspect(now)
                and node.detector.silence_s(now) < self.settings.loop_stall_s)

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
                    node.liveness.excuse(stall)
                if node.probe is None and now >= node.next_probe:
                    node.probe = asyncio.create_task(self._probe_once(node), name=f"probe-{node.id}")
                if node.echo is not None and now >= node.next_ping:
                    node.echo.ping()
                    node.next_ping = now + self.settings.liveness_interval_s
                if node.healthy and node.detector.suspect(now) and not self._only_busy(node, now):
                    self.mark_dead(node, f"no answer for {node.detector.silence_s(now):.2f}s "
                                         f"(phi {node.detector.phi(now):.1f})")
                elif node.healthy and node.echo is not None and node.liveness.suspect(now):
                    self.mark_dead(node, f"process silent: no liveness echo for {node.liveness.silence_s(now):.2f}s "
                                         f"(phi {node.liveness.phi(now):.1f})")
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
            if self.leading and self.control is not None and self.map_generation < self.generation \
                    and self._settled.is_set():
                await self._publish()

    async def _publish(self) -> None:
        """The placement the nodes took, for the other routers (retried each round until Kafka has it)."""
        assert self.control is not None
        doc = self.map_doc()
        if await self.control.publish_map(doc) and self.leading:
            self.map_generation = max(self.map_generation, int(doc["generation"]))

    # -- placement -----------------------------------------------------------------------
    async def rebalance(self) -> None:
        if not self.leading:
            return
        async with self._lock:
            for _ in range(10):
                if not self.leading:
                    return
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
        if self.control is not None and self.leading:
            await self._publish()

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
                answer = orjson.loads(body)
                if answer.get("stale"):
                    self._refused(node, int(answer.get("generation", -1)))
                    return
                node.generation = self.generation
                node.assigned_at = time.monotonic()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self.mark_dead(node, f"assignment failed: {exc!r}")

    def _refused(self, node: NodeView, theirs: int) -> None:
        """The node holds a later assignment than ours. Alone: another (or an earlier) router
        made it; continue above it. One of several: a later leader made it; step down."""
        log.warning("assignment refused as stale", extra={"peer": node.id, "theirs": theirs, "ours": self.generation})
        node.generation = theirs
        if self.control is not None:
            self.step_down(f"node {node.id} holds generation {theirs} of a later leader")
        else:
            self.generation = max(self.generation, theirs)
            self._rebalance_wanted.set()
