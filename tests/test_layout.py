"""The shape of the code, checked from its imports (ast) and from the wheel.

One namespace: the distribution installs only ``stickystate``, and the code imports the
``stickystate.`` names, never a bare top-level ``node``, ``router``, ``replicator``,
``bench`` or ``chaos`` (those would clash with other distributions of the same names: pip
does not notice, and either one's uninstall deletes the other's files).

Dependencies point down (docs/ARCHITECTURE.md draws them): ``FORBIDDEN`` lists the
arrows that must not exist, and no module imports another package's ``_private`` name.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = ("node", "router", "replicator", "bench", "chaos")
SOURCE_DIRS = ("stickystate", *MAPPED, "tests")


def python_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def bare_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [f"{where}:{line}: import {module}" for line, module in imported_modules(tree)
            if module.split(".")[0] in MAPPED]


def test_no_module_imports_a_bare_top_level_package() -> None:
    files = python_files()
    assert len(files) > 50  # the walk found the code
    offenders = [hit for path in files for hit in bare_imports(path)]
    assert offenders == []


def test_the_walk_sees_a_bare_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom router.cluster import Cluster\ndef f():\n    import node.ops\n")
    assert [line.split(": ", 1)[1] for line in bare_imports(probe)] == ["import router.cluster", "import node.ops"]


# The shared layer: what node/ and router/ both use, below both of them.
SHARED = ("stickystate.protocol", "stickystate.errors", "stickystate.auth", "stickystate.logs", "stickystate.http")
# Tools and entry points, above everything they start or measure.
ABOVE = ("stickystate.bench", "stickystate.chaos", "stickystate.cli", "stickystate.local_cluster",
         "stickystate.credentials", "stickystate.supervisor",
         "stickystate.kafka_local", "stickystate.kafka_cluster", "stickystate.kafka_jars", "stickystate.java_runtime",
         "stickystate.config",
         "stickystate.client", "stickystate.langgraph")
SERVERS = ("stickystate.node", "stickystate.router", "stickystate.replicator")
# (importer, imported, why not)
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    ("stickystate.node", "stickystate.router", "node/ and router/ never import each other: what both need is shared"),
    ("stickystate.router", "stickystate.node", "node/ and router/ never import each other: what both need is shared"),
    *((s, t, "the shared layer is below the servers") for s in SHARED for t in SERVERS + ABOVE),
    *((s, t, "the servers do not depend on the tools that run them") for s in SERVERS for t in ABOVE),
    ("stickystate.replicator", "stickystate.node", "the replicator is below the node"),
    ("stickystate.replicator", "stickystate.http", "the replicator speaks Kafka, not HTTP"),
    ("stickystate.client", "stickystate.node", "the client installs without the server"),
    ("stickystate.client", "stickystate.router", "the client installs without the server"),
    ("stickystate.client", "stickystate.replicator", "the client installs without the server"),
    ("stickystate.client", "stickystate.http", "the client installs without the server (httptools, ...)"),
    ("stickystate.client", "stickystate.auth", "the client installs without the server"),
    ("stickystate.client", "stickystate.langgraph", "the LangGraph savers are above the client"),
    *(("stickystate.langgraph", t, "the savers use the client, not the server")
      for t in SERVERS + ("stickystate.http", "stickystate.auth")),
)


def module_name(path: Path) -> str:
    """The module's name as installed (pyproject's package-dir mapping)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] in MAPPED:
        parts.insert(0, "stickystate")
    return ".".join(parts)


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def package_of(module: str) -> str:
    """stickystate.node.store -> stickystate.node; stickystate.cli -> stickystate."""
    parts = module.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and module in _PACKAGES):
        return ".".join(parts[:2])
    return parts[0]


_PACKAGES = {module_name(p.parent) for p in (ROOT / "stickystate").rglob("__init__.py")} | {
    f"stickystate.{d}" for d in MAPPED}


def shipped_files() -> list[Path]:
    return [p for p in python_files() if p.relative_to(ROOT).parts[0] != "tests"]


def edges(path: Path, me: str) -> list[tuple[str, int, str, list[str]]]:
    """(importer, line, imported module, names) of every absolute stickystate import."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(me, node.lineno, a.name, []) for a in node.names if a.name.startswith("stickystate")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("stickystate"):
            found.append((me, node.lineno, node.module or "", [a.name for a in node.names]))
    return found


def forbidden_edges(modules: list[tuple[Path, str]]) -> list[str]:
    bad = []
    for path, me in modules:
        for importer, line, imported, names in edges(path, me):
            targets = [imported] + [f"{imported}.{n}" for n in names]
            for src, dst, why in FORBIDDEN:
                if within(importer, src) and any(within(t, dst) for t in targets):
                    bad.append(f"{importer}:{line} imports {imported} ({why})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and package_of(imported) != package_of(importer):
                bad.append(f"{importer}:{line} imports {private} from {imported}: private to its package")
    return bad


def test_dependencies_point_down() -> None:
    modules = [(p, module_name(p)) for p in shipped_files()]
    assert sum(len(edges(p, m)) for p, m in modules) > 100  # the walk sees the imports
    assert forbidden_edges(modules) == []


def test_the_edge_check_sees_forbidden_imports(tmp_path: Path) -> None:
    node_probe, router_probe = tmp_path / "a.py", tmp_path / "b.py"
    node_probe.write_text("from stickystate.router.forward import prepare\n"
                          "def f():\n    from stickystate.cli import main\n")
    router_probe.write_text("from stickystate.node import store\nfrom stickystate.http.wire import _REPLY_DROPPED\n")
    found = forbidden_edges([(node_probe, "stickystate.node.probe"), (router_probe, "stickystate.router.probe")])
    assert [f.split(" (")[0] for f in found] == [
        "stickystate.node.probe:1 imports stickystate.router.forward",
        "stickystate.node.probe:3 imports stickystate.cli",
        "stickystate.router.probe:1 imports stickystate.node",
        "stickystate.router.probe:2 imports ['_REPLY_DROPPED'] from stickystate.http.wire: private "
        "to its package"]


def test_package_dir_maps_every_folder_into_the_namespace() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    assert mapping == {"stickystate": "stickystate", **{f"stickystate.{d}": d for d in MAPPED}}
    # every mapped folder, and every subpackage of stickystate/ (listed packages do not
    # bring their subpackages into the wheel)
    subpackages = {module_name(p.parent) for p in (ROOT / "stickystate").rglob("__init__.py")
                   if "__pycache__" not in p.parts}
    assert sorted(setuptools["packages"]) == sorted(set(mapping) | subpackages)
    for folder in mapping.values():
        assert (ROOT / folder / "__init__.py").is_file(), folder


def test_the_wheel_holds_only_the_stickystate_package(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("stickystate", *MAPPED):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path / "dist"
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = out.glob("stickystate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    print("top-level entries of", wheel.name, ":", sorted(top))
    assert top == {"stickystate"}
    for package in MAPPED:
        assert f"stickystate/{package}/__init__.py" in names, package
    assert "stickystate/node/store.py" in names
    assert {"stickystate/http/front.py", "stickystate/client/core.py", "stickystate/langgraph/__init__.py"} <= set(names)
    assert "stickystate/bench/gcprobe/sitecustomize.py" in names
