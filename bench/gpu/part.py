"""Runs ONE part of the GPU check in this process and writes its result as JSON (started by bench.gpu.runner):

    python -m bench.gpu.part NAME --device cuda|cpu [--tiny] --workdir DIR --limit-s S --result FILE

Ray and vLLM are hidden before anything else is imported (the vLLM parts hide only Ray). The result: {"status": ok | skipped | failed,
"figures": {name: number}, "detail": {...}, "reason": why skipped / failed, "traceback": of a failure}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gpu.common import HIDDEN_PACKAGES, Context, Skip, hide_packages  # noqa: E402

# name -> "module:function" taking a Context and returning {"figures": ..., "detail": ...}
PARTS: dict[str, str] = {
    "environment": "bench.gpu.environment:run",
    "policy": "bench.gpu.models:build_policy_part",
    "reward_hf_sam2": "bench.gpu.reward:run_hf_sam2",
    "learner_step": "bench.gpu.learner_step:run",
    "rollout_hf": "bench.gpu.rollout:run",
    "ipc_publish": "bench.gpu.ipc:run",
    "reward_meta_sam2": "bench.gpu.reward:run_meta_sam2",
    "pytest_gpu": "bench.gpu.pytest_gpu:run",
    "vllm_sync": "bench.gpu.vllm_engines:run_sync",
    "weight_sync_delta": "bench.gpu.delta:run",
}
# The vLLM parts run vLLM where it is installed (skipped where not); every other part runs with it hidden.
HIDDEN_FOR = {"vllm_sync": ("ray",)}


def run_part(name: str, ctx: Context) -> dict:
    """The part's result dict; never raises (a failure is a result)."""
    t0 = time.perf_counter()
    try:
        module, func = PARTS[name].split(":")
        out = getattr(importlib.import_module(module), func)(ctx)
        result = {"status": "ok", "figures": out.get("figures", {}), "detail": out.get("detail", {})}
        bad = {k: v for k, v in result["figures"].items() if not (isinstance(v, int | float) and v > 0)}
        if bad:
            raise RuntimeError(f"part {name} measured non-positive figures {bad}; the measurement is broken")
    except Skip as skip:
        result = {"status": "skipped", "reason": skip.reason, "figures": {}, "detail": skip.detail}
    except Exception as err:  # recorded, so the other parts still run
        result = {
            "status": "failed",
            "reason": f"{type(err).__name__}: {err}"[:2000],
            "figures": {},
            "traceback": traceback.format_exc()[-6000:],
        }
    result["part_s"] = round(time.perf_counter() - t0, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one part of the GPU check (see bench/gpu_check.py)")
    p.add_argument("name", choices=sorted(PARTS))
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--workdir", required=True)
    p.add_argument("--limit-s", type=float, required=True)
    p.add_argument("--result", required=True, help="JSON file to write the result to")
    args = p.parse_args(argv)
    hide_packages(HIDDEN_FOR.get(args.name, HIDDEN_PACKAGES))
    ctx = Context(args.device, args.tiny, Path(args.workdir), args.limit_s)
    result = run_part(args.name, ctx)
    Path(args.result).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"[{args.name}] {result['status']} in {result['part_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
