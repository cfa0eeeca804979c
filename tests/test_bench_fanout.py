"""The watch fan-out benchmark runs (short mode) against the real broker, and every change
acknowledged while the watchers are open reaches every watcher of its session: with a
cluster of its own, and against a running one (``--router``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stickystate.bench import fanout
from stickystate.client.core import API_KEY_ENV
from stickystate.local_cluster import LocalCluster

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_fanout_bench_delivers_every_change_to_every_watcher_and_reports_both_conditions(
        kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = fanout.main(["--sessions", "4", "--watchers", "12", "--rates", "40,80", "--seconds", "2",
                        "--warmup-s", "0", "--drain-s", "1", "--no-pin", "--kafka-bootstrap", kafka_bootstrap,
                        "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "fanout.json").read_text())
    assert [s["offered_per_s"] for s in report["steps"]] == [40.0, 80.0]
    for step in report["steps"]:
        for cond in ("without", "with"):
            phase = step[cond]
            assert phase["errors"] == 0 and phase["acknowledged"] == phase["sent"] > 0, (cond, phase)
            assert phase["cpu_pct"]["nodes"] > 0 and phase["cpu_pct"]["router"] > 0, phase["cpu_pct"]
        d = step["with"]["delivery"]
        # 3 watchers per session, every acknowledged append seen by each of them, once
        assert d["streams"] == 12 and d["refused"] == 0 and d["resets"] == 0, d
        assert d["deliveries"] == d["expected"] == 3 * step["with"]["acknowledged"], d
        assert d["latency_ms"]["p99"] is not None
    summary = report["summary"]
    assert summary["unsaturated_steps"] == 2 and summary["server_cpu_per_turn_ratio_median"] > 0, summary
    out = capsys.readouterr().out
    assert "| 40 |" in out and "| 80 |" in out and "rate at the SLO" in out


KEY = "fanout-key-0123456789abcdef"


@pytest.fixture(scope="module")
def cluster_options() -> dict[str, Any]:
    return {"auth": "keys", "api_keys": f"{KEY}=tf", "internal_secret": "fanout-secret-0123456789"}


def test_fanout_bench_against_a_running_cluster_with_an_api_key_watching_the_owners(
        cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--router``: the cluster runs elsewhere (here: the module's, with API keys). The
    writer and the watchers send the key from the environment, the watchers find each
    session's owner from the router's map with the tenant's namespace (a wrong owner would
    refuse the stream with a 421), and no CPU figure is claimed for processes not measured."""
    monkeypatch.setenv(API_KEY_ENV, KEY)
    code = fanout.main(["--router", cluster.router_url, "--watch-via", "owner", "--sessions", "4",
                        "--watchers", "8", "--rates", "40", "--seconds", "2", "--warmup-s", "0",
                        "--drain-s", "1", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "fanout.json").read_text())
    step = report["steps"][0]
    for cond in ("without", "with"):
        phase = step[cond]
        assert phase["errors"] == 0 and phase["acknowledged"] == phase["sent"] > 0, (cond, phase)
        assert "nodes" not in phase["cpu_pct"] and "router" not in phase["cpu_pct"], phase["cpu_pct"]
    d = step["with"]["delivery"]
    assert d["streams"] == 8 and d["refused"] == 0 and d["resets"] == 0, d
    assert d["deliveries"] == d["expected"] == 2 * step["with"]["acknowledged"], d
    assert report["summary"]["server_cpu_per_turn_ratio_median"] is None


def test_fanout_bench_without_the_api_key_is_refused(cluster: LocalCluster, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"creating session .*: 401 .*unauthorized"):
        fanout.main(["--router", cluster.router_url, "--sessions", "1", "--watchers", "1", "--rates", "10",
                     "--seconds", "1", "--warmup-s", "0", "--out", str(tmp_path)])
