"""The README's Python examples ("Use it from Python", "Use it with LangGraph") run
against a real cluster shaped as `stickystate up` starts it: the router with
`--auth open`, the nodes with an internal secret (so the examples' direct calls to the
nodes need no key, in the open cluster's one namespace)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stickystate.local_cluster import LocalCluster

pytestmark = pytest.mark.kafka

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = ("Use it from Python", "Use it with LangGraph")


@pytest.fixture(scope="module")
def cluster_options() -> dict[str, Any]:
    return {"auth": "open", "internal_secret": "readme-secret-0123456789"}


def examples(section: str) -> list[tuple[int, str]]:
    """(line, code) of each ```python block of a README section."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end]
    first_line = text[:start].count("\n") + 1
    return [(first_line + body[:m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", body, re.S)]


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_examples_run_against_a_real_cluster(section: str, cluster: LocalCluster, tmp_path: Path) -> None:
    """Each example as a script of its own, as a reader would run it."""
    blocks = examples(section)
    assert len(blocks) >= 2, f"no examples found in README section {section!r}"
    for line, code in blocks:
        assert "http://127.0.0.1:8100" in code, line  # the URL `./dev up` prints, replaced here
        script = tmp_path / f"readme_line_{line}.py"
        script.write_text(code.replace("http://127.0.0.1:8100", cluster.router_url))
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        print(f"README.md:{line}:", run.stdout.strip())
        assert run.returncode == 0, f"README.md:{line}:\n{run.stdout}\n{run.stderr}"
