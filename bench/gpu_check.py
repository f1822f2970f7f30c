"""The GPU check: every GPU path of the project and its figures, in one call of at most 8 minutes, without Ray.

    python bench/gpu_check.py --out DIR                        # CUDA if torch sees a GPU, else the CPU mode
    python bench/gpu_check.py --device cpu --tiny --out DIR    # the CPU mode: tiny shapes, CUDA-only parts skipped
    make gpu-check                                             # either, into bench/results/gpu_check/

Parts (each in its own process under a time limit; a failing part is recorded and the rest still run; see
bench/gpu/__init__.py): environment, policy (a Qwen2.5-VL-3B-shaped folder, random bf16 weights), reward_hf_sam2
and reward_meta_sam2 (masks/s grouped vs naive at SAM2.1-large shape, 1024 px, 16 images x G=8), learner_step
(seconds and peak memory of a GRPO step at the 1-GPU config's settings), rollout_hf (tokens/s, 8 prompts x G=8
with images), ipc_publish (CUDA-IPC weight publish GB/s vs a device copy), pytest_gpu (`pytest -m gpu`),
vllm_sync (the vLLM engine with dummy weights, a reload through each transport, greedy vs transformers,
tokens/s; skipped where vLLM is not installed).

Writes DIR/gpu_check-<mode>.json (mode cuda, cuda-tiny or cpu-tiny; rewritten after every part) and
DIR/gpu_check.log (every part's output). Exit status 0 when no part failed or timed out. How to run it on the
lent GPU machine, with the wheels it needs carried along: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu.runner import PARTS, result_path, run_all  # noqa: E402

DEFAULT_BUDGET_S = {"cuda": 480.0, "cpu": 1200.0}
VLLM_BUDGET_S = 480.0  # added on CUDA where vLLM is installed: its two parts start a 3B engine each


def default_budget(device: str) -> float:
    vllm = importlib.util.find_spec("vllm") is not None
    return DEFAULT_BUDGET_S[device] + (VLLM_BUDGET_S if device == "cuda" and vllm else 0.0)


def _cuda_available() -> bool:
    import subprocess

    # in a subprocess: this process must not hold a CUDA context while the parts use the GPU
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check-<mode>.json and gpu_check.log")
    p.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda if available"
    )
    p.add_argument("--tiny", action="store_true", help="tiny models and batches (implied by --device cpu)")
    p.add_argument(
        "--parts", default="", help=f"comma-separated subset of: {','.join(s.name for s in PARTS)}"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="whole run (default 480 on cuda, 960 where vLLM is installed, 1200 on cpu)",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep the scratch folder (model folders)")
    args = p.parse_args(argv)
    cuda = args.device != "cpu" and _cuda_available()
    if args.device == "cuda" and not cuda:
        print(
            "gpu_check: --device cuda, but torch sees no CUDA GPU; use --device cpu --tiny", file=sys.stderr
        )
        return 2
    device = "cuda" if cuda else "cpu"
    tiny = args.tiny or device == "cpu"  # full 3B / SAM2.1-large shapes on a CPU would take hours
    only = tuple(n for n in args.parts.split(",") if n)
    unknown = sorted(set(only) - {s.name for s in PARTS})
    if unknown:
        print(f"gpu_check: unknown part(s) {unknown}; choose from {[s.name for s in PARTS]}", file=sys.stderr)
        return 2
    budget = args.budget_s or default_budget(device)
    print(f"gpu_check: device {device}{' (tiny)' if tiny else ''}, budget {budget:.0f} s", flush=True)
    report = run_all(Path(args.out), device, tiny, budget, only, args.keep_workdir)
    print(f"gpu_check: {report['wall_s']} s -> {result_path(Path(args.out), device, tiny)}")
    bad = [name for name, status in report["summary"].items() if status in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
