"""The GPU check end to end in its CPU mode (`python bench/gpu_check.py --device cpu --tiny`, what `make
gpu-check` runs without CUDA): every part runs or is skipped with its reason, the ok ones measured positive
figures, and the JSON says what ran where. About a minute on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu.runner import PARTS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_mode_runs_every_part(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check-cpu-tiny.json").read_text())
    assert report["mode"] == "cpu-tiny" and report["complete"] and "ray" in report["hidden_packages"]
    assert list(report["parts"]) == [s.name for s in PARTS]
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part.get("reason"), part.get("traceback"))
        assert part["seconds"] > 0
        if part["status"] == "ok":
            assert part["figures"] and all(v > 0 for v in part["figures"].values()), (name, part["figures"])
        else:
            assert part["reason"], name
    parts = report["parts"]
    for name in ("environment", "policy", "reward_hf_sam2", "learner_step", "rollout_hf"):
        assert parts[name]["status"] == "ok", name
    assert parts["reward_hf_sam2"]["figures"]["grouped_over_naive"] > 1.0  # one encode per image pays
    assert parts["learner_step"]["detail"]["gradient_checkpointing"]  # the 1-GPU config's settings
    assert parts["ipc_publish"]["status"] == "skipped" and "CUDA" in parts["ipc_publish"]["reason"]
    assert parts["ipc_publish"]["detail"]["gloo"]["gb_per_s"] > 0  # the two-process harness itself ran
    gpu_tests = parts["pytest_gpu"]["detail"]
    assert gpu_tests["tests"] >= 7 and gpu_tests["skipped"] == gpu_tests["tests"] and gpu_tests["failed"] == 0
    assert report["host"]["versions"]["torch"] and report["host"]["imports"]["ray"].startswith("no:")
    assert "===== pytest_gpu" in (tmp_path / "gpu_check.log").read_text()
