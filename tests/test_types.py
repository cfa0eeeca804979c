"""The shipped code type-checks: mypy (configured in pyproject: no untyped defs) over
stickystate.node, .router, .replicator, .http and the shared modules of stickystate/
finds nothing.

mypy resolves imports from folders, not through the editable install's import hook, so
it is run over the package as it is installed: a temporary ``stickystate/`` whose
entries link to the repo's ``stickystate/`` files and to its ``node/``, ``router/``, ...
folders (pyproject's ``package-dir`` mapping).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def installed_view(into: Path) -> Path:
    """``into/stickystate`` laid out as the wheel lays it out, made of symlinks."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    top = into / "stickystate"
    top.mkdir()
    for entry in (ROOT / mapping["stickystate"]).iterdir():
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for package, folder in mapping.items():
        if package != "stickystate":
            (top / package.split(".", 1)[1]).symlink_to(ROOT / folder)
    return top


PACKAGES = ("stickystate.node", "stickystate.router", "stickystate.replicator", "stickystate.http", "stickystate.client",
            "stickystate.langgraph")


@pytest.mark.slow
def test_mypy_finds_no_type_errors_in_the_shipped_packages(tmp_path: Path) -> None:
    installed_view(tmp_path)
    args = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(tmp_path / ".mypy_cache")]
    for package in PACKAGES:
        args += ["-p", package]
    modules = {f"stickystate.{p.stem}" for p in (ROOT / "stickystate").glob("*.py") if p.stem != "__init__"}
    for module in sorted(modules):
        args += ["-m", module]
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success" in run.stdout
