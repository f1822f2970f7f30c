"""The project's size rules (docs/CONTRIBUTING.md): every file under 500 lines, every function at most 60 lines.

No exceptions are listed: a file or function over the limit is split, not excused.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.paths import REPO

FOLDERS = ("protos", "runtime", "actors", "reward_service", "learner", "cluster", "bench", "tests")
MAX_FILE_LINES = 499
MAX_FUNCTION_LINES = 60


def _python_files() -> list[Path]:
    files = [p for folder in FOLDERS for p in sorted((REPO / folder).rglob("*.py"))]
    return [p for p in files if "__pycache__" not in p.parts]


def long_files(paths: list[Path], root: Path = REPO) -> dict[str, int]:
    lengths = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in paths}
    return {name: n for name, n in lengths.items() if n > MAX_FILE_LINES}


def long_functions(paths: list[Path], root: Path = REPO) -> dict[str, int]:
    """`file:line name` -> lines from `def` to the last line of the body (decorators not counted)."""
    out = {}
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out[f"{p.relative_to(root)}:{node.lineno} {node.name}"] = n
    return out


def test_the_rules_see_every_package():
    seen = {p.relative_to(REPO).parts[0] for p in _python_files()}
    assert seen == set(FOLDERS)


def test_every_file_is_under_500_lines():
    assert long_files(_python_files()) == {}, "split these files by concern"


def test_every_function_is_at_most_60_lines():
    assert long_functions(_python_files()) == {}, "split these functions"


def test_the_checks_catch_a_long_file_and_a_long_function(tmp_path: Path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    long_fn = tmp_path / "long_fn.py"
    long_fn.write_text(f"def f():\n{body}\n")
    filler = tmp_path / "filler.py"
    filler.write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    assert long_functions([long_fn], tmp_path) == {"long_fn.py:1 f": MAX_FUNCTION_LINES + 1}
    assert long_files([long_fn, filler], tmp_path) == {"filler.py": MAX_FILE_LINES + 1}
