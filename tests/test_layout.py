"""One namespace: the distribution installs only ``stickystate``, and the code imports
the ``stickystate.`` names, never a bare top-level ``node``, ``router``, ``replicator``,
``bench`` or ``chaos`` (those would clash with other distributions of the same names:
pip does not notice, and either one's uninstall deletes the other's files)."""

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


def test_package_dir_maps_every_folder_into_the_namespace() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    assert mapping == {"stickystate": "stickystate", **{f"stickystate.{d}": d for d in MAPPED}}
    assert sorted(setuptools["packages"]) == sorted(mapping)
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
    assert "stickystate/bench/gcprobe/sitecustomize.py" in names
