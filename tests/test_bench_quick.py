"""The benchmark harness (bench/) works: ``python -m stickystate.bench --quick`` runs every system,
counts right and writes its files. Not a speed test: nothing here judges performance.

Uses the Kafka of the test session (KAFKA_BOOTSTRAP if set, else one LocalKafka) and
needs ``redis-server`` (Debian package) on PATH: ``./dev setup`` installs it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from stickystate.bench import loadgen
from stickystate.bench.profile import py_spy_path
from stickystate.bench.runner import SYSTEMS, combine

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> dict[str, Any]:
    # Not a skip: the Redis baselines are part of what --quick runs, and ./dev installs redis-server.
    assert shutil.which("redis-server"), "redis-server not installed: ./dev setup (or apt-get install redis-server)"
    out = tmp_path_factory.mktemp("bench") / "quick"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stickystate.bench", "--quick", "--out", str(out),
                           "--kafka-bootstrap", kafka_bootstrap, "--profile", "direct"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # the hang guard
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    doc = json.loads((out / "results.json").read_text())
    print(f"bench --quick took {elapsed:.1f}s")
    return {"out": out, "doc": doc, "stdout": proc.stdout}


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """Cells of the data rows of the first table under ``heading`` (a whole line)."""
    lines = markdown.splitlines()
    assert heading in lines, f"no {heading!r} in the report"
    rows: list[list[str]] = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break  # the first table ended
    assert len(rows) >= 2, f"no table under {heading!r}"
    return rows[2:]  # without the header and separator rows


@pytest.mark.kafka
@pytest.mark.slow
def test_quick_writes_its_files(quick_run: dict[str, Any]) -> None:
    out: Path = quick_run["out"]
    for name in ("results.json", "report.md", "latency_vs_rate_write-heavy.png", "percentiles_write-heavy.png",
                 "latency_vs_rate_read-heavy.png", "replication.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "| router |" in report and "| redis-naive |" in report
    doc = quick_run["doc"]
    assert {t["target"].split(" ")[0] for t in doc["targets"]} >= {"router", "straight-to-node", "bytes", "cost"}
    # One summary row per system in each mix's table, with no errors; one row per step below.
    for mix, systems in doc["summary"].items():
        rows = table_rows(report, f"## {mix} mix")
        assert [r[0] for r in rows] == list(systems), (mix, rows)
        for row in rows:
            assert row[11] == f"0 / {systems[row[0]]['sent']}" and systems[row[0]]["sent"] > 0, (mix, row)
    # CPU per turn by process kind (issue 12), every system of the headline mix; total = the server
    # side, of which some in the kernel (never more than the total; /proc counts it in 10 ms ticks,
    # so a short quick step may show none)
    cpu = table_rows(report, "## CPU per turn (write-heavy mix)")
    assert [r[0] for r in cpu] == list(doc["summary"]["write-heavy"])
    for row in cpu:
        total, kernel = (float(c.replace(",", "")) for c in row[3:5])
        parts = [float(c.replace(",", "")) for c in row[5:] if c != "-"]
        assert parts and abs(total - sum(parts)) <= len(parts), row
        assert 0 <= kernel <= total, row
    steps = table_rows(report, "## Every step")
    assert [(r[0], r[1], float(r[2]), int(r[9])) for r in steps] == \
        [(s["system"], s["mix"], s["target_rate"], 0) for s in doc["steps"]]


@pytest.mark.kafka
@pytest.mark.slow
def test_quick_counts_and_every_system_answers(quick_run: dict[str, Any]) -> None:
    doc = quick_run["doc"]
    steps = doc["steps"]
    assert set(doc["systems"]) == set(SYSTEMS)
    for system in SYSTEMS:
        mine = [s for s in steps if s["system"] == system]
        assert mine, f"{system} has no measured step"
        assert doc["systems"][system]["seed"]["ok"] == doc["config"]["sessions"]
        for s in mine:
            # every scheduled request is accounted for: answered or an error (incl. timeout)
            assert s["sent"] == s["ok"] + s["errors"], s
            expected = s["target_rate"] * s["duration_s"]
            assert abs(s["sent"] - expected) <= doc["config"]["gen_procs"], (s["sent"], expected)
            assert s["errors"] == 0 and s["ok"] == s["sent"], (system, s["error_kinds"], s["checks"]["examples"])
            # The achieved rate is a measurement (not judged here), but it counts answers:
            # never more than were answered, and some were.
            assert 0 < s["achieved_rate"] <= s["ok"] / s["duration_s"] + 0.1, (s["achieved_rate"], s["ok"])
            assert s["ops"]["read"]["sent"] + s["ops"]["turn"]["sent"] == s["sent"]
            # sampled responses hold a full window ending with the message just sent
            assert s["checks"]["ok"] > 0 and s["checks"]["fail"] == 0, s["checks"]
            assert s["latency_ms"]["p50"] is not None and s["latency_ms"]["p50"] <= s["latency_ms"]["max"]
            assert s["generator"]["cpu_pct"] > 0 and "machine_busy_pct" in s["cpu_pct"]  # it did work, measured
    # direct goes through the Python client (its CPU per request is the client's cost)
    assert doc["systems"]["direct"]["via"] == "client" and doc["systems"]["direct-raw"]["via"] == "direct"
    for system in ("direct", "direct-raw"):
        assert all(s["generator"]["cpu_us_per_ok"] > 0 for s in steps if s["system"] == system)
    mixes = {(s["system"], s["mix"]) for s in steps}
    assert ("router", "read-heavy") in mixes and ("redis-naive", "read-heavy") in mixes


@pytest.mark.kafka
@pytest.mark.slow
def test_quick_bytes_per_turn(quick_run: dict[str, Any]) -> None:
    summ = quick_run["doc"]["summary"]["write-heavy"]
    cfg = quick_run["doc"]["config"]
    window_bytes = cfg["window"] * cfg["msg_bytes"]
    assert cfg["turn_response"] == "minimal"
    for system in ("router", "direct-raw", "redis-naive", "redis-atomic"):
        # the request carries one message, the minimal answer no window
        assert cfg["msg_bytes"] < summ[system]["bytes_per_turn"] < 5 * cfg["msg_bytes"], system
        assert summ[system]["resp_bytes_per_turn"] < cfg["msg_bytes"] * 2, system
    # client-side state ships the window to the server with every turn
    assert window_bytes < summ["client-side"]["bytes_per_turn"] < 1.2 * window_bytes


def py_spy_can_attach(tmp_path: Path) -> bool:
    """Whether this machine lets py-spy read another process (ptrace), tried on a child of ours."""
    exe = py_spy_path()
    assert exe, "py-spy not installed: pip install -e '.[bench]'"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        return subprocess.run([exe, "dump", "--pid", str(child.pid)], capture_output=True, timeout=60).returncode == 0
    finally:
        child.kill()
        child.wait()


@pytest.mark.kafka
@pytest.mark.slow
def test_quick_profile_of_direct(quick_run: dict[str, Any], tmp_path: Path) -> None:
    """--profile direct: one extra step with py-spy on the router and both nodes."""
    doc = quick_run["doc"]
    (prof,) = doc["profiles"]
    assert prof["system"] == "direct" and set(prof["procs"]) == {"n1", "n2", "router"}
    assert all(s["phase"] != "profile" for s in doc["steps"])  # not part of the sweep's results
    if not any(prof["procs"].values()):
        # Only the machine may excuse an empty profile: where py-spy can attach, it is a failure.
        assert not py_spy_can_attach(tmp_path), "py-spy attaches here, yet the bench recorded no profile"
        pytest.skip("py-spy cannot attach to processes on this machine (ptrace not permitted)")
    for name in ("n1", "n2"):
        s = prof["procs"][name]
        assert s["samples"] > 0 and s["cpu_pct"] is not None
        assert s["by_area"] and abs(sum(p for _, p in s["by_area"]) - 100) < 1  # shares of every sample
        for kind in ("txt", "svg", "collapsed"):
            assert Path(s["files"][kind]).stat().st_size > 0
    assert "## Profiles (py-spy)" in (quick_run["out"] / "report.md").read_text()


def test_profile_summary_and_flame_graph_from_collapsed_stacks() -> None:
    from stickystate.bench import profile

    text = "\n".join([
        "main (cli.py);Runner.run (asyncio/runners.py) 50",
        "main (cli.py);Runner.run (asyncio/runners.py);RequestHandler._handle_request (aiohttp/web_protocol.py);"
        "Writes.write (node/writes.py);apply (node/ops.py) 20",
        "main (cli.py);Runner.run (asyncio/runners.py);RequestHandler._handle_request (aiohttp/web_protocol.py);"
        "json_response (node/http.py) 10",
        "main (cli.py);Runner.run (asyncio/runners.py);Fetcher._fetch_requests_routine (aiokafka/consumer/fetcher.py)"
        ";Schema.decode (aiokafka/protocol/types.py) 20",
        # the liveness echo thread, blocked in recvfrom: py-spy samples it, it is not CPU
        "_bootstrap (threading.py);run (threading.py);LivenessEcho._run (node/liveness.py) 30",
        "garbage line",
    ])
    stacks = profile.parse_collapsed(text)
    assert len(stacks) == 5
    s = profile.summarize(stacks, duration_s=2.0, rate_hz=100)
    assert s["samples"] == 100 and s["blocked_samples"] == 30 and s["active_pct"] == 50.0
    areas = dict(s["by_area"])
    assert areas == {profile.EVENT_LOOP: 50.0, "Kafka consumer: aiokafka Fetcher": 20.0,
                     "node: store.write (apply, limits, hand-over to the replicator)": 20.0,
                     "HTTP: handlers, middlewares, responses (aiohttp)": 10.0}
    assert dict(s["by_package"]) == {"asyncio": 50.0, "aiokafka": 20.0, "node": 30.0}
    incl = dict(s["top_inclusive"])
    assert incl["RequestHandler._handle_request (aiohttp/web_protocol.py)"] == 30.0
    assert incl["main (cli.py)"] == 100.0
    svg = profile.flamegraph_svg(stacks, "t <&>")
    assert svg.startswith("<svg") and "t &lt;&amp;&gt;" in svg and svg.count("<rect") >= 6
    assert "apply (node/ops.py) (20.0%)" in svg
    assert "no-such" not in profile.summary_text("n1", s) and "%own  function" in profile.summary_text("n1", s)


# --------------------------------------------------------------------------- generator alone


async def fake_append_server(append: Any) -> tuple[web.AppRunner, int]:
    """An aiohttp server whose only route is the turn (list append); returns it and its port."""
    app = web.Application()
    app.router.add_post("/v1/sessions/{sid}/lists/{field}", append)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def worker(port: int, sessions: int) -> loadgen.Worker:
    return loadgen.Worker({"wid": 0, "kind": "sticky", "targets": [("127.0.0.1", port)],
                           "sessions": [(f"s-{i}", 0) for i in range(sessions)], "window": 5, "msg_bytes": 300,
                           "max_conns": 64, "check_every": 1})


def step(rate: int, duration: float, drain_s: float) -> dict[str, Any]:
    return {"rate": rate, "duration": duration, "read_frac": 0.0, "drain_s": drain_s,
            "start_at": time.monotonic() + 0.05, "prewarm": 4}


async def test_loadgen_counts_errors_and_timeouts() -> None:
    """Against a server answering 503 for one session and never for another:
    sent == ok + http errors + timeouts, latency only from answered requests. Turns ask
    for minimal answers, whose versions the generator checks."""
    versions: dict[str, int] = {}
    never = asyncio.Event()  # s-2's answers never come: they end as timeouts at the drain deadline

    async def append(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        doc = orjson.loads(await request.read())
        if sid == "s-1":
            return web.json_response({"error": "unavailable"}, status=503)
        if sid == "s-2":
            await never.wait()
        versions[sid] = versions.get(sid, 1) + 1
        assert request.headers["Prefer"] == "return=minimal" and len(doc["items"]) == 1
        return web.Response(body=orjson.dumps({"id": sid, "version": versions[sid], "expires_at": 1.0}),
                            content_type="application/json")

    runner, port = await fake_append_server(append)
    try:
        w = worker(port, 4)
        await w.setup()
        # the drain is long enough for every answer that comes; the step waits it out only
        # because s-2's never do
        part = await w.step(step(200, 0.5, drain_s=2.0))
    finally:
        await runner.cleanup()
    result = combine([part], 200, 0.5)
    assert result["sent"] == 100
    assert result["sent"] == result["ok"] + result["errors"]
    assert result["error_kinds"] == {"http_503": 25, "timeout": 25}
    assert result["ok"] == 50 and result["checks"]["fail"] == 0 and result["checks"]["ok"] == 50
    assert result["latency_ms"]["count"] == 50  # the answered ones only: no timeout is a latency
    assert result["bytes_per_turn"] > 300


async def test_loadgen_checks_catch_a_version_that_does_not_grow() -> None:
    """A minimal answer's version must exceed every version answered before its turn was
    sent. A server whose versions grow passes every check; once it stops growing, every
    later turn fails its check."""
    versions: dict[str, int] = {}
    growing = True

    async def append(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        if growing:
            versions[sid] = versions.get(sid, 1) + 1
        return web.Response(body=orjson.dumps({"id": sid, "version": versions[sid], "expires_at": 1.0}),
                            content_type="application/json")

    runner, port = await fake_append_server(append)
    try:
        w = worker(port, 2)
        await w.setup()
        first = await w.step(step(100, 0.2, drain_s=30.0))  # every answer is in before the next step
        growing = False
        stuck = await w.step(step(100, 0.2, drain_s=30.0))
    finally:
        await runner.cleanup()
    assert (first["ok"], first["checks"]["ok"], first["checks"]["fail"]) == (20, 20, 0)
    assert (stuck["ok"], stuck["checks"]["ok"], stuck["checks"]["fail"]) == (20, 0, 20)
    assert "check failed (turn)" in stuck["checks"]["examples"][0]


def test_broker_profile_summary_from_jfr_samples() -> None:
    """bench/jfr.py: samples as ``jfr print --json`` gives them (classes with slashes, frames
    top first) -> shares per thread group, per KafkaApis handler and per stage, inclusive."""
    from stickystate.bench import jfr

    def frame(cls: str, method: str) -> dict[str, Any]:
        return {"method": {"type": {"name": cls}, "name": method}, "lineNumber": 1, "type": "JIT compiled"}

    def sample(thread: str, *frames: tuple[str, str]) -> dict[str, Any]:
        return {"type": "jdk.ExecutionSample",
                "values": {"sampledThread": {"javaName": thread},
                           "stackTrace": {"truncated": False, "frames": [frame(c, m) for c, m in frames]}}}

    produce = (("org/apache/kafka/storage/internals/log/UnifiedLog", "append"),
               ("kafka/server/ReplicaManager", "appendRecords"),
               ("kafka/server/KafkaApis", "handleProduceRequest"),
               ("kafka/server/KafkaApis", "handle"),
               ("kafka/server/KafkaRequestHandler", "run"))
    doc = {"recording": {"events": [
        sample("data-plane-kafka-request-handler-0", *produce),
        sample("data-plane-kafka-request-handler-3", *produce[1:]),
        sample("data-plane-kafka-request-handler-1", ("kafka/server/KafkaApis", "handleFetchRequest"),
               ("kafka/server/KafkaApis", "handle"), ("kafka/server/KafkaRequestHandler", "run")),
        sample("data-plane-kafka-network-thread-1-ListenerName(PLAINTEXT)-PLAINTEXT-2",
               ("org/apache/kafka/common/network/Selector", "poll")),
    ]}}
    samples = jfr.parse_samples(doc)
    assert samples[0] == ("data-plane-kafka-request-handler-0", ["UnifiedLog.append", "ReplicaManager.appendRecords",
                          "KafkaApis.handleProduceRequest", "KafkaApis.handle", "KafkaRequestHandler.run"])
    s = jfr.summarise(samples)
    assert s["thread"] == {"data-plane-kafka-request-handler-N": 3,
                           "data-plane-kafka-network-thread-N-ListenerName(PLAINTEXT)-PLAINTEXT-N": 1}
    assert s["request handler (inclusive)"] == {"KafkaApis.handleProduceRequest": 2, "KafkaApis.handleFetchRequest": 1}
    assert s["stage (inclusive)"]["KafkaRequestHandler.run"] == 3 and s["stage (inclusive)"]["UnifiedLog.append"] == 1
    assert s["own (top frame)"]["ReplicaManager.appendRecords"] == 1
    text = jfr.summary_text(samples)
    assert text.startswith("# Kafka broker, JFR execution samples: 4") and " 50.0%  KafkaApis.handleProduceRequest" in text


def test_broker_settings_for_an_ab_reach_the_local_broker(tmp_path: Path) -> None:
    """--kafka-prop KEY=VALUE (repeatable) becomes the Config's kafka_props, which the
    harness gives the broker it starts (LocalKafka extra_props, over its own settings);
    anything but KEY=VALUE is refused at parsing."""
    from stickystate.bench.cli import build_parser, config_from_args
    from stickystate.kafka_local import LocalKafka

    parser = build_parser()
    ns = parser.parse_args(["--out", str(tmp_path), "--kafka-prop", "num.io.threads=2",
                            "--kafka-prop", " num.network.threads = 1"])
    cfg = config_from_args(ns)
    assert cfg.kafka_props == {"num.io.threads": "2", "num.network.threads": "1"}
    assert config_from_args(parser.parse_args(["--out", str(tmp_path)])).kafka_props == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--kafka-prop", "num.io.threads"])
    props = LocalKafka(tmp_path / "k", extra_props=cfg.kafka_props).server_properties()
    assert props["num.io.threads"] == "2" and props["num.network.threads"] == "1"
