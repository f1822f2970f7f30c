"""The `pytest_gpu` part: `pytest -m gpu` over every test module that holds a gpu test (tests/gpu/ and any
tests/**/test_*.py that mentions `mark.gpu`), as a subprocess; its counts and failures from a JUnit XML report.

Only those modules are collected, so a module elsewhere that needs a package the GPU machine lacks (ray, vllm)
cannot stop the run; a gpu-test module that fails to import fails the part. Without CUDA every gpu test is
collected and skipped (tests/conftest.py), and the part is recorded as skipped.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

from bench.gpu.common import REPO, Context, Skip

MARGIN_S = 15  # the pytest run must end this much before the part's own limit


def gpu_test_files() -> list[str]:
    """Test modules holding gpu tests, relative to the repository."""
    tests = REPO / "tests"
    found = {p for p in (tests / "gpu").glob("test_*.py")}
    found |= {p for p in tests.rglob("test_*.py") if "mark.gpu" in p.read_text(encoding="utf-8")}
    return sorted(str(p.relative_to(REPO)) for p in found)


def run(ctx: Context) -> dict:
    files = gpu_test_files()
    report = ctx.workdir / "pytest-gpu.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
    ]
    timeout = max(10.0, ctx.limit_s - MARGIN_S)
    try:
        done = subprocess.run(cmd + files, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-3000:]
        raise RuntimeError(
            f"pytest -m gpu did not finish in {timeout:.0f} s; output ends: {tail!r}"
        ) from None
    print(done.stdout[-20000:], done.stderr[-5000:], sep="\n", flush=True)  # into the check's log
    counts, problems = parse_junit(report) if report.is_file() else ({}, [])
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    detail = {
        "files": files,
        "exit_code": done.returncode,
        "summary": summary,
        **counts,
        "problems": problems,
    }
    if done.returncode != 0 or not counts.get("tests"):
        raise RuntimeError(f"pytest -m gpu exited {done.returncode}: {summary}; problems: {problems[:5]}")
    if counts["skipped"] == counts["tests"]:
        raise Skip(f"no CUDA here: the {counts['tests']} gpu tests were collected and skipped", detail)
    return {"figures": {"gpu_tests": counts["tests"], "passed": counts["passed"]}, "detail": detail}


def parse_junit(path) -> tuple[dict, list[str]]:
    """({tests, passed, failed, errors, skipped}, ["test id: message", ...] of the failures and errors)."""
    root = ET.parse(path).getroot()
    counts = dict.fromkeys(("tests", "failed", "errors", "skipped"), 0)
    problems = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        for kind, key in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(kind)
            if found is None:
                continue
            counts[key] += 1
            if kind != "skipped":
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                problems.append(f"{name}: {(found.get('message') or '')[:300]}")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return counts, problems
