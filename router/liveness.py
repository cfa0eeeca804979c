"""The router's side of the nodes' liveness echo (node/liveness.py): one connected UDP
socket per node, a 16-byte random ping every ``liveness_interval_s``, and each echo of a
recent ping a heartbeat of that node's liveness detector (router/detector.py).

The echoes come from a thread of the node's process, not from its event loop, so they keep
coming, and regularly, while the loop is busy: the detector over them stays tight, and a
paused process is declared dead about 0.6 s after its last echo however loaded it was.
A node whose echoes never arrive (the port filtered, an older node without one) teaches
the detector nothing and is never suspected by it: the HTTP probe's detector still judges
it, as before.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import cast

from stickystate.protocol import LIVENESS_PING_BYTES
from stickystate.router.detector import PhiAccrual

RECENT_PINGS = 8  # an echo of any of these counts: under load one may overtake the next ping


class EchoChannel(asyncio.DatagramProtocol):
    def __init__(self, detector: PhiAccrual) -> None:
        self.detector = detector
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.echoes_total = 0
        self._recent: deque[bytes] = deque(maxlen=RECENT_PINGS)

    @classmethod
    async def open(cls, host: str, port: int, detector: PhiAccrual) -> EchoChannel:
        channel = cls(detector)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: channel, remote_addr=(host, port))
        channel.port = port
        return channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is not a subclass

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if len(data) == LIVENESS_PING_BYTES and data in self._recent:  # a connected socket: only the node's address
            self._recent.remove(data)
            self.echoes_total += 1
            self.detector.heartbeat(time.monotonic())

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable (the process is gone): its silence says so to the detector

    def ping(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            nonce = os.urandom(LIVENESS_PING_BYTES)
            self._recent.append(nonce)
            self.transport.sendto(nonce)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
