"""Processes the benchmark starts (redis-server, baseline servers) and CPU accounting
from /proc for every process involved. Loopback only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from stickystate.local_cluster import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")


def wait_http(url: str, timeout_s: float = 30.0, procs: list[subprocess.Popen] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        for p in procs or ():
            if p.poll() is not None:
                raise RuntimeError(f"process {p.args!r} exited with code {p.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:  # noqa: S310 - loopback only
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not answering after {timeout_s}s: {last!r}")


def _stop_popen(p: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@dataclass
class RedisServer:
    """redis-server on a free loopback port, no persistence (no RDB, no AOF)."""

    data_dir: Path
    port: int = 0
    popen: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server (Debian package)")
        self.data_dir = self.data_dir.resolve()  # redis-server chdirs to --dir before opening --logfile
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--protected-mode", "yes", "--daemonize", "no", "--dir", str(self.data_dir),
                "--logfile", str(self.data_dir / "redis.log"), "--maxclients", "10000"]
        self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.popen.returncode}); see {self.data_dir}/redis.log")
            if self.command("PING") == "+PONG":
                return self
            time.sleep(0.05)
        raise TimeoutError("redis-server did not answer PING")

    def command(self, *parts: str) -> str | None:
        """One inline command over a raw socket (no client library in the parent)."""
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall((" ".join(parts) + "\r\n").encode())
                return s.recv(4096).decode().strip()
        except OSError:
            return None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def version(self) -> str:
        try:
            out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=5).stdout
            return out.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    def stop(self) -> None:
        if self.popen is not None:
            _stop_popen(self.popen)
            self.popen = None


@dataclass
class ServerGroup:
    """``procs`` copies of one ``bench.baselines`` server sharing a port (SO_REUSEPORT)."""

    name: str
    args: list[str]
    log_dir: Path
    procs: int = 1
    port: int = 0
    popens: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> ServerGroup:
        self.port = self.port or free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for i in range(self.procs):
            log = open(self.log_dir / f"{self.name}-{i}.log", "ab")
            self.popens.append(subprocess.Popen(
                [sys.executable, "-m", "stickystate.bench.baselines", *self.args, "--port", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            log.close()
        wait_http(self.url + "/livez", 30, self.popens)
        time.sleep(0.3)  # let every process of the group bind before connections are spread
        wait_http(self.url + "/livez", 30, self.popens)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.popens]

    def stop(self) -> None:
        for p in self.popens:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.popens:
            _stop_popen(p)
        self.popens.clear()


# --------------------------------------------------------------------------- CPU


def proc_cpu_s(pid: int, system_only: bool = False) -> float | None:
    """user+system CPU seconds of one process (all its threads); with ``system_only``,
    the time in the kernel alone (system calls, and the loopback networking they run)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    return (int(fields[12]) + (0 if system_only else int(fields[11]))) / CLK_TCK


def machine_cpu() -> tuple[float, float, float]:
    """(busy, total, user+nice+system) jiffies since boot over all CPUs. Interrupt and
    softirq time (where loopback networking mostly lands) counts as busy, not as
    process time."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return total - idle, total, parts[0] + parts[1] + parts[2]


class CpuMeter:
    """CPU used per named component between ``start()`` and ``stop()``, in % of one core;
    for the components named in ``kernel`` also their time in the kernel (``<name>_sys``)."""

    def __init__(self, components: dict[str, list[int]], kernel: tuple[str, ...] = ()) -> None:
        self.components = {k: [p for p in v if p] for k, v in components.items()}
        self.kernel = tuple(k for k in kernel if k in self.components)
        self._t0 = 0.0
        self._c0: dict[str, float] = {}
        self._m0: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def _sample(self) -> dict[str, float]:
        out = {}
        for name, pids in self.components.items():
            out[name] = sum(v for v in (proc_cpu_s(p) for p in pids) if v is not None)
        for name in self.kernel:
            out[f"{name}_sys"] = sum(v for v in (proc_cpu_s(p, True) for p in self.components[name]) if v is not None)
        return out

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._c0 = self._sample()
        self._m0 = machine_cpu()

    def stop(self) -> dict[str, float]:
        wall = max(1e-6, time.monotonic() - self._t0)
        c1 = self._sample()
        m1 = machine_cpu()
        out = {name: round(100.0 * (c1[name] - self._c0.get(name, 0.0)) / wall, 1) for name in c1}
        busy, total, procs = (m1[i] - self._m0[i] for i in range(3))
        ours = sum(v for k, v in out.items() if not k.endswith("_sys"))
        cores = os.cpu_count() or 1
        out["machine_busy_pct"] = round(100.0 * busy / total, 1) if total > 0 else 0.0
        # CPU of every other process on the machine, in % of one core
        out["other_pct"] = round(max(0.0, 100.0 * procs / total * cores - ours), 1) if total > 0 else 0.0
        return out


# --------------------------------------------------------------------------- hiccups


def _hiccup_main(conn, interval_s: float) -> None:  # type: ignore[no-untyped-def]
    """jHiccup-style probe: sleep ``interval_s`` in a loop and record how much longer it
    took. A process doing nothing sees only what the machine (scheduler, hypervisor)
    does to every process: a floor under any latency measured here."""
    from array import array

    over = array("d")
    t_start = time.monotonic()
    while True:
        if conn.poll():
            cmd = conn.recv()
            if cmd == "stop":
                return
            if cmd == "read":
                wall = max(1e-9, time.monotonic() - t_start)
                v = sorted(over)
                n = len(v)
                conn.send({
                    "samples": n,
                    "p99_ms": round(v[int(n * 0.99)] * 1000, 2) if n else None,
                    "p99_9_ms": round(v[int(n * 0.999)] * 1000, 2) if n else None,
                    "max_ms": round(v[-1] * 1000, 2) if n else None,
                    "over_5ms": sum(1 for x in v if x > 0.005),
                    "over_20ms": sum(1 for x in v if x > 0.020),
                    # share of the time the probe was stalled by more than 2 ms
                    "stalled_pct": round(100.0 * sum(x for x in v if x > 0.002) / wall, 2),
                })
            over = array("d")
            t_start = time.monotonic()
        t = time.monotonic()
        time.sleep(interval_s)
        over.append(max(0.0, time.monotonic() - t - interval_s))


class HiccupMeter:
    """A probe process measuring machine-wide stalls during each step."""

    def __init__(self, interval_s: float = 0.001) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hiccup_main, args=(child, interval_s), name="hiccup-probe", daemon=True)
        self.proc.start()
        child.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def reset(self) -> None:
        self.conn.send("reset")

    def read(self) -> dict:
        self.conn.send("read")
        return self.conn.recv() if self.conn.poll(5) else {}

    def stop(self) -> None:
        try:
            self.conn.send("stop")
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(3)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
