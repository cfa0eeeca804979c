"""Sampling profiles of the servers under load, with py-spy (``python -m stickystate.bench --profile``).

One ``py-spy record --format raw`` per server process (router, nodes, baseline servers)
for the length of one extra step; from its collapsed stacks this module writes a
``py-spy top``-like summary (share per area of the code, per package, top functions
by own and by inclusive time) and a flame graph SVG.

What the shares mean: py-spy leaves out threads it sees idle (waiting in epoll), so
a sample is a moment the process was running *or runnable* (waiting for a core, on
a busy machine) or in a system call; the shares are of those samples. System calls
(socket writes, epoll) are over-represented by the sampler itself (it interrupts the
process), and time in C code (uvloop, orjson, the HTTP parser) is charged to the
Python function that called it unless ``--native``. Use the shares to see where
time goes, the CPU figures from /proc (the harness's) to see how much there is.

Pure apart from starting/stopping py-spy: parsing, summarizing and the SVG are
functions of the collapsed text.
"""

from __future__ import annotations

import html
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Stacks = list[tuple[list[str], int]]


def py_spy_path() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


@dataclass
class Recording:
    name: str  # e.g. "n1", "router", "server-0"
    pid: int
    raw_path: Path
    popen: subprocess.Popen

    def stop(self, timeout_s: float = 20.0) -> bool:
        """SIGINT makes py-spy write its output (empty if the process never ran); True if it did."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        return self.raw_path.is_file()


def start(name: str, pid: int, out_dir: Path, rate_hz: int = 100, native: bool = False) -> Recording:
    exe = py_spy_path()
    if exe is None:
        raise RuntimeError("py-spy not found: pip install -e '.[bench]'")
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{name}.collapsed"
    args = [exe, "record", "--pid", str(pid), "--rate", str(rate_hz), "--format", "raw", "--nolineno",
            "--output", str(raw)]
    if native:
        args.append("--native")
    log = open(out_dir / f"{name}.py-spy.log", "wb")
    popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return Recording(name, pid, raw, popen)


# --------------------------------------------------------------------------- analysis


def parse_collapsed(text: str) -> Stacks:
    """``frame;frame;...;leaf count`` lines (outermost first) -> [(frames, count)]."""
    out: Stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        out.append((stack.split(";"), int(count)))
    return out


def package_of(frame: str) -> str:
    """``send (aiokafka/producer/producer.py)`` -> ``aiokafka``; ``<module> (bench.py)`` -> ``bench.py``."""
    if frame.endswith(")") and " (" in frame:
        path = frame[frame.rindex(" (") + 2:-1]
    else:
        return frame  # a native frame without a file, or a process/thread line
    path = path.split(":", 1)[0]
    head = path.split("/", 1)[0]
    if head.startswith("<"):
        return "(interpreter)"
    return head.removesuffix(".py").removesuffix(".pyx")


def _is_python_frame(frame: str) -> bool:
    return frame.endswith(")") and " (" in frame


# Areas of a stickystate or baseline server, by a frame anywhere on the stack; the first
# pattern that matches wins (nested areas first).
AREAS: list[tuple[str, tuple[str, ...]]] = [
    # node/writes.py since the store's split (NodeStore.*: profiles recorded before it)
    ("node: store.write (apply, limits, hand-over to the replicator)", ("Writes.write (", "NodeStore.write (")),
    ("node: Durability log wait (confirm)", ("Writes.confirm (", "NodeStore.confirm (")),
    ("router: forwarding to the nodes (upstream connections, retries)",
     ("Forwarder.", "UpstreamConnection.", "UpstreamPool.")),
    # the httptools front (stickystate/http/): the router's RelayFront and the node's NodeFront
    ("HTTP front: connections, parsing, handlers, answers (httptools)",
     ("RelayFront.", "ClientConnection.", "NodeFront.", "Front.relay_local (")),
    ("Kafka producer: Replicator sender task", ("Replicator._run (",)),
    ("Kafka producer: aiokafka Sender", ("Sender.",)),
    ("Kafka consumer: aiokafka Fetcher", ("Fetcher.",)),
    ("Kafka consumer: Follower loop, applying records", ("Follower._run (",)),
    ("Kafka: connections, metadata, other", ("AIOKafkaConnection.", "AIOKafkaClient.")),
    ("Redis client", ("(redis/",)),
    ("HTTP: handlers, middlewares, responses (aiohttp)", ("RequestHandler._handle_request (",)),
    ("HTTP: reading and parsing requests (aiohttp)", ("RequestHandler.data_received (",)),
    ("HTTP: connection loop (aiohttp)", ("RequestHandler.start (",)),
    ("router: health checks, placement", ("Cluster.",)),
]
EVENT_LOOP = "event loop itself (uvloop C code, callbacks, epoll)"
# Helper threads that spend their life blocked in a system call py-spy does not take for idle
# (a socket's recvfrom with a timeout waits in poll()): their samples are left out. The node's
# liveness echo thread (node/liveness.py) made 15-20% of a node's samples at 2,000 turns/s
# while it answers 10 pings a second.
BLOCKED_LEAVES = ("LivenessEcho._run (",)


def blocked(frames: list[str]) -> bool:
    """A sample of a helper thread waiting in a system call (``BLOCKED_LEAVES``): not CPU."""
    return bool(frames) and frames[-1].startswith(BLOCKED_LEAVES)


def area_of(frames: list[str]) -> str:
    joined = ";".join(frames)
    for name, patterns in AREAS:
        if any(p in joined for p in patterns):
            return name
    if frames and frames[-1].startswith(("Runner.run (", "run_app (", "run_until_complete (", "run_forever (")):
        return EVENT_LOOP
    return "other"


def summarize(stacks: Stacks, duration_s: float, rate_hz: int, top: int = 25) -> dict[str, Any]:
    """Shares of the samples: per area (``AREAS``), per package of the innermost frame,
    and top functions by own (innermost) and inclusive (anywhere in the stack, once per
    stack) samples."""
    blocked_samples = 0
    areas: Counter[str] = Counter()
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    by_pkg: Counter[str] = Counter()
    for frames, count in stacks:
        frames = [f for f in frames if _is_python_frame(f) or not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if blocked(frames):
            blocked_samples += count
            continue
        leaf = frames[-1]
        areas[area_of(frames)] += count
        own[leaf] += count
        by_pkg[package_of(leaf)] += count
        for f in set(frames):
            incl[f] += count

    total = sum(c for _, c in stacks) - blocked_samples

    def pct(n: int) -> float:
        return round(100.0 * n / total, 1) if total else 0.0

    return {
        "samples": total,
        "blocked_samples": blocked_samples,
        "duration_s": round(duration_s, 2),
        "rate_hz": rate_hz,
        # running, runnable or in a system call: more than the CPU used on a busy machine
        "active_pct": round(100.0 * total / (duration_s * rate_hz), 1) if duration_s > 0 else None,
        "by_area": [(a, pct(n)) for a, n in areas.most_common()],
        "by_package": [(p, pct(n)) for p, n in by_pkg.most_common(15)],
        "top_own": [(f, pct(n)) for f, n in own.most_common(top)],
        "top_inclusive": [(f, pct(n)) for f, n in incl.most_common(top)],
    }


def summary_text(name: str, s: dict[str, Any]) -> str:
    """A ``py-spy top``-like plain-text table."""
    cpu = f"; CPU used (from /proc): {s['cpu_pct']}% of one core" if s.get("cpu_pct") is not None else ""
    lines = [f"{name}: {s['samples']} samples over {s['duration_s']} s at {s['rate_hz']} Hz "
             f"(running, runnable or in a system call {s['active_pct']}% of the time{cpu})", "",
             "%     area (a frame on the stack)"]
    lines += [f"{p:5.1f} {a}" for a, p in s["by_area"]]
    lines += ["", "%own  package (innermost frame)"]
    lines += [f"{p:5.1f} {pkg}" for pkg, p in s["by_package"]]
    lines += ["", "%own  function"]
    lines += [f"{p:5.1f} {f}" for f, p in s["top_own"]]
    lines += ["", "%incl function"]
    lines += [f"{p:5.1f} {f}" for f, p in s["top_inclusive"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- flame graph


def flamegraph_svg(stacks: Stacks, title: str, width: int = 1200, row_px: int = 16,
                   min_frac: float = 0.002) -> str:
    """A static flame graph (root at the bottom), one <rect> per frame with a <title>
    tooltip; frames narrower than ``min_frac`` of the total are left out, and so are the
    samples of threads blocked in a system call (``BLOCKED_LEAVES``), as in ``summarize``."""
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for frames, count in stacks:
        if blocked(frames):
            continue
        node = tree
        node["n"] += count
        for f in frames:
            node = node["kids"].setdefault(f, {"n": 0, "kids": {}})
            node["n"] += count
    total = tree["n"] or 1

    def depth(node: dict[str, Any]) -> int:
        kids = [k for k in node["kids"].values() if k["n"] / total >= min_frac]
        return 1 + max((depth(k) for k in kids), default=0)

    rows = depth(tree)
    top_pad = 40
    height = top_pad + rows * row_px + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           f'<rect width="100%" height="100%" fill="#fdfdf6"/>',
           f'<text x="10" y="20" font-size="14">{html.escape(title)}</text>',
           f'<text x="10" y="34" fill="#555">{total} samples; width = share of on-CPU samples; '
           f'hover a frame for its name and share</text>']

    def colour(name: str) -> str:
        h = sum(ord(c) for c in package_of(name)) % 360 if _is_python_frame(name) else 0
        return f"hsl({(h * 37) % 60 + 10}, 85%, {60 + (h % 15)}%)"

    def draw(name: str, node: dict[str, Any], x: float, level: int) -> None:
        w = width * node["n"] / total
        y = height - 10 - (level + 1) * row_px
        label = f"{name} ({100.0 * node['n'] / total:.1f}%)"
        out.append(f'<g><title>{html.escape(label)}</title><rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.5):.1f}" '
                   f'height="{row_px - 1}" fill="{colour(name)}"/>')
        chars = int(w / 6.6)
        if chars >= 4:
            text = name if len(name) <= chars else name[:chars - 2] + ".."
            out.append(f'<text x="{x + 2:.1f}" y="{y + row_px - 4}">{html.escape(text)}</text>')
        out.append("</g>")
        cx = x
        for kname, kid in sorted(node["kids"].items(), key=lambda kv: kv[0]):
            if kid["n"] / total >= min_frac:
                draw(kname, kid, cx, level + 1)
            cx += width * kid["n"] / total

    draw("all", tree, 0.0, 0)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def resummarize(s: dict[str, Any]) -> dict[str, Any]:
    """A stored summary computed again from its collapsed stacks (after AREAS changed)."""
    path = Path(s.get("files", {}).get("collapsed", ""))
    if not path.is_file():
        return s
    fresh = summarize(parse_collapsed(path.read_text(errors="replace")), s["duration_s"], s["rate_hz"])
    return {**s, **fresh}


def finish(rec: Recording, duration_s: float, rate_hz: int, title: str,
           cpu_pct: float | None = None) -> dict[str, Any] | None:
    """Stop one recording and write ``<name>.txt`` and ``<name>.svg`` next to its stacks;
    ``cpu_pct``: the process's CPU over the same time, from /proc."""
    if not rec.stop():
        return None
    stacks = parse_collapsed(rec.raw_path.read_text(errors="replace"))
    s = summarize(stacks, duration_s, rate_hz)
    s["cpu_pct"] = cpu_pct
    out_dir = rec.raw_path.parent
    (out_dir / f"{rec.name}.txt").write_text(summary_text(f"{title} {rec.name}", s))
    (out_dir / f"{rec.name}.svg").write_text(flamegraph_svg(stacks, f"{title}: {rec.name}"))
    s["files"] = {k: str(out_dir / f"{rec.name}.{k}") for k in ("txt", "svg", "collapsed")}
    return s
