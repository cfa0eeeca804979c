"""The watch fan-out benchmark runs (short mode) against the real broker, and every change
acknowledged while the watchers are open reaches every watcher of its session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stickystate.bench import fanout

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
