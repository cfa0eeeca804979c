"""The broker's jars: kafka/jars.lock, fetched over HTTP(S) and verified by sha256.

The fetching tests serve small made-up jars from a local HTTP server laid out as a
Maven repository, into a temporary home folder: no network, no Maven. The last tests
check the real lock file against kafka/pom.xml and the real libs folder.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from stickystate import kafka_jars
from stickystate.kafka_jars import (
    JarFetchError,
    LockedJar,
    LockFileError,
    ensure_jars,
    format_lock,
    jars_in_repository_layout,
    parse_lock,
)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Repository:
    """A folder in Maven repository layout, served over HTTP; records the paths asked for."""

    folder: Path
    url: str = ""
    requested: list[str] = field(default_factory=list)

    def publish(self, group: str, artifact: str, version: str, content: bytes, classifier: str = "") -> LockedJar:
        jar = LockedJar(group, artifact, version, hashlib.sha256(content).hexdigest(), classifier)
        path = self.folder.joinpath(*group.split("."), artifact, version, jar.file_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return jar


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[Repository]:
    repo = Repository(tmp_path / "maven")
    repo.folder.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            repo.requested.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(repo.folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    repo.url = f"http://127.0.0.1:{server.server_address[1]}/maven2"
    repo.folder = repo.folder / "maven2"
    repo.folder.mkdir()
    try:
        yield repo
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_lock(path: Path, jars: list[LockedJar]) -> Path:
    path.write_text(format_lock(jars, "test lock"))
    return path


def jar_names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.jar")}


def three_jars(repository: Repository) -> list[LockedJar]:
    return [
        repository.publish("org.example", "alpha", "1.0", b"alpha 1.0"),
        repository.publish("org.example.deep", "beta_2.13", "2.1.3", b"beta"),
        repository.publish("org.other", "gamma", "0.9", b"gamma linux", classifier="linux-x86_64"),
    ]


def test_fetches_verifies_and_marks(tmp_path: Path, repository: Repository) -> None:
    jars = three_jars(repository)
    lock = write_lock(tmp_path / "jars.lock", jars)
    home = tmp_path / "home"

    libs = ensure_jars(home, lock, repository=repository.url)

    assert libs == home / "libs"
    assert jar_names(libs) == {"alpha-1.0.jar", "beta_2.13-2.1.3.jar", "gamma-0.9-linux-x86_64.jar"}
    assert (libs / "gamma-0.9-linux-x86_64.jar").read_bytes() == b"gamma linux"
    assert (libs / kafka_jars.MARKER_NAME).read_text().strip() == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert sorted(repository.requested) == sorted([
        "/maven2/org/example/alpha/1.0/alpha-1.0.jar",
        "/maven2/org/example/deep/beta_2.13/2.1.3/beta_2.13-2.1.3.jar",
        "/maven2/org/other/gamma/0.9/gamma-0.9-linux-x86_64.jar",
    ])
    assert [p.name for p in home.iterdir() if p.name.startswith("libs")] == ["libs"]

    repository.requested.clear()
    assert ensure_jars(home, lock, repository=repository.url) == libs
    assert repository.requested == []  # up to date: marker matches the lock, nothing fetched


def test_wrong_sha256_names_the_jar_and_installs_nothing(tmp_path: Path, repository: Repository) -> None:
    jars = three_jars(repository)
    jars[1] = replace(jars[1], sha256="0" * 64)
    lock = write_lock(tmp_path / "jars.lock", jars)
    home = tmp_path / "home"

    with pytest.raises(JarFetchError) as exc:
        ensure_jars(home, lock, repository=repository.url)

    message = str(exc.value)
    assert "org.example.deep:beta_2.13:2.1.3" in message and "beta_2.13-2.1.3.jar" in message
    assert "sha256 mismatch" in message and "0" * 64 in message
    assert not (home / "libs").exists()
    assert list(home.rglob("*.jar")) == []
    assert list(home.rglob(kafka_jars.MARKER_NAME)) == []
    assert [p.name for p in home.iterdir()] == [".fetch.lock"]


def test_missing_jar_names_it_and_installs_nothing(tmp_path: Path, repository: Repository) -> None:
    jars = three_jars(repository)
    jars.append(LockedJar("org.example", "absent", "3.0", "1" * 64))
    lock = write_lock(tmp_path / "jars.lock", jars)
    home = tmp_path / "home"

    with pytest.raises(JarFetchError, match=r"org\.example:absent:3\.0 \(absent-3\.0\.jar\): HTTP 404"):
        ensure_jars(home, lock, repository=repository.url)
    assert [p.name for p in home.iterdir()] == [".fetch.lock"]


def test_a_failed_update_keeps_the_previous_folder(tmp_path: Path, repository: Repository) -> None:
    jars = three_jars(repository)
    lock = write_lock(tmp_path / "jars.lock", jars)
    home = tmp_path / "home"
    libs = ensure_jars(home, lock, repository=repository.url)
    marker_before = (libs / kafka_jars.MARKER_NAME).read_text()

    bad = repository.publish("org.example", "alpha", "1.1", b"alpha 1.1")
    write_lock(lock, [replace(bad, sha256="f" * 64), *jars[1:]])
    with pytest.raises(JarFetchError, match="alpha-1.1.jar"):
        ensure_jars(home, lock, repository=repository.url)

    assert jar_names(libs) == {j.file_name for j in jars}
    assert (libs / kafka_jars.MARKER_NAME).read_text() == marker_before
    assert sorted(p.name for p in home.iterdir()) == [".fetch.lock", "libs"]


def test_a_new_lock_replaces_the_folder_reusing_unchanged_jars(tmp_path: Path, repository: Repository) -> None:
    alpha, beta, gamma = three_jars(repository)
    lock = write_lock(tmp_path / "jars.lock", [alpha, beta, gamma])
    home = tmp_path / "home"
    ensure_jars(home, lock, repository=repository.url)

    repository.requested.clear()
    beta2 = repository.publish("org.example.deep", "beta_2.13", "2.2.0", b"beta 2")
    delta = repository.publish("org.example", "delta", "4", b"delta")
    write_lock(lock, [alpha, beta2, gamma, delta])
    libs = ensure_jars(home, lock, repository=repository.url)

    assert jar_names(libs) == {"alpha-1.0.jar", "beta_2.13-2.2.0.jar", "gamma-0.9-linux-x86_64.jar", "delta-4.jar"}
    assert sorted(repository.requested) == sorted([
        "/maven2/org/example/delta/4/delta-4.jar",
        "/maven2/org/example/deep/beta_2.13/2.2.0/beta_2.13-2.2.0.jar",
    ])
    assert (libs / kafka_jars.MARKER_NAME).read_text().strip() == hashlib.sha256(lock.read_bytes()).hexdigest()


def test_a_tampered_jar_in_the_folder_is_not_reused(tmp_path: Path, repository: Repository) -> None:
    jars = three_jars(repository)
    lock = write_lock(tmp_path / "jars.lock", jars)
    home = tmp_path / "home"
    libs = ensure_jars(home, lock, repository=repository.url)
    (libs / "alpha-1.0.jar").write_bytes(b"tampered")
    (libs / kafka_jars.MARKER_NAME).unlink()

    repository.requested.clear()
    ensure_jars(home, lock, repository=repository.url)
    assert repository.requested == ["/maven2/org/example/alpha/1.0/alpha-1.0.jar"]
    assert (libs / "alpha-1.0.jar").read_bytes() == b"alpha 1.0"


# -- the lock file format ----------------------------------------------------------------------


def test_lock_round_trip_and_repository_layout(tmp_path: Path, repository: Repository) -> None:
    jars = three_jars(repository)
    assert sorted(jars_in_repository_layout(repository.folder), key=str) == sorted(jars, key=str)
    assert parse_lock(format_lock(jars, "a header\nsecond line")) == sorted(jars, key=lambda j: (j.group, j.artifact))
    assert jars[2].coordinate == "org.other:gamma:0.9:linux-x86_64"
    assert jars[2].url() == ("https://repo1.maven.org/maven2/org/other/gamma/0.9/gamma-0.9-linux-x86_64.jar")


@pytest.mark.parametrize(("text", "error"), [
    ("org.example:alpha:1.0\n", "jars.lock:1: expected"),
    ("# c\norg.example:alpha:1.0 " + "A" * 64 + "\n", "jars.lock:2: expected"),
    ("org.example:alpha " + "a" * 64 + "\n", "jars.lock:1: expected"),
    ("org.example:../../x:1.0 " + "a" * 64 + "\n", "jars.lock:1: expected"),
    ("org.example:alpha:1.0 " + "a" * 64 + "\norg.example:alpha:1.0 " + "b" * 64 + "\n", "locked twice"),
    ("# nothing\n", "no jars"),
])
def test_malformed_lock_files_are_refused(text: str, error: str) -> None:
    with pytest.raises(LockFileError, match=error.replace(".", r"\.")):
        parse_lock(text, "jars.lock")


# -- the real lock file ------------------------------------------------------------------------


def pom_dependencies() -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    pom = ET.parse(ROOT / "kafka" / "pom.xml").getroot()
    props = {p.tag.split("}")[1]: (p.text or "").strip() for p in pom.find("m:properties", ns) or []}

    def value(text: str) -> str:
        for key, val in props.items():
            text = text.replace("${" + key + "}", val)
        return text

    deps = [(value(d.findtext("m:groupId", "", ns)), value(d.findtext("m:artifactId", "", ns)),
             value(d.findtext("m:version", "", ns)))
            for d in pom.findall("m:dependencies/m:dependency", ns)]
    return deps, props


def test_the_lock_was_generated_from_the_current_pom() -> None:
    # Editing kafka/pom.xml without `./dev lock` would leave the broker on the old jars.
    assert kafka_jars.pom_digest_in_lock() == hashlib.sha256((ROOT / "kafka" / "pom.xml").read_bytes()).hexdigest(), \
        "kafka/pom.xml changed since kafka/jars.lock was written: run ./dev lock"


def test_the_lock_pins_the_poms_dependencies_and_one_version_of_each_artifact() -> None:
    jars = kafka_jars.read_lock()
    locked = {(j.group, j.artifact): j.version for j in jars}
    assert len(locked) == len(jars)  # no artifact twice (two versions on one classpath)
    deps, props = pom_dependencies()
    assert deps and all(locked.get((g, a)) == v for g, a, v in deps), (deps, locked)
    assert {j.version for j in jars if j.group == "org.apache.kafka"} == {props["kafka.version"]}
    assert kafka_jars.kafka_version() == props["kafka.version"]
    assert all(j.url().startswith("https://repo1.maven.org/maven2/") for j in jars)


@pytest.mark.kafka
def test_the_libs_folder_holds_exactly_the_locked_jars() -> None:
    # The broker runs with -cp 'libs/*': whatever is in the folder is on its classpath.
    libs = ensure_jars()
    jars = kafka_jars.read_lock()
    assert jar_names(libs) == {j.file_name for j in jars}
    assert {p.name: kafka_jars.sha256_of(p) for p in libs.glob("*.jar")} == {j.file_name: j.sha256 for j in jars}
    assert (libs / kafka_jars.MARKER_NAME).read_text().strip() == kafka_jars.lock_digest()


def test_the_readme_names_what_the_lock_holds() -> None:
    readme = (ROOT / "README.md").read_text()
    jars = kafka_jars.read_lock()
    assert f"the {len(jars)} jars of `org.apache.kafka:kafka_2.13` {kafka_jars.kafka_version()}" in readme
