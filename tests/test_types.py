"""The server packages type-check: mypy over node/, replicator/ and router/ finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_no_type_errors_in_the_server_packages() -> None:
    run = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "node", "replicator", "router"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success" in run.stdout
