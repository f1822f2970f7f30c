"""The GPU check's bookkeeping (bench/gpu/): dependencies and the time budget decide what runs, pytest's JUnit
report is counted right, the gpu-test modules are all found, a part's failure or bad figure is recorded, not
raised. The whole check in its CPU mode: tests/integration/test_gpu_check_cpu.py."""

from __future__ import annotations

from pathlib import Path

from bench.gpu import part, runner
from bench.gpu.common import Context
from bench.gpu.pytest_gpu import gpu_test_files, parse_junit

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
  <testcase classname="tests.gpu.test_a" name="test_ok" time="0.1"/>
  <testcase classname="tests.gpu.test_a" name="test_bad" time="0.1"><failure message="assert 1 == 2">x</failure></testcase>
  <testcase classname="tests.gpu.test_b" name="test_err" time="0.1"><error message="CUDA error">y</error></testcase>
  <testcase classname="tests.gpu.test_b" name="test_skip" time="0.0"><skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>
"""


def test_junit_counts_and_problems(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    counts, problems = parse_junit(path)
    assert counts == {"tests": 4, "failed": 1, "errors": 1, "skipped": 1, "passed": 1}
    assert problems == ["tests.gpu.test_a::test_bad: assert 1 == 2", "tests.gpu.test_b::test_err: CUDA error"]


def test_every_module_with_a_gpu_test_is_run():
    files = gpu_test_files()
    assert {"tests/gpu/test_learner_gpu.py", "tests/gpu/test_hf_engine_gpu.py"} <= set(files)
    assert "tests/unit/reward_service/test_segmenters.py" in files  # a gpu test outside tests/gpu
    assert "tests/unit/reward_service/test_parser.py" not in files


def test_a_part_whose_dependency_failed_is_not_started(tmp_path):
    spec = runner.PartSpec("learner_step", "x", 100, needs=("policy",))
    done = {"policy": {"status": "timeout"}}
    out = runner._one(spec, done, "cpu", True, tmp_path, 1000.0, tmp_path / "log")
    assert out["status"] == "failed" and "policy (timeout)" in out["reason"]
    assert not (tmp_path / "log").exists()  # nothing ran


def test_a_part_is_not_started_when_the_budget_is_spent(tmp_path):
    spec = runner.PartSpec("environment", "x", 100)
    out = runner._one(spec, {}, "cuda", False, tmp_path, runner.MIN_START_S - 1, tmp_path / "log")
    assert out["status"] == "skipped" and "budget" in out["reason"]


def test_a_chosen_part_brings_the_parts_it_needs():
    assert runner.with_needs(("learner_step",)) == ("policy", "learner_step")
    assert runner.with_needs(("pytest_gpu", "environment")) == ("environment", "pytest_gpu")
    assert runner.with_needs(()) == ()


def test_parts_are_registered_in_both_places():
    assert [s.name for s in runner.PARTS] == list(part.PARTS)
    assert runner.PARTS[0].name == "environment"  # its detail becomes the JSON's host description


def test_a_failing_part_is_recorded_with_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setitem(part.PARTS, "broken", f"{__name__}:_broken_part")
    out = part.run_part("broken", Context("cpu", True, Path(tmp_path), 60.0))
    assert out["status"] == "failed" and out["reason"] == "ValueError: no GPU in a unit test"
    assert "_broken_part" in out["traceback"]


def test_a_non_positive_figure_fails_the_part(tmp_path, monkeypatch):
    monkeypatch.setitem(part.PARTS, "zero", f"{__name__}:_zero_part")
    out = part.run_part("zero", Context("cpu", True, Path(tmp_path), 60.0))
    assert out["status"] == "failed" and "masks_per_s" in out["reason"]


def _broken_part(ctx):
    raise ValueError("no GPU in a unit test")


def _zero_part(ctx):
    return {"figures": {"masks_per_s": 0.0}}
