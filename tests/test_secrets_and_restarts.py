"""Pure and process-level checks of how ``stickystate node/router/up`` take secrets
(stickystate/credentials.py, cli.py) and of the restart policy (stickystate/supervisor.py).
No Kafka: the supervisor is run over small real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from stickystate import credentials
from stickystate.cli import build_parser
from stickystate.credentials import SecretError
from stickystate.supervisor import Child, RestartBudget, RestartPolicy, Supervisor, describe_exit
from tests.helpers import wait_for

SECRET = "-starts-with-a-dash-0123456789"


def private(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "secret"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


# -- secrets ---------------------------------------------------------------------------------


def test_the_secret_comes_from_the_environment_or_a_private_file(tmp_path: Path) -> None:
    assert credentials.internal_secret("", {"STICKYSTATE_INTERNAL_SECRET": SECRET}) == SECRET
    assert credentials.internal_secret(private(tmp_path, SECRET + "\n"), {}) == SECRET
    assert credentials.internal_secret("", {}) == ""


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644, 0o666])
def test_a_secret_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = private(tmp_path, SECRET, mode)
    with pytest.raises(SecretError, match="chmod 600"):
        credentials.internal_secret(path, {})
    with pytest.raises(SecretError, match="chmod 600"):
        credentials.api_keys(path, {})


def test_the_secret_given_twice_or_empty_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="given twice"):
        credentials.internal_secret(private(tmp_path, SECRET), {"STICKYSTATE_INTERNAL_SECRET": SECRET})
    with pytest.raises(SecretError, match="empty"):
        credentials.internal_secret(private(tmp_path, "\n"), {})
    with pytest.raises(SecretError, match="cannot read"):
        credentials.internal_secret(str(tmp_path / "missing"), {})


def test_api_keys_merge_a_private_file_and_the_environment(tmp_path: Path) -> None:
    path = private(tmp_path, "aaaaaaaaaaaaaaaa acme\nbbbbbbbbbbbbbbbb globex\n")
    keys = credentials.api_keys(path, {"STICKYSTATE_API_KEYS": "bbbbbbbbbbbbbbbb=other,cccccccccccccccc=c"})
    assert keys == {"aaaaaaaaaaaaaaaa": "acme", "bbbbbbbbbbbbbbbb": "other", "cccccccccccccccc": "c"}
    with pytest.raises(SecretError, match="shorter than 16"):
        credentials.api_keys("", {"STICKYSTATE_API_KEYS": "short=acme"})


@pytest.mark.parametrize("command", ["node", "router"])
@pytest.mark.parametrize("argv", [["--internal-secret", SECRET], [f"--internal-secret={SECRET}"],
                                  ["--internal-secret", "plain-secret-0123456789"],
                                  ["--api-keys", "aaaaaaaaaaaaaaaa=acme"], ["--api-keys=-aaaaaaaaaaaaaaa=acme"]])
def test_a_secret_on_the_command_line_is_refused_saying_how_to_pass_it(
        command: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    flag = argv[0].split("=")[0]
    env = "STICKYSTATE_INTERNAL_SECRET" if flag == "--internal-secret" else "STICKYSTATE_API_KEYS"
    assert f"{flag} is no longer accepted" in err and env in err and f"{flag}-file" in err
    assert argv[-1].split("=", 1)[-1] not in err  # the value is not echoed


def test_node_refuses_a_readable_secret_file_at_start(tmp_path: Path) -> None:
    path = private(tmp_path, SECRET, 0o644)
    env = {k: v for k, v in os.environ.items() if k not in credentials.ALL_ENV}
    done = subprocess.run([sys.executable, "-m", "stickystate.cli", "node", "--internal-secret-file", path],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0
    assert "readable or writable by its group or others (mode 0644): chmod 600" in done.stderr


# -- restart policy (pure) -------------------------------------------------------------------


def test_on_failure_restarts_failures_with_a_doubling_backoff_and_gives_up_on_a_crash_loop() -> None:
    budget = RestartBudget(RestartPolicy(backoff_s=0.5, backoff_max_s=3.0, max_restarts=4, window_s=60))
    assert not budget.decide(0, 0.0).restart  # a clean exit
    delays = [budget.decide(-9, t).delay_s for t in (1.0, 2.0, 3.0, 4.0)]
    assert delays == [0.5, 1.0, 2.0, 3.0]
    loop = budget.decide(1, 5.0)
    assert not loop.restart and "crash loop" in loop.reason
    # restarts older than the window are forgotten: a child that ran a while starts afresh
    fresh = budget.decide(1, 70.0)
    assert fresh.restart and fresh.delay_s == 0.5


def test_always_restarts_a_clean_exit_and_no_restarts_nothing() -> None:
    assert RestartBudget(RestartPolicy(mode="always")).decide(0, 0.0).restart
    assert not RestartBudget(RestartPolicy(mode="no")).decide(-9, 0.0).restart
    with pytest.raises(ValueError):
        RestartPolicy(mode="sometimes")


def test_exits_are_described_by_code_or_signal_name() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"


# -- the supervisor over real processes --------------------------------------------------------


class Script:
    """A child that runs ``code`` each time it is started."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.procs.append(subprocess.Popen([sys.executable, "-c", self.code]))

    def child(self, name: str, policy: RestartPolicy) -> Child:
        return Child(name, self.start, lambda: self.procs[-1].poll(), lambda: self.procs[-1].pid, "-",
                     RestartBudget(policy))


def supervise(children: list[Child]) -> tuple[Supervisor, list[str], threading.Thread]:
    lines: list[str] = []
    sup = Supervisor(children, lines.append, poll_s=0.02)
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()
    return sup, lines, thread


def test_supervisor_names_the_death_restarts_and_gives_up_on_a_crash_loop() -> None:
    crasher = Script("import sys; sys.exit(3)")
    steady = Script("import time; time.sleep(60)")
    crasher.start()
    steady.start()
    policy = RestartPolicy(backoff_s=0.01, backoff_max_s=0.05, max_restarts=3, window_s=60)
    sup, lines, thread = supervise([crasher.child("n1", policy), steady.child("n2", policy)])
    try:
        wait_for(lambda: any("giving up" in line for line in lines), 30, f"the crash loop to be given up: {lines}")
        assert len(crasher.procs) == 4  # the first start and 3 restarts
        assert sum("n1 (pid" in line and "exit code 3" in line for line in lines) == 4
        assert sum(line.startswith("n1 restarted (pid ") for line in lines) == 3
        assert "the rest keep running" in lines[-1]
        assert steady.procs[-1].poll() is None and len(steady.procs) == 1  # untouched
        os.kill(steady.procs[-1].pid, signal.SIGKILL)
        wait_for(lambda: any(line.startswith("n2 restarted") for line in lines), 30, f"n2's restart: {lines}")
        assert any("n2 (pid" in line and "killed by SIGKILL" in line for line in lines)
    finally:
        sup.stop()
        thread.join(10)
        for p in crasher.procs + steady.procs:
            p.kill()
            p.wait()


def test_no_restart_starts_after_stop() -> None:
    crasher = Script("import sys; sys.exit(1)")
    crasher.start()
    sup, lines, thread = supervise([crasher.child("n1", RestartPolicy(backoff_s=0.3))])
    wait_for(lambda: any("restarting it in 0.3 s" in line for line in lines), 30, "the restart to be scheduled")
    sup.stop()
    thread.join(10)
    sup.join(10)  # the pending restart's thread has ended...
    assert len(crasher.procs) == 1  # ...without starting anything
    crasher.procs[-1].wait()


def test_a_child_that_fails_to_start_is_retried_then_given_up_on() -> None:
    crasher = Script("import sys; sys.exit(2)")
    crasher.start()
    starts: list[int] = []

    def broken_start() -> None:
        starts.append(1)
        raise RuntimeError("broker not ready after 90s\n(long diagnostics)")

    child = crasher.child("kafka", RestartPolicy(backoff_s=0.01, backoff_max_s=0.02, max_restarts=3, window_s=60))
    child.start = broken_start
    sup, lines, thread = supervise([child])
    try:
        wait_for(lambda: child.state == "down", 30, f"kafka to be given up on: {lines}")
    finally:
        sup.stop()
        thread.join(10)
        sup.join(10)
    assert len(starts) == 3  # restarts 1..3; the fourth decision is the crash loop
    assert sum("kafka failed to start (broker not ready after 90s); trying again" in line for line in lines) == 2
    assert "giving up" in lines[-1] and "(long diagnostics)" not in "".join(lines)
