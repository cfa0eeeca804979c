"""Is the process there at all? A thread that echoes the routers' UDP pings, apart from the
event loop that serves requests.

The router's HTTP probe (``/internal/status``) is answered by the event loop, so it cannot
tell a paused or frozen node from a busy one: both answer late. The phi accrual detector
(router/detector.py) gives a node whose answers come irregularly more time, which keeps busy
nodes from being failed over, but makes a node that is paused (SIGSTOP, a VM frozen, a
process swapped out) wait as long as its busiest moments before it is replaced: 2.4 s
in a chaos run at 770 turns/s, against 0.6 s when idle.

This thread answers within a few milliseconds however busy the loop is (it needs only the
GIL, which the loop hands over every ``sys.getswitchinterval()``), and not at all when the
whole process stops. The router runs a second detector over these echoes, with the same
phi accrual rule; its intervals stay regular, so a stopped process is declared dead about
0.6 s after its last echo whatever the load. The same split as Kafka's consumer heartbeat
thread (KIP-62): liveness from a thread, progress from the main loop. A loop that is stuck
while the process lives is still caught by the HTTP probe's detector.

Protocol: a ping is a datagram of 16 random bytes; the echo is the same 16 bytes. The router
accepts an echo only for the ping it has outstanding to that address, so a forged echo has
to have seen the ping.
"""

from __future__ import annotations

import socket
import threading

from stickystate.protocol import LIVENESS_PING_BYTES


class LivenessEcho:
    """A UDP socket on ``host:port`` (0: any free port) and the thread that echoes pings."""

    def __init__(self, host: str, port: int = 0) -> None:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self._sock = socket.socket(family, kind, proto)
        try:
            self._sock.bind(addr)
        except OSError:
            self._sock.close()
            raise
        self._sock.settimeout(0.5)  # how often the thread looks whether it should stop
        self.port: int = self._sock.getsockname()[1]
        self.echoed_total = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness-echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        while not self._stopping.is_set():
            try:
                data, addr = sock.recvfrom(64)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) != LIVENESS_PING_BYTES:
                continue  # not a ping: no answer (and no amplification)
            # Counted before it leaves: whoever received an echo finds it counted (counted after
            # sendto, the pinger could read the count first; a fresh-clone CI run caught that).
            self.echoed_total += 1
            try:
                sock.sendto(data, addr)
            except OSError:
                self.echoed_total -= 1
                continue  # the pinger went away; the next ping comes from elsewhere or not at all

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=2.0)
        self._sock.close()
