"""The import layers (pyproject.toml [tool.importlinter], docs/architecture.md) hold, and a violation is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

PACKAGES = ("protos", "runtime", "actors", "reward_service", "learner", "cluster")
LAYERS = "Layers: cluster > actors | reward_service | learner > runtime > protos"
INDEPENDENT = "The three workers never import each other"
PROTOS_PURE = "protos imports no third-party package but pydantic and pyarrow"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports is missing: install the dev extra (pip install -e '.[dev]')"
    # cwd goes first on lint-imports' sys.path, so the packages under cwd shadow the installed ones.
    return subprocess.run(
        [exe, "--no-cache", "--no-logo", str(cwd / "pyproject.toml")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The six packages and pyproject.toml copied into tmp_path, to break on purpose."""
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append_import(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}  # deliberate violation\n")


def test_the_repository_keeps_every_contract():
    out = _lint_imports(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in (LAYERS, INDEPENDENT, PROTOS_PURE):
        assert f"{name} KEPT" in out.stdout


def test_a_worker_importing_cluster_breaks_the_layers(tree_copy: Path):
    _append_import(tree_copy / "actors" / "worker.py", "import cluster.config")
    out = _lint_imports(tree_copy)
    assert out.returncode != 0
    assert f"{LAYERS} BROKEN" in out.stdout
    assert "actors.worker -> cluster.config" in out.stdout


def test_a_worker_importing_another_worker_breaks_independence(tree_copy: Path):
    _append_import(tree_copy / "actors" / "worker.py", "import learner")
    out = _lint_imports(tree_copy)
    assert out.returncode != 0
    assert f"{INDEPENDENT} BROKEN" in out.stdout
    assert f"{LAYERS} BROKEN" in out.stdout  # the middle layer's siblings are independent too


def test_protos_importing_numpy_breaks_purity(tree_copy: Path):
    _append_import(tree_copy / "protos" / "messages.py", "import numpy")
    out = _lint_imports(tree_copy)
    assert out.returncode != 0
    assert f"{PROTOS_PURE} BROKEN" in out.stdout
    assert f"{LAYERS} KEPT" in out.stdout
