"""The Kafka broker's side of a profile step: a JDK Flight Recorder recording.

``python -m stickystate.bench --profile direct@2000`` samples the Python servers with
py-spy; for a system with a broker of its own it also records the broker with JFR
(``jcmd <pid> JFR.start`` ... ``JFR.stop``, the ``profile`` settings: Java samples every
10-20 ms per running thread) and writes ``kafka-jfr.txt`` next to the flame graphs: the
share of the broker's samples per thread group, per request handler (``KafkaApis.handle*``,
inclusive) and per top frame. The recording itself (``kafka.jfr``) stays for ``jfr`` or
JDK Mission Control.

Shares are of the samples JFR took of threads running Java code; time in native code
(``epoll``, socket writes, ``fsync``) is under-counted, so read them as where the
broker's Java work goes, and the CPU figures from /proc (the harness's) as how much.
``python -m stickystate.bench.jfr FILE.jfr`` prints the summary of any recording.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECORDING = "stickystate-bench"

# Inclusive shares worth naming: the request path's stages and the usual per-request costs.
_STAGES = re.compile(
    r"^(SocketServer\$Processor\.(run|poll|processCompletedReceives|processNewResponses)"
    r"|KafkaRequestHandler\.run|RequestChannel\.(sendResponse|receiveRequest)"
    r"|ReplicaManager\.(appendRecords|fetchMessages|readFromLog|maybeAddDelayedFetch|completeDelayedFetchOrProduceRequests)"
    r"|UnifiedLog\.(append|appendAsLeader|read)|LogValidator\.\w+|LocalLog\.append|FileRecords\.\w+"
    r"|DelayedOperationPurgatory\.\w+|Crc32C\.\w+|ProducerStateManager\.\w+"
    r"|Sensor\.record|RequestChannel\.updateErrorMetrics|RequestConvertToJson\.\w+"
    r"|ClientQuotaManager\.\w+|KRaftMetadataCache\.\w+|Selector\.poll|NetworkClient\.poll"
    r"|BrokerLifecycleManager\.\w+|QuorumController\.\w+|KafkaRaftClient\.poll)$"
)


def jcmd_path() -> str | None:
    return shutil.which("jcmd")


def start(pid: int) -> bool:
    """Start a recording in the broker's JVM; False when no ``jcmd`` or it refused."""
    jcmd = jcmd_path()
    if jcmd is None:
        return False
    r = subprocess.run([jcmd, str(pid), "JFR.start", f"name={RECORDING}", "settings=profile"],
                       capture_output=True, text=True, timeout=60)
    return r.returncode == 0 and "Started recording" in r.stdout


def stop(pid: int, out_dir: Path) -> Path | None:
    """Stop the recording into ``out_dir/kafka.jfr`` and write ``kafka-jfr.txt``."""
    jcmd = jcmd_path()
    if jcmd is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kafka.jfr"
    r = subprocess.run([jcmd, str(pid), "JFR.stop", f"name={RECORDING}", f"filename={path}"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not path.exists():
        return None
    samples = read_samples(path)
    if samples is not None:
        (out_dir / "kafka-jfr.txt").write_text(summary_text(samples))
    return path


def read_samples(path: Path) -> list[tuple[str, list[str]]] | None:
    """(thread name, frames top first as ``Class.method``) per execution sample."""
    jfr = shutil.which("jfr")
    if jfr is None:
        return None
    r = subprocess.run([jfr, "print", "--json", "--stack-depth", "256", "--events", "jdk.ExecutionSample", str(path)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return None
    return parse_samples(json.loads(r.stdout))


def parse_samples(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    out = []
    for event in doc["recording"]["events"]:
        values = event["values"]
        thread = (values.get("sampledThread") or {}).get("javaName") or "?"
        frames = (values.get("stackTrace") or {}).get("frames") or []
        out.append((thread, [f"{_class_name(f['method']['type']['name'])}.{f['method']['name']}" for f in frames]))
    return out


def _class_name(name: str) -> str:
    """``kafka/server/KafkaApis`` (JFR's form) or ``kafka.server.KafkaApis`` -> ``KafkaApis``."""
    return re.split(r"[/.]", name)[-1]


def thread_group(name: str) -> str:
    """Thread names without their numbers: ``data-plane-kafka-request-handler-3`` -> ``...-N``."""
    return re.sub(r"\d+", "N", name)


def summarise(samples: Iterable[tuple[str, list[str]]]) -> dict[str, Counter[str]]:
    threads: Counter[str] = Counter()
    handlers: Counter[str] = Counter()
    own: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    for thread, frames in samples:
        threads[thread_group(thread)] += 1
        if frames:
            own[frames[0]] += 1
        handler = next((f for f in frames if f.startswith("KafkaApis.handle") and f != "KafkaApis.handle"), None)
        if handler is not None:
            handlers[handler] += 1
        for f in set(frames):
            if _STAGES.match(f):
                stages[f] += 1
    return {"thread": threads, "request handler (inclusive)": handlers,
            "stage (inclusive)": stages, "own (top frame)": own}


def summary_text(samples: list[tuple[str, list[str]]], top: int = 30) -> str:
    n = len(samples)
    lines = [f"# Kafka broker, JFR execution samples: {n}", ""]
    for title, counter in summarise(samples).items():
        lines.append(f"## {title}")
        for name, count in counter.most_common(top):
            lines.append(f"{100 * count / max(n, 1):6.1f}%  {name}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stickystate.bench.jfr RECORDING.jfr", file=sys.stderr)
        return 2
    samples = read_samples(Path(args[0]))
    if samples is None:
        print("could not read the recording (is the JDK's `jfr` tool on PATH?)", file=sys.stderr)
        return 1
    print(summary_text(samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
