"""A paused process is told from a busy one (node/liveness.py, router/liveness.py): a thread
of the node echoes the router's UDP pings whatever its event loop is doing, and stops with
the process. The router's second detector, over those echoes, declares a stopped node dead
even when the HTTP probe's detector would still wait."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from stickystate.node.liveness import LivenessEcho
from stickystate.protocol import LIVENESS_PING_BYTES, shard_of
from stickystate.router.cluster import Cluster
from stickystate.router.detector import PhiAccrual
from stickystate.router.liveness import EchoChannel
from stickystate.router.settings import RouterSettings
from stickystate.local_cluster import http_json
from tests.helpers import Api, wait_until


def test_the_echo_answers_pings_and_nothing_else() -> None:
    echo = LivenessEcho("127.0.0.1", 0)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(10.0)
    try:
        client.sendto(b"not a ping", ("127.0.0.1", echo.port))
        client.sendto(b"x" * (LIVENESS_PING_BYTES + 1), ("127.0.0.1", echo.port))
        ping = uuid.uuid4().bytes
        client.sendto(ping, ("127.0.0.1", echo.port))
        # loopback keeps the order: the first answer is the ping's, so the others got none
        assert client.recvfrom(64)[0] == ping
        assert echo.echoed_total == 1
    finally:
        client.close()
        echo.close()
    assert not echo._thread.is_alive()


BUSY = """
import sys
from stickystate.node.liveness import LivenessEcho
echo = LivenessEcho("127.0.0.1", 0)
print(echo.port, flush=True)
n = 0
while True:  # the main thread never waits: an event loop that is busy all the time
    n += 1
"""


async def test_a_busy_process_keeps_echoing_and_a_stopped_one_falls_silent() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE)
    pinger: asyncio.Task[None] | None = None
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        detector = PhiAccrual(first_interval_s=0.1)
        channel = await EchoChannel.open("127.0.0.1", port, detector)

        async def ping() -> None:
            while True:
                channel.ping()
                await asyncio.sleep(0.1)  # the ping period, as the router's (not a synchronisation)

        pinger = asyncio.create_task(ping())
        await wait_until(lambda: channel.echoes_total >= 20, timeout_s=60,
                         what="20 echoes from a process whose main thread never waits")

        proc.send_signal(signal.SIGSTOP)
        await wait_until(lambda: detector.suspect(time.monotonic()), timeout_s=60,
                         what="the stopped process to be suspected")
        silent_at = channel.echoes_total
        proc.send_signal(signal.SIGCONT)
        await wait_until(lambda: channel.echoes_total > silent_at, timeout_s=60,
                         what="echoes again after SIGCONT")
        assert not detector.suspect(time.monotonic())
        channel.close()
    finally:
        if pinger is not None:
            pinger.cancel()
        proc.kill()
        proc.wait()


def test_late_http_answers_with_an_echoing_process_are_a_busy_loop_until_the_stall_bound() -> None:
    c = Cluster(RouterSettings(nodes=(("n1", "http://127.0.0.1:1"),), partitions=8, auth="open", loop_stall_s=2.0))
    node = c.nodes["n1"]
    t = 1000.0
    for i in range(20):  # both answered every 0.1 s until t
        node.detector.heartbeat(t - 1.9 + i * 0.1)
    assert not c._only_busy(node, t + 1.0)  # no echo: the HTTP detector decides alone
    node.echo = EchoChannel(node.liveness)  # not opened: only its detector matters here
    for i in range(20):
        node.liveness.heartbeat(t - 1.9 + i * 0.1)
    assert not c._only_busy(node, t + 1.0)  # the echo fell silent with the HTTP answers: a stopped process
    for i in range(1, 11):  # the process keeps echoing while its loop answers nothing
        node.liveness.heartbeat(t + i * 0.1)
    assert node.detector.suspect(t + 1.0) and c._only_busy(node, t + 1.0)
    for i in range(11, 22):
        node.liveness.heartbeat(t + i * 0.1)
    assert not c._only_busy(node, t + 2.1)  # past loop_stall_s: a loop stuck for good
    node.liveness = PhiAccrual()  # an echo not proven yet (fewer intervals than min_samples)
    node.liveness.heartbeat(t + 1.0)
    assert not c._only_busy(node, t + 1.0)


def router_log(c: Any) -> list[dict[str, Any]]:
    out = []
    for line in (c.data_dir / "router.log").read_bytes().splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return out


@pytest.mark.kafka
async def test_a_paused_owner_is_declared_dead_by_its_silent_process(start_cluster: Any) -> None:
    # HTTP probes only once a second: their detector would wait about 2.4 s for a silent
    # node; the liveness echo (pinged every 0.1 s) speaks first
    c = start_cluster(router_env={"STICKYSTATE_HEALTH_INTERVAL_S": "1.0"})
    sid = "paused-" + uuid.uuid4().hex[:6]
    async with aiohttp.ClientSession() as http:
        for nid in c.node_ids():
            status, node_status = http_json(c.node_url(nid) + "/internal/status")
            assert status == 200 and isinstance(node_status["liveness_port"], int), node_status
        await wait_until(lambda: all((n["liveness_echoes"] or 0) >= 20 for n in c.cluster_view()["nodes"]),
                         timeout_s=60, what="the router to hear every node's liveness echo")
        api = Api(http, c.router_url)
        status, _, headers = await api.call("POST", "/v1/sessions", {"id": sid, "data": {"n": 0}},
                                            headers={"Durability": "log"})
        assert status == 201
        old = headers["X-Stickystate-Owner"]
        c.signal_node(old, signal.SIGSTOP)
        try:
            status, body, headers = await api.call("PATCH", f"/v1/sessions/{sid}", {"n": 1},
                                                   headers={"Durability": "log"})
            assert status == 200, body
            assert headers["X-Stickystate-Owner"] != old
        finally:
            c.signal_node(old, signal.SIGCONT)
    downs = [r for r in router_log(c) if r.get("msg") == "node down" and r.get("peer") == old]
    assert downs and downs[0]["reason"].startswith("process silent"), downs
    assert shard_of(sid, c.partitions) in {int(s) for s, o in c.cluster_view()["shards"].items() if o != old}
