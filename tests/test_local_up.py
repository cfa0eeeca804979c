"""``stickystate up`` as a user runs it (a subprocess; tests/up_process.py): secrets off every
command line, and supervision: a node, the router or the broker killed with SIGKILL is
named in up's output, restarted, and serves again while the rest keep serving.

What the client loop allows itself: nothing. One connection per request, no retry of its
own; the only retries are the router's (a connection error, a 421 or a node declared dead
sends the request to the shard's next owner, with the Idempotency-Key it added).
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stickystate.client import Client
from tests.helpers import wait_for
from tests.up_process import ClientLoop, Up, alive, descendants, get_json, request

PARTITIONS = "8"


@pytest.fixture
def up_factory(tmp_path: Path) -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.kill_all()


def start_up(started: list[Up], tmp: Path, *args: str, env: dict[str, str] | None = None,
             own_broker: bool = False, routers: int = 1) -> Up:
    env = {"STICKYSTATE_CHANGES_TOPIC": f"changes-up-{uuid.uuid4().hex[:8]}", **(env or {})}
    up = Up(tmp / "run", "--partitions", PARTITIONS, *args, env=env, own_broker=own_broker, routers=routers)
    started.append(up)
    up.wait_up()
    return up


def stop_cleanly(up: Up) -> None:
    """Ctrl-C: up exits 0 and leaves no process behind."""
    children = set(up.pids.values()) | descendants(up.proc.pid)
    assert up.interrupt() == 0, up.output()
    assert "up: stopped." in up.output()
    wait_for(lambda: not any(alive(pid) for pid in children), 30, "every child of up to exit")


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def owned(view: dict, node: str) -> set[str]:
    return {s for s, owner in view.get("shards", {}).items() if owner == node}


def serving_again(up: Up, node: str, shards: set[str]) -> bool:
    view = up.cluster()
    nodes = {n["id"]: n for n in view.get("nodes", [])}
    return bool(view.get("settled")) and nodes.get(node, {}).get("healthy") is True and owned(view, node) == shards


# -- secrets ------------------------------------------------------------------------------------


@pytest.mark.kafka
def test_up_passes_no_secret_on_any_command_line_even_one_starting_with_a_dash(
        kafka_bootstrap: str, tmp_path: Path, up_factory: list[Up]) -> None:
    secret = "-" + secrets.token_urlsafe(24)  # argparse would take it for an option
    up = start_up(up_factory, tmp_path, "--kafka-bootstrap", kafka_bootstrap,
                  env={"STICKYSTATE_INTERNAL_SECRET": secret})
    children = descendants(up.proc.pid)
    assert set(up.pids.values()) <= children and len(up.pids) == 4
    for pid in children | {up.proc.pid}:
        assert secret.encode() not in cmdline(pid), f"pid {pid}: {cmdline(pid)!r}"
    # the secret works: the router's calls to the nodes (assignments, health checks, forwarded
    # requests) carry it, and a node answers an internal call with it, and refuses one without
    status, doc = request(up.router_url, "PUT", "/v1/sessions/dash", {"k": 1})
    assert status in (200, 201), doc
    node = f"http://127.0.0.1:{up.base_port + 1}"
    status, doc = request(node, "GET", "/internal/status", headers={"X-Stickystate-Internal": secret})
    assert status == 200 and doc["serving"], doc
    assert request(node, "GET", "/internal/status")[0] == 401
    stop_cleanly(up)


@pytest.mark.kafka
def test_keys_mode_cluster_keeps_keys_and_secret_off_command_lines(start_cluster) -> None:  # type: ignore[no-untyped-def]
    key = "k" + secrets.token_hex(12)
    secret = "-" + secrets.token_urlsafe(24)
    c = start_cluster(auth="keys", api_keys=f"{key}=acme", internal_secret=secret)
    for name, proc in c.procs.items():
        line = cmdline(proc.pid)
        assert secret.encode() not in line and key.encode() not in line, (name, line)
    status, doc = request(c.router_url, "PUT", "/v1/sessions/s", {"k": 1}, headers={"Authorization": f"Bearer {key}"})
    assert status in (200, 201), doc
    assert request(c.router_url, "GET", "/v1/sessions/s")[0] == 401


# -- supervision ----------------------------------------------------------------------------------


def run_loop(up: Up, durability: str = "log") -> ClientLoop:
    sids = [f"s{i}" for i in range(16)]
    for sid in sids:
        status, doc = request(up.router_url, "PUT", f"/v1/sessions/{sid}", {"n": 0})
        assert status in (200, 201), doc
    loop = ClientLoop(up.router_url, sids, durability)
    loop.start()
    wait_for(lambda: loop.ok_count() >= 40, 60, "the client loop to get going")
    return loop


def more_successes(loop: ClientLoop, n: int = 60) -> None:
    target = loop.ok_count() + n
    wait_for(lambda: loop.ok_count() >= target, 90, f"{n} more successful requests")


@pytest.mark.kafka
@pytest.mark.slow
def test_up_restarts_a_killed_node_and_every_request_through_the_router_succeeds(
        kafka_bootstrap: str, tmp_path: Path, up_factory: list[Up]) -> None:
    up = start_up(up_factory, tmp_path, "--kafka-bootstrap", kafka_bootstrap)
    mark = len(up.lines)
    loop = run_loop(up)
    try:
        view = up.cluster()
        victim = max(("n1", "n2", "n3"), key=lambda n: len(owned(view, n)))
        shards = owned(view, victim)
        os.kill(up.pids[victim], signal.SIGKILL)
        up.wait_line(rf"{victim} \(pid {up.pids[victim]}\) killed by SIGKILL after [\d.]+ s; restarting it in", 30,
                     after=mark)
        up.wait_line(rf"{victim} restarted \(pid \d+\)", 60, after=mark)
        wait_for(lambda: serving_again(up, victim, shards), 120, f"{victim} to serve its shards {sorted(shards)} again")
        more_successes(loop)
    finally:
        loop.stop()
        print(loop.summary())
        print("\n".join(up.lines[mark:]))
    assert loop.failures() == [], loop.failures()[:10]
    assert loop.stale_reads == []
    stop_cleanly(up)


@pytest.mark.kafka
@pytest.mark.slow
def test_up_restarts_a_killed_router_and_clients_see_connection_errors_only_meanwhile(
        kafka_bootstrap: str, tmp_path: Path, up_factory: list[Up]) -> None:
    up = start_up(up_factory, tmp_path, "--kafka-bootstrap", kafka_bootstrap)
    mark = len(up.lines)
    loop = run_loop(up)
    try:
        os.kill(up.pids["router"], signal.SIGKILL)
        up.wait_line(rf"router \(pid {up.pids['router']}\) killed by SIGKILL after [\d.]+ s; restarting it", 30,
                     after=mark)
        up.wait_line(r"router restarted \(pid \d+\)", 60, after=mark)
        wait_for(lambda: bool(up.cluster().get("settled")), 60, "the new router to settle")
        more_successes(loop)
    finally:
        loop.stop()
        print(loop.summary())
        print("\n".join(up.lines[mark:]))
    failures = loop.failures()
    assert all(f.status == 0 for f in failures), [f for f in failures if f.status][:10]  # no HTTP error at all
    assert {f.error for f in failures} <= {"ConnectionRefusedError", "ConnectionResetError", "RemoteDisconnected",
                                           "BrokenPipeError"}, failures[:10]
    if failures:  # every one while the router was down: after the first success following them, none
        first_ok_after = min(o.t for o in loop.outcomes if o.status and o.t > failures[0].t)
        assert all(f.t < first_ok_after for f in failures), failures
    assert loop.stale_reads == []
    stop_cleanly(up)


@pytest.mark.kafka
@pytest.mark.slow
def test_up_with_two_routers_prints_both_and_a_client_given_both_survives_killing_the_leader(
        kafka_bootstrap: str, tmp_path: Path, up_factory: list[Up]) -> None:
    up = start_up(up_factory, tmp_path, "--kafka-bootstrap", kafka_bootstrap, routers=2)
    urls = up.wait_line(r"up: routers: (\S+)").group(1).split(",")
    assert len(urls) == 2 and urls[0] == up.router_url
    assert set(up.pids) >= {"router", "router2", "n1", "n2", "n3"}

    def views() -> list[dict]:
        return [get_json(u + "/v1/cluster") for u in urls]

    wait_for(lambda: all(v.get("settled") for v in views()) and len({v["generation"] for v in views()}) == 1
             and views()[0]["router"]["leader"] is not None, 60, "both routers on one map")
    leader = views()[0]["router"]["leader"]
    mark = len(up.lines)
    acked: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with Client(urls, direct=False, durability="log") as client:  # through the routers only
            client.create("two-routers", {})
            n = 0
            while not stop.is_set():
                try:
                    client.append("two-routers", "items", [n])
                    acked.append(n)
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    errors.append(repr(exc))
                n += 1

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        wait_for(lambda: len(acked) >= 30, 60, "the load to get going")
        os.kill(up.pids[leader], signal.SIGKILL)
        up.wait_line(rf"{leader} \(pid {up.pids[leader]}\) killed by SIGKILL after [\d.]+ s; restarting it", 30,
                     after=mark)
        up.wait_line(rf"{leader} restarted \(pid \d+\)", 60, after=mark)
        wait_for(lambda: all(v.get("settled") for v in views()) and len({v["generation"] for v in views()}) == 1,
                 60, "the restarted router to follow the map")
        target = len(acked) + 30
        wait_for(lambda: len(acked) >= target, 60, "more appends after the restart")
    finally:
        stop.set()
        worker.join(60)
        print("\n".join(up.lines[mark:]))
    assert errors == [], errors[:5]
    assert get_json(urls[1] + "/v1/sessions/two-routers")["data"]["items"] == acked
    stop_cleanly(up)


@pytest.mark.kafka
@pytest.mark.slow
def test_up_restarts_a_killed_broker_and_loses_no_acknowledged_write(
        tmp_path: Path, up_factory: list[Up]) -> None:
    up = start_up(up_factory, tmp_path, own_broker=True)
    assert "kafka" in up.pids
    mark = len(up.lines)
    loop = run_loop(up, durability="log")
    try:
        os.kill(up.pids["kafka"], signal.SIGKILL)
        up.wait_line(rf"kafka \(pid {up.pids['kafka']}\) killed by SIGKILL after [\d.]+ s; restarting it", 30,
                     after=mark)
        up.wait_line(r"kafka restarted \(pid \d+\)", 150, after=mark)
        restarted = len(loop.outcomes)
        wait_for(lambda: sum(1 for o in loop.outcomes[restarted:] if o.op == "write" and 200 <= o.status < 300) >= 30,
                 120, "writes to succeed again after the broker's restart")
    finally:
        loop.stop()
        print(loop.summary())
        print("\n".join(up.lines[mark:]))
    # what failed meanwhile was refused (503, Retry-After), never a wrong answer
    assert {f.status for f in loop.failures()} <= {503}, loop.failures()[:10]
    assert loop.stale_reads == []
    # every acknowledged (log) write is in Kafka: the history of its session holds it
    for sid, values in loop.acked().items():
        seen: set[int] = set()
        after = -1
        while after is not None:
            status, doc = request(up.router_url, "GET", f"/v1/sessions/{sid}/history?after={after}&limit=1000")
            assert status == 200, doc
            seen |= {e["value"] for e in doc["events"] if e.get("op") == "set_key" and e.get("key") == "n"}
            after = doc["next_after"]
        assert set(values) <= seen, (sid, sorted(set(values) - seen))
    stop_cleanly(up)


def test_ctrl_c_while_up_is_still_starting_leaves_no_process(tmp_path: Path, up_factory: list[Up]) -> None:
    """No broker at all (an address nothing listens on): the nodes never get ready, up waits;
    Ctrl-C then stops what it started instead of waiting out its start-up deadline."""
    up = Up(tmp_path / "run", "--kafka-bootstrap", "127.0.0.1:9", "--partitions", PARTITIONS)
    up_factory.append(up)
    wait_for(lambda: len(descendants(up.proc.pid)) >= 4, 60, "up to start the nodes and the router")
    children = descendants(up.proc.pid)
    assert up.interrupt(timeout_s=60) == 0, up.output()
    assert "up: stopped." in up.output()
    wait_for(lambda: not any(alive(pid) for pid in children), 30, "every child of up to exit")


def test_a_local_cluster_never_gives_two_of_its_processes_one_port(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """The kernel may hand out the same free port twice in a row (a CI run's cluster got one
    port for two nodes, and the second could not bind): LocalCluster asks again."""
    from stickystate import local_cluster

    handed = iter([41001, 41001, 41002, 41001, 41002, 41003])

    class Socket:
        def __enter__(self) -> Socket:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, addr: tuple[str, int]) -> None:
            self.port = next(handed)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(local_cluster.socket, "socket", Socket)
    cluster = local_cluster.LocalCluster(tmp_path, nodes=2)
    assert cluster.router_port == 41001 and cluster.node_ports == [41002, 41003]
