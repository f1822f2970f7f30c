"""Greedy held-out figures along one GRPO run from bench/refine_evidence.py's SFT policy: a checkpoint every
`--every` steps, each evaluated greedily on the held-out images (mean IoU, parse rate), to see where a short run
stands (the SFT policy's greedy answers may stop parsing for a while once RL starts).

    python bench/refine_trajectory.py --work WORK --out bench/results/refine_trajectory_cpu.json \\
        [--steps 18] [--every 2] [--seed 1] [--turns 1] [--image-size 112]

WORK is a --work folder of bench/refine_evidence.py (its assets/ and sft-policy/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--turns", type=int, default=1, help="rollout.max_turns of the run and of its evaluations")
    p.add_argument("--image-size", type=int, default=112)
    args = p.parse_args(argv)
    import ray

    from cluster.config import load_config
    from cluster.dev.demo import DEMO_CONFIG, _with, evaluate_policy
    from cluster.evaluation.inputs import resolve_checkpoint
    from cluster.launch import run_training
    from cluster.pools.topology import init_ray

    work, run = Path(args.work), Path(args.work) / f"trajectory-seed{args.seed}-turns{args.turns}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(
        DEMO_CONFIG, ["metrics.trackers=[jsonl]", "metrics.port=0", f"data.image_size={args.image_size}"]
    )
    held_out = work / "assets" / "data" / "eval"
    cfg = _with(cfg, {"model.policy": str(work / "sft-policy"), "data.train": str(work / "assets" / "data" / "train"),
                      "data.eval": str(held_out), "rollout.max_turns": args.turns, "grpo.steps": args.steps,
                      "seed": args.seed, "metrics.run_dir": str(run), "checkpoint.dir": str(run / "checkpoints"),
                      "checkpoint.every": args.every, "checkpoint.keep": 1000, "eval.every": 0})  # fmt: skip
    init_ray(cfg)
    run_training(cfg, progress_bar=False)
    ray.shutdown()
    steps = {}
    for folder in sorted((run / "checkpoints").glob("step-*")):
        policy = resolve_checkpoint(folder).policy
        s = evaluate_policy(cfg, policy, held_out, Path(os.devnull), baselines=False, desc=folder.name)
        steps[int(folder.name.removeprefix("step-"))] = {
            "mean_iou": s["mean_iou"],
            "parse_rate": s["parse_rate"],
        }
        print(folder.name, steps[int(folder.name.removeprefix("step-"))], flush=True)
    command = " ".join(["python bench/refine_trajectory.py", *(argv or sys.argv[1:])])
    Path(args.out).write_text(json.dumps({"command": command, "steps": steps}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
