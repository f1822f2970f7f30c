"""Runs the parts of the GPU check one after the other, each in its own process under a time limit, and writes
one JSON (rewritten after every part, so a run cut short still leaves what it measured).

Imports nothing heavy itself (no torch, so no CUDA context in this process): the parts measure.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.gpu.common import HIDDEN_PACKAGES, REPO

SCHEMA = "segr1.gpu_check/1"
MIN_START_S = 20.0  # a part is not started with less time than this left in the budget


@dataclass(frozen=True)
class PartSpec:
    name: str
    what: str
    limit_s: float  # its own limit on CUDA (full shapes); --tiny parts get limit_tiny_s
    needs: tuple[str, ...] = ()
    limit_tiny_s: float = 300.0


# In priority order: when the budget runs out, the last ones are skipped. Limits are sized for one H200 (a few
# seconds of imports and CUDA start per part included); their sum exceeds the default 480 s budget on purpose, the
# budget caps each part at what is left.
PARTS: tuple[PartSpec, ...] = (
    PartSpec("environment", "versions, GPU name and memory", 60),
    PartSpec("policy", "Qwen2.5-VL-3B-shaped policy folder, random bf16 weights", 120),
    PartSpec("reward_hf_sam2", "reward masks/s, transformers Sam2Model, grouped vs naive", 120),
    PartSpec("learner_step", "GRPO learner step: seconds, peak memory", 180, needs=("policy",)),
    PartSpec(
        "rollout_hf", "transformers engine tokens/s, 8 prompts x G=8 with images", 120, needs=("policy",)
    ),
    PartSpec("ipc_publish", "CUDA-IPC weight publish GB/s vs a device copy", 90),
    PartSpec("reward_meta_sam2", "reward masks/s, Meta's sam2, grouped vs naive", 120),
    PartSpec("pytest_gpu", "pytest -m gpu", 180),
    PartSpec(
        "vllm_sync", "vLLM engine: dummy start, reload per transport, vs transformers", 240, ("policy",)
    ),
    PartSpec("weight_sync_delta", "weight_sync.delta vs full, learner on the GPU, TCP and /dev/shm", 150),
)


def mode_name(device: str, tiny: bool) -> str:
    return f"{device}-tiny" if tiny else device


def result_path(out_dir: Path, device: str, tiny: bool) -> Path:
    return Path(out_dir) / f"gpu_check-{mode_name(device, tiny)}.json"


def run_all(
    out_dir: Path,
    device: str,
    tiny: bool,
    budget_s: float,
    only: tuple[str, ...] = (),
    keep_workdir: bool = False,
) -> dict:
    """Run the parts (all, or `only` and the parts they need), write out_dir/gpu_check-<mode>.json and
    out_dir/gpu_check.log."""
    only = with_needs(only)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "gpu_check.log"
    log.write_text("")
    report = _new_report(device, tiny, budget_s)
    path = result_path(out_dir, device, tiny)
    workdir = Path(tempfile.mkdtemp(prefix="segr1-gpu-check-"))
    t0 = time.perf_counter()
    try:
        for spec in PARTS:
            if only and spec.name not in only:
                continue
            left = budget_s - (time.perf_counter() - t0)
            report["parts"][spec.name] = _one(spec, report["parts"], device, tiny, workdir, left, log)
            if spec.name == "environment":  # its detail is the run's host description
                report["host"] = report["parts"][spec.name].pop("detail", {})
            _print_line(spec, report["parts"][spec.name])
            _finish(report, t0, complete=False)
            path.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    _finish(report, t0, complete=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def with_needs(only: tuple[str, ...]) -> tuple[str, ...]:
    """`only` plus the parts they need (empty: every part)."""
    names = set(only)
    for spec in reversed(PARTS):
        if spec.name in names:
            names |= set(spec.needs)
    return tuple(spec.name for spec in PARTS if spec.name in names)


def _new_report(device: str, tiny: bool, budget_s: float) -> dict:
    return {
        "schema": SCHEMA,
        "mode": mode_name(device, tiny),
        "device": device,
        "tiny": tiny,
        "started_utc": _now(),
        "budget_s": budget_s,
        "hidden_packages": list(HIDDEN_PACKAGES),
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "git_commit": _git_commit(),
        "host": {},
        "parts": {},
    }


def _git_commit() -> str | None:
    """HEAD of the checkout, or None where the copy has no .git (a working tree shipped to a GPU machine)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _finish(report: dict, t0: float, complete: bool) -> None:
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["finished_utc"] = _now()
    report["complete"] = complete
    report["summary"] = {name: part["status"] for name, part in report["parts"].items()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one(spec: PartSpec, done: dict, device: str, tiny: bool, workdir: Path, left: float, log: Path) -> dict:
    """One part's result: run in a subprocess, or skipped / failed without running."""
    missing = [n for n in spec.needs if done.get(n, {}).get("status") != "ok"]
    if missing:
        why = ", ".join(f"{n} ({done[n]['status'] if n in done else 'not run'})" for n in missing)
        return {"status": "failed", "reason": f"needs part(s) {why}", "figures": {}, "seconds": 0.0}
    if left < MIN_START_S:
        return {
            "status": "skipped",
            "reason": f"the {left:.0f} s left of the budget is too little",
            "figures": {},
        }
    limit = min(spec.limit_tiny_s if tiny else spec.limit_s, left)
    return _subprocess(spec.name, device, tiny, workdir, limit, log)


def _subprocess(name: str, device: str, tiny: bool, workdir: Path, limit: float, log: Path) -> dict:
    result_file = workdir / f"{name}.result.json"
    cmd = [sys.executable, "-m", "bench.gpu.part", name, "--device", device, "--workdir", str(workdir)]
    cmd += ["--limit-s", f"{limit:.0f}", "--result", str(result_file)] + (["--tiny"] if tiny else [])
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n===== {name} (limit {limit:.0f} s) {_now()}\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=_child_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and every process it started (its own session)
            proc.wait()
            rc = None
    seconds = round(time.perf_counter() - t0, 2)
    if rc is None:
        out = {"status": "timeout", "reason": f"still running after its {limit:.0f} s limit", "figures": {}}
    elif result_file.is_file():
        out = json.loads(result_file.read_text())
    else:
        out = {
            "status": "failed",
            "reason": f"the part's process exited {rc} without a result",
            "figures": {},
        }
    if out["status"] in ("failed", "timeout"):
        out["log_tail"] = log.read_text()[-4000:]
    out["seconds"] = seconds
    return out


def _child_env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_WAIT_POLICY="PASSIVE",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    return env


def _print_line(spec: PartSpec, part: dict) -> None:
    figures = ", ".join(f"{k} {v}" for k, v in part.get("figures", {}).items())
    why = f" ({part['reason'][:160]})" if part.get("reason") else ""
    plan = part.get("detail", {}).get("plan")  # learner_step: `segr1 plan`'s prediction, beside the figure
    beside = f"; segr1 plan: {plan[:300]}" if plan else ""
    line = f"{spec.name:<17} {part['status']:<8} {part.get('seconds', 0.0):>6.1f} s  {figures}{beside}{why}"
    print(line, flush=True)
