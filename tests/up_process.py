"""``stickystate up`` run as a user runs it: a subprocess, its output read line by line, its
children found by the pids it prints. And a client loop through its router that records
every request's outcome (no retries of its own: only the router's)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import wait_for


def free_port_run(n: int) -> int:
    """A first port of ``n`` consecutive free ports (``up`` puts the router and the nodes there).

    Below the kernel's ephemeral range (32768-60999 here): a port from that range, once its
    process is killed, can be taken as the source port of any outgoing connection on the
    machine, and the restarted router then fails to bind it ("address already in use"; seen
    in a full suite run)."""
    for first in range(21000 + os.getpid() % 500 * 20, 32700 - n, 97):
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Up:
    """``python -m stickystate.cli up ...`` with its output collected."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None, nodes: int = 3,
                 own_broker: bool = False, routers: int = 1) -> None:
        # up's layout: the first router at the base port, the nodes after it, further routers
        # after the nodes; the broker (when up starts one) after them all
        self.base_port = free_port_run(nodes + routers + 1)
        self.router_url = f"http://127.0.0.1:{self.base_port}"
        broker = ["--kafka-port", str(self.base_port + nodes + routers)] if own_broker else []
        if routers > 1:
            args = (*args, "--routers", str(routers))
        cmd = [sys.executable, "-m", "stickystate.cli", "up", "--base-port", str(self.base_port),
               "--node-count", str(nodes), "--data-dir", str(data_dir), *broker, *args]
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pids: dict[str, int] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout_s: float = 120.0, after: int = 0) -> re.Match[str]:
        """The first output line (from line ``after`` on) that matches ``pattern``."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            if self.proc.poll() is not None and not found:
                raise AssertionError(f"up exited ({self.proc.returncode}) before printing {pattern!r}:\n"
                                     + self.output())
            for line in self.lines[after:]:
                m = re.search(pattern, line)
                if m:
                    found.append(m)
                    return True
            return False

        wait_for(seen, timeout_s, f"up to print {pattern!r}; output so far:\n{self.output()}")
        return found[0]

    def wait_up(self, timeout_s: float = 180.0) -> dict[str, int]:
        m = self.wait_line(r"up: pids: (.*?);", timeout_s)
        self.pids = {name: int(pid) for name, pid in (p.split() for p in m.group(1).split(", "))}
        return self.pids

    def cluster(self) -> dict[str, Any]:
        return get_json(self.router_url + "/v1/cluster")

    def interrupt(self, timeout_s: float = 90.0) -> int:
        """Ctrl-C (SIGINT to up only, as a terminal's Ctrl-C would not reach the children: they
        run in their own sessions), and wait for it to exit."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout_s)

    def kill_all(self) -> None:
        """Teardown after a failure: up and everything below it."""
        if self.proc.poll() is None:
            for pid in descendants(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait()


def request(base: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            timeout_s: float = 35.0) -> tuple[int, Any]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def get_json(url: str) -> dict[str, Any]:
    base, _, path = url.partition("/v1/")
    try:
        status, doc = request(base, "GET", "/v1/" + path, timeout_s=5)
    except OSError:
        return {}
    return doc if status == 200 and isinstance(doc, dict) else {}


@dataclass
class Outcome:
    t: float
    op: str
    sid: str
    value: int
    status: int  # 0: no HTTP answer
    error: str = ""
    body: Any = None


@dataclass
class ClientLoop:
    """Sequential writes (set key ``n`` to 1, 2, 3, ... per session) and reads of the same
    sessions through the router, one connection per request and no retries: a request either
    gets an answer or its connection error is recorded. A read must return the session's last
    acknowledged value."""

    base: str
    sids: list[str]
    durability: str = "log"
    outcomes: list[Outcome] = field(default_factory=list)
    stale_reads: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def ok_count(self) -> int:
        return sum(1 for o in self.outcomes if 200 <= o.status < 300)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not 200 <= o.status < 300]

    def summary(self) -> str:
        """Counts, and how long requests failed (first to last failure), for the test's output."""
        fails = self.failures()
        span = f"{fails[-1].t - fails[0].t:.2f} s" if fails else "-"
        kinds = sorted({f.error or str(f.status) for f in fails})
        return f"{len(self.outcomes)} requests, {self.ok_count()} succeeded, {len(fails)} failed {kinds} over {span}"

    def acked(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for o in self.outcomes:
            if o.op == "write" and 200 <= o.status < 300:
                out.setdefault(o.sid, []).append(o.value)
        return out

    def _run(self) -> None:
        last: dict[str, int] = {sid: 0 for sid in self.sids}
        unknown: set[str] = set()  # a write without an answer: its value may or may not be there
        n = 0
        while not self._stop.is_set():
            sid = self.sids[n % len(self.sids)]
            n += 1
            if n % 2:
                value = n
                op, method, path, body = "write", "PUT", f"/v1/sessions/{sid}/keys/n", value
                headers = {"Durability": self.durability}
            else:
                value, op, method, path, body, headers = last[sid], "read", "GET", f"/v1/sessions/{sid}", None, {}
            t = time.time()
            try:
                status, doc = request(self.base, method, path, body, headers)
            except OSError as exc:  # connection refused/reset, timeout
                self.outcomes.append(Outcome(t, op, sid, value, 0, type(exc).__name__))
                if op == "write":
                    unknown.add(sid)
                continue
            self.outcomes.append(Outcome(t, op, sid, value, status, body=None if status < 300 else doc))
            if op == "write" and 200 <= status < 300:
                last[sid] = value
                unknown.discard(sid)
            elif op == "write":
                unknown.add(sid)
            elif status == 200 and sid not in unknown and doc["data"].get("n", 0) != last[sid]:
                self.stale_reads.append(f"{sid}: read n={doc['data'].get('n')}, last acknowledged {last[sid]}")
