"""The rebuild benchmark runs (short mode) and shows what snapshots are for: with them a
rebuild replays a short tail; without them, the whole history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stickystate.bench import rebuild

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_rebuild_bench_counts_a_short_tail_with_snapshots_and_the_history_without(
        kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rebuild.json"
    code = rebuild.main(["--changes", "60", "--sessions", "8", "--partitions", "4", "--snapshot-every-events", "20",
                         "--snapshot-max-age-s", "1", "--kafka-bootstrap", kafka_bootstrap, "--out", str(out)])
    assert code == 0
    rows = {r["snapshots"]: r for r in json.loads(out.read_text())["rows"]}
    on, off = rows[True], rows[False]
    assert on["write_errors"] == off["write_errors"] == 0
    assert on["sessions_moved"] >= 1 and off["sessions_moved"] >= 1
    # without snapshots every event of the moved sessions is replayed
    assert off["events_applied"] == off["log_events_moved"] and off["snapshot_records_read"] == 0
    # with snapshots: every moved session comes from a snapshot, the tail is a few records
    assert on["snapshot_sessions_loaded"] == on["sessions_moved"]
    assert on["tail_records"] <= on["shards_moved"] * 3 < on["log_events_moved"]
    assert "| 60 | on |" in capsys.readouterr().out
