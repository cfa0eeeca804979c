"""The Kafka broker's jars: a pinned lock file, fetched over HTTPS and checked by sha256.

``kafka/jars.lock`` names every jar of the broker's classpath (group, artifact, version,
optional classifier) with its sha256. :func:`ensure_jars` downloads them from Maven
Central with urllib into a temporary folder, checks each digest, and renames the folder
into place only once every jar is verified: a wrong digest or a failed download is an
error naming the jar, and leaves the previous state as it was (no half-filled folder, no
marker). Neither Maven nor Java is needed for that.

``kafka/pom.xml`` is where the jar set comes from: :func:`write_lock` has Maven resolve
it once (``python -m stickystate.kafka_local --write-lock``) and writes the lock file
from what Maven copied. Only whoever changes the pom needs Maven.

Pure stdlib on purpose, like kafka_local.

Errors::

    RuntimeError
     ├── LockFileError   the lock file cannot be read or is malformed
     └── JarFetchError   a jar could not be downloaded, or its sha256 is not the locked one
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_HOME = REPO_ROOT / ".kafka"
POM = REPO_ROOT / "kafka" / "pom.xml"
LOCK_FILE = REPO_ROOT / "kafka" / "jars.lock"
MAVEN_CENTRAL = "https://repo1.maven.org/maven2"

#: In the libs folder: the sha256 of the lock file the folder was filled from.
MARKER_NAME = ".complete"

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_POM_DIGEST_LABEL = "generated from kafka/pom.xml with sha256"
_DOWNLOAD_THREADS = 6
_ATTEMPTS = 3
_TIMEOUT_S = 60


class LockFileError(RuntimeError):
    """The lock file cannot be read, or a line of it is not ``group:artifact:version[:classifier] sha256``."""


class JarFetchError(RuntimeError):
    """A locked jar could not be fetched, or what was fetched is not what the lock says."""


@dataclass(frozen=True)
class LockedJar:
    group: str
    artifact: str
    version: str
    sha256: str
    classifier: str = ""

    @property
    def coordinate(self) -> str:
        tail = f":{self.classifier}" if self.classifier else ""
        return f"{self.group}:{self.artifact}:{self.version}{tail}"

    @property
    def file_name(self) -> str:
        """The jar's name in the libs folder (Maven's copy-dependencies name, and Central's)."""
        tail = f"-{self.classifier}" if self.classifier else ""
        return f"{self.artifact}-{self.version}{tail}.jar"

    def url(self, repository: str = MAVEN_CENTRAL) -> str:
        path = "/".join([*self.group.split("."), self.artifact, self.version, self.file_name])
        return f"{repository.rstrip('/')}/{path}"


# ------------------------------------------------------------------------------ lock file


def parse_lock(text: str, source: str = "jars.lock") -> list[LockedJar]:
    """The entries of a lock file's text (``#`` comments and blank lines ignored)."""
    jars: list[LockedJar] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        parts = fields[0].split(":")
        if (len(fields) != 2 or len(parts) not in (3, 4) or not all(_PART.fullmatch(p) for p in parts)
                or not _SHA256.fullmatch(fields[1])):
            raise LockFileError(
                f"{source}:{number}: expected 'group:artifact:version[:classifier] sha256', got {raw!r}"
            )
        jar = LockedJar(parts[0], parts[1], parts[2], fields[1], parts[3] if len(parts) == 4 else "")
        if jar.file_name in names:
            raise LockFileError(f"{source}:{number}: {jar.file_name} is locked twice")
        names.add(jar.file_name)
        jars.append(jar)
    if not jars:
        raise LockFileError(f"{source}: no jars")
    return jars


def read_lock(lock: Path = LOCK_FILE) -> list[LockedJar]:
    try:
        text = lock.read_text()
    except OSError as exc:
        raise LockFileError(f"cannot read the jar lock file {lock}: {exc}") from exc
    return parse_lock(text, str(lock))


def format_lock(jars: list[LockedJar], header: str = "") -> str:
    lines = [f"# {h}".rstrip() for h in header.splitlines()]
    lines.append("# group:artifact:version[:classifier]  sha256")
    width = max(len(j.coordinate) for j in jars)
    for jar in sorted(jars, key=lambda j: (j.group, j.artifact, j.classifier)):
        lines.append(f"{jar.coordinate:<{width}}  {jar.sha256}")
    return "\n".join(lines) + "\n"


def pom_digest_in_lock(lock: Path = LOCK_FILE) -> str | None:
    """The sha256 of the pom the lock file was generated from (a header line), if it says."""
    m = re.search(rf"^# {_POM_DIGEST_LABEL} ([0-9a-f]{{64}})$", lock.read_text(), re.MULTILINE)
    return m.group(1) if m else None


def lock_digest(lock: Path = LOCK_FILE) -> str:
    return hashlib.sha256(lock.read_bytes()).hexdigest()


def kafka_version(lock: Path = LOCK_FILE, default: str = "unknown") -> str:
    """The version of ``org.apache.kafka:kafka_2.13`` in the lock file."""
    try:
        jars = read_lock(lock)
    except LockFileError:
        return default
    return next((j.version for j in jars if (j.group, j.artifact) == ("org.apache.kafka", "kafka_2.13")),
                default)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ fetching


def libs_dir(home: Path = KAFKA_HOME) -> Path:
    return home / "libs"


def is_up_to_date(home: Path = KAFKA_HOME, lock: Path = LOCK_FILE) -> bool:
    """The libs folder was filled from this very lock file and still holds all its jars."""
    libs = libs_dir(home)
    try:
        if (libs / MARKER_NAME).read_text().strip() != lock_digest(lock):
            return False
        return all((libs / jar.file_name).is_file() for jar in read_lock(lock))
    except (OSError, LockFileError):
        return False


def ensure_jars(home: Path = KAFKA_HOME, lock: Path = LOCK_FILE, *, repository: str = MAVEN_CENTRAL,
                quiet: bool = True) -> Path:
    """Make sure ``home/libs`` holds exactly the jars of ``lock``, verified; returns that folder.

    Does nothing when the folder's marker holds the lock file's sha256 (and the jars are
    there). Otherwise fetches every jar from ``repository`` (jars of the old folder whose
    digest matches are reused, not downloaded again), verifies it, and renames the new
    folder into place. A file lock in ``home`` serialises concurrent callers.
    """
    libs = libs_dir(home)
    if is_up_to_date(home, lock):
        return libs
    jars = read_lock(lock)
    digest = lock_digest(lock)
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / ".fetch.lock"):
        if is_up_to_date(home, lock):  # another process fetched while we waited
            return libs
        for stale in [*home.glob("libs.tmp-*"), *home.glob("libs.old-*")]:  # from a killed fetch
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix="libs.tmp-", dir=home))
        old = home / f"libs.old-{os.getpid()}"
        try:
            fetched = _fill(tmp, jars, libs, repository, quiet)
            (tmp / MARKER_NAME).write_text(digest + "\n")
            if libs.exists():
                libs.rename(old)
            tmp.rename(libs)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        if not quiet:
            print(f"kafka_local: {len(jars)} jars verified in {libs} ({fetched} downloaded from "
                  f"{repository} in {time.monotonic() - started:.1f}s)", file=sys.stderr, flush=True)
    return libs


def _fill(tmp: Path, jars: list[LockedJar], previous: Path, repository: str, quiet: bool) -> int:
    """Put every jar into ``tmp``, verified; returns how many were downloaded."""
    missing: list[LockedJar] = []
    for jar in jars:
        old = previous / jar.file_name
        if not (old.is_file() and sha256_of(old) == jar.sha256):
            missing.append(jar)
            continue
        try:
            os.link(old, tmp / jar.file_name)
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(old, tmp / jar.file_name)
    if not missing:
        return 0
    if not quiet:
        size = "" if len(missing) == len(jars) else f" ({len(jars) - len(missing)} reused)"
        print(f"kafka_local: fetching {len(missing)} Kafka jars from {repository}{size} ...",
              file=sys.stderr, flush=True)
    with concurrent.futures.ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
        futures = [pool.submit(_download, jar, tmp, repository) for jar in missing]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return len(missing)


def _download(jar: LockedJar, folder: Path, repository: str) -> None:
    url = jar.url(repository)
    target = folder / jar.file_name
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            digest = hashlib.sha256()
            with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as answer, open(target, "wb") as out:
                for chunk in iter(lambda: answer.read(1 << 16), b""):
                    digest.update(chunk)
                    out.write(chunk)
            break
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == _ATTEMPTS:
                raise JarFetchError(f"{jar.coordinate} ({jar.file_name}): HTTP {exc.code} from {url}") from exc
        except (OSError, http.client.HTTPException) as exc:  # network trouble: worth another try
            if attempt == _ATTEMPTS:
                raise JarFetchError(f"{jar.coordinate} ({jar.file_name}): {exc} ({url})") from exc
        time.sleep(attempt)  # back off before retrying a flaky network, not a synchronisation
    got = digest.hexdigest()
    if got != jar.sha256:
        target.unlink(missing_ok=True)
        raise JarFetchError(
            f"{jar.coordinate} ({jar.file_name}): sha256 mismatch: {url} has {got}, the lock says {jar.sha256}"
        )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ regenerating


def jars_in_repository_layout(folder: Path) -> list[LockedJar]:
    """Lock entries for the jars under ``folder``, laid out as a Maven repository
    (``group/as/dirs/artifact/version/artifact-version[-classifier].jar``)."""
    jars: list[LockedJar] = []
    for path in sorted(folder.rglob("*.jar")):
        parts = path.relative_to(folder).parts
        if len(parts) < 4:
            raise LockFileError(f"{path}: not in a group/artifact/version folder")
        *group, artifact, version, name = parts
        stem = f"{artifact}-{version}"
        if not (name.startswith(stem) and name.endswith(".jar")):
            raise LockFileError(f"{path}: name does not match {stem}[-classifier].jar")
        classifier = name[len(stem):-len(".jar")].lstrip("-")
        jars.append(LockedJar(".".join(group), artifact, version, sha256_of(path), classifier))
    if not jars:
        raise LockFileError(f"no jars under {folder}")
    return jars


def write_lock(pom: Path = POM, lock: Path = LOCK_FILE, mvn: str | None = None) -> list[LockedJar]:
    """Have Maven resolve ``pom``'s runtime classpath and write ``lock`` from it.

    The one step that needs Maven (and a Java for it): run it after changing kafka/pom.xml.
    """
    mvn = mvn or os.environ.get("MVN") or shutil.which("mvn")
    if not mvn:
        raise RuntimeError("writing the lock file needs Maven ('mvn' on PATH, or MVN=/path/to/mvn)")
    with tempfile.TemporaryDirectory(prefix="stickystate-lock-") as tmp:
        cmd = [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(pom), "dependency:copy-dependencies",
               f"-DoutputDirectory={tmp}", "-Dmdep.useRepositoryLayout=true"]
        run = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"Maven failed (exit {run.returncode}): {' '.join(cmd)}\n{run.stdout}{run.stderr}")
        jars = jars_in_repository_layout(Path(tmp))
    version = next((j.version for j in jars if j.artifact == "kafka_2.13"), "?")
    header = (
        f"Apache Kafka {version}: the local broker's whole classpath (kafka/pom.xml, resolved by Maven).\n"
        "stickystate/kafka_jars.py downloads each jar from Maven Central and checks its sha256.\n"
        "Generated by `python -m stickystate.kafka_local --write-lock` (needs Maven): do not edit.\n"
        f"{_POM_DIGEST_LABEL} {hashlib.sha256(pom.read_bytes()).hexdigest()}"
    )
    lock.write_text(format_lock(jars, header))
    return jars
