"""Does looking again help? GRPO with episodes of two turns (rollout.max_turns=2) against one turn, from the same
SFT policy, on synthetic data where one look is hard (default `--kind salient`: the target among 2-4 saturated
distractors).

    python bench/refine_evidence.py --out bench/results/refine_evidence_cpu.json [--steps 16] [--seeds 0,1,2]

Run again with the same --out and --work, it keeps the seeds already measured and adds the others.

One SFT policy (the demo's tiny policy, `segr1 sft --turns 2`: it knows the answer and the refine format), then
for each RL seed three runs of the demo config (local Ray, vLLM rollout, GrabCut reward):
- `one_turn`:          rollout.max_turns=1, --steps GRPO steps;
- `two_turns`:         rollout.max_turns=2, --steps GRPO steps;
- `one_turn_tokens`:   rollout.max_turns=1 with as many steps as make its generated tokens those of `two_turns`
                       (the two-turn episodes generate more tokens per step).
Every final policy, and the SFT policy, is evaluated greedily on the same held-out images with one turn and with
two (cluster/evaluation: the mean IoU of the first turn's mask and of the last). The figures are what they are:
the JSON keeps every run; the summary is the mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = ("one_turn", "two_turns", "one_turn_tokens")


def _eval(cfg, policy: Path, held_out: Path, turns: int) -> dict:
    """Greedy held-out figures of `policy` answering in `turns` turns (turn-1 and last-turn mean IoU)."""
    from cluster.dev.demo import _with, evaluate_policy

    ecfg = _with(cfg, {"rollout.max_turns": turns})
    s = evaluate_policy(
        ecfg, policy, held_out, Path(os.devnull), baselines=False, desc=f"eval {turns} turn(s)"
    )
    r = s.get("refinement", {})
    return {
        "mean_iou": s["mean_iou"],
        "turn1_mean_iou": r.get("turn1_mean_iou", s["mean_iou"]),
        "parse_rate": s["parse_rate"],
        "turns_mean": r.get("turns_mean", 1.0),
        "stop_rate": r.get("stop_rate", 0.0),
    }


def _train(cfg, run_dir: Path, seed: int, turns: int, steps: int) -> tuple[Path, dict]:
    """One GRPO run; (its final policy, its figures: generated tokens, last steps' train IoU)."""
    from cluster.dev.demo import _copy_final_policy, _with
    from cluster.launch import run_training
    from cluster.pools.topology import init_ray

    if run_dir.exists():  # a run left by an earlier call: its metrics lines would be counted with ours
        shutil.rmtree(run_dir)
    rcfg = _with(
        cfg,
        {
            "rollout.max_turns": turns,
            "grpo.steps": steps,
            "seed": seed,
            "metrics.run_dir": str(run_dir),
            "checkpoint.dir": str(run_dir / "checkpoints"),
            "checkpoint.every": 0,
            "eval.every": 0,
        },
    )
    init_ray(rcfg)
    t0 = time.perf_counter()
    summary = run_training(rcfg, progress_bar=False)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    final = run_dir / "final-policy"
    _copy_final_policy(run_dir / "checkpoints", final)
    tail = rows[-4:]
    return final, {
        "steps": steps,
        "generated_tokens": sum(r["num_tokens"] for r in rows),
        "groups_lost": summary["groups_lost"],
        "train_iou_last4": sum(r["reward_iou"] for r in tail) / len(tail),
        "train_turn1_iou_last4": sum(r["iou_turn1_mean"] for r in tail) / len(tail),
        "episode_turns_last4": sum(r["episode_turns_mean"] for r in tail) / len(tail),
        "wall_s": time.perf_counter() - t0,
    }


def _summary(runs: list[dict]) -> dict:
    import numpy as np

    out = {}
    for arm in ARMS:
        for key in ("eval_1turn", "eval_2turns"):
            for fig in ("turn1_mean_iou", "mean_iou"):
                vals = [r[arm][key][fig] for r in runs]
                out[f"{arm}.{key}.{fig}"] = {
                    "mean": float(np.mean(vals)),
                    "std": float(np.std(vals)),
                    "runs": vals,
                }
        out[f"{arm}.generated_tokens"] = float(np.mean([r[arm]["train"]["generated_tokens"] for r in runs]))
    return out


def _resumed(out: Path, kind: str, steps: int, image_size: int) -> dict | None:
    """The runs already in `out` when it measured the same comparison (kind, steps, image size): a later call
    with the same --work adds the seeds it lacks (each call is a fresh process)."""
    if not out.is_file():
        return None
    old = json.loads(out.read_text())
    same = (old.get("kind"), old.get("steps"), old.get("image_size")) == (kind, steps, image_size)
    return old if same else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--work", default=None, help="folder for models, data and runs (default: a temp dir)")
    p.add_argument("--steps", type=int, default=16, help="GRPO steps of the one_turn and two_turns runs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--kind", default="salient", help="synthetic data kind (cluster/data/synth.py KINDS)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="data.image_size (default: the demo's 56, one image token)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from cluster.config import load_config
    from cluster.data.reader import DatasetReader
    from cluster.dev.demo import DEMO_CONFIG, _with, build_assets
    from learner.sft import run_sft

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="segr1-refine-"))
    size = [f"data.image_size={args.image_size}"] if args.image_size else []
    cfg = load_config(DEMO_CONFIG, ["metrics.trackers=[jsonl]", "metrics.port=0", *size])
    policy0, train, held_out = build_assets(
        cfg, work / "assets", 0, args.n_train, args.n_eval, kind=args.kind
    )
    cfg = _with(cfg, {"model.policy": str(policy0), "data.train": str(train), "data.eval": str(held_out)})
    sft = work / "sft-policy"
    if not (sft / "config.json").is_file():
        r = run_sft(cfg.policy_spec(), cfg.learner, DatasetReader.from_config(cfg).next_batch, args.sft_steps, sft,
                    lr=3e-3, turns=2)  # fmt: skip
        print(
            f"SFT (two-turn examples on half): {r.steps} steps, loss {r.first_loss:.2f} -> {r.last_loss:.2f}"
        )
    cfg = _with(cfg, {"model.policy": str(sft)})
    result = _resumed(Path(args.out), args.kind, args.steps, cfg.data.image_size)
    if result is None:
        result = {"command": " ".join(["python bench/refine_evidence.py", *(argv or sys.argv[1:])]),
                  "load_avg_start": os.getloadavg(), "kind": args.kind, "steps": args.steps,
                  "image_size": cfg.data.image_size,
                  "sft": {"eval_1turn": _eval(cfg, sft, held_out, 1), "eval_2turns": _eval(cfg, sft, held_out, 2)},
                  "runs": []}  # fmt: skip
    done = {r["seed"] for r in result["runs"]}
    for seed in [int(s) for s in args.seeds.split(",") if int(s) not in done]:
        run: dict = {"seed": seed}
        plan = [("two_turns", 2, args.steps), ("one_turn", 1, args.steps)]
        for arm, turns, steps in plan:
            policy, train_figs = _train(cfg, work / f"seed{seed}" / arm, seed, turns, steps)
            run[arm] = {"train": train_figs}
            run[arm]["eval_1turn"] = _eval(cfg, policy, held_out, 1)
            run[arm]["eval_2turns"] = _eval(cfg, policy, held_out, 2)
        per_step = run["one_turn"]["train"]["generated_tokens"] / args.steps
        matched = max(args.steps, round(run["two_turns"]["train"]["generated_tokens"] / per_step))
        policy, train_figs = _train(cfg, work / f"seed{seed}" / "one_turn_tokens", seed, 1, matched)
        run["one_turn_tokens"] = {"train": train_figs, "eval_1turn": _eval(cfg, policy, held_out, 1),
                                  "eval_2turns": _eval(cfg, policy, held_out, 2)}  # fmt: skip
        result["runs"].append(run)
        print(json.dumps({a: run[a]["eval_2turns"] for a in ARMS}), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    result["summary"] = _summary(result["runs"])
    result["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
