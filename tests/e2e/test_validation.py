"""Validation during training (cluster/driver/validation.py) in real runs: `eval.every=2` writes val/* lines at steps
0 (eval.before_train), 2, 4 beside the one line per step, with the figures `segr1 eval` computes for the same
policy; `checkpoint.keep_best` keeps the best validated checkpoint through pruning (keep=1), and
`checkpoint.resume_from=best` continues from it. Async mode validates without losing any group: tests/e2e/test_train.py
(its async run validates every two steps)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import (
    VAL_SAMPLES,
    assert_accounting,
    assert_metric_lines,
    e2e_config,
    read_metrics,
    split_validation,
)

pytestmark = pytest.mark.slow


def _val_config(assets, sft_policy, held_out, run_dir, *extra):
    return e2e_config(
        assets,
        run_dir,
        f"data.eval={held_out}",
        "eval.every=2",
        f"eval.samples={VAL_SAMPLES}",
        *extra,
        policy=sft_policy,
    )


def _starting_policy_figures(cfg, samples) -> dict:
    """segr1 eval's figures of the starting policy on the same samples, in process (the same request batches)."""
    from actors.worker import RolloutWorker
    from cluster.evaluation.loop import evaluate, settings_from_config
    from reward_service.predictor import Predictor

    settings = {**settings_from_config(cfg), "batch_size": cfg.rollout.max_batch_groups}
    rollout = RolloutWorker(cfg.policy_spec(), cfg.rollout, "check-rollout")
    return evaluate(rollout, Predictor(cfg.policy_spec(), cfg.reward), samples, baselines=False, **settings)


def test_sync_run_validates_keeps_the_best_and_resumes_from_it(
    assets, sft_policy, held_out, ray_job, tmp_path
):
    from cluster.driver.validation import select_samples
    from cluster.launch import run_training
    from learner.checkpoint import read_best, step_dirs

    cfg = _val_config(
        assets,
        sft_policy,
        held_out,
        tmp_path,
        "grpo.steps=4",
        "eval.before_train=true",
        "checkpoint.keep_best=val/mean_iou",
        "checkpoint.keep=1",
        "rollout.sampling.temperature=1.5",  # a policy that changes, so validations differ
        "learner.lr=1e-3",
    )
    summary = run_training(cfg)
    assert_accounting(summary)
    steps, vals = split_validation(read_metrics(tmp_path))
    assert_metric_lines(steps, 4)
    assert [v["step"] for v in vals] == [0, 2, 4]
    for v in vals:
        assert v["policy_version"] == v["step"]  # sync mode: validated at exactly that step's policy
        assert v["val/samples"] == VAL_SAMPLES and v["val/box_iou"] is None  # points format: no box
        assert all(0.0 <= v[k] <= 1.0 for k in ("val/mean_iou", "val/s_measure", "val/parse_rate"))
    expected = _starting_policy_figures(cfg, select_samples(str(held_out), VAL_SAMPLES, cfg.seed))
    for k in ("mean_iou", "s_measure", "parse_rate"):
        assert vals[0][f"val/{k}"] == pytest.approx(expected[k], abs=1e-9), k

    best = read_best(cfg.checkpoint.dir)
    top = max(v["val/mean_iou"] for v in vals)
    first_top = next(v["step"] for v in vals if v["val/mean_iou"] == top)  # strictly better replaces it
    assert (best["step"], best["metric"], best["value"]) == (first_top, "val/mean_iou", top)
    kept = [s for s, _ in step_dirs(cfg.checkpoint.dir)]
    assert kept == sorted({first_top, 4}), kept  # keep=1 plus the best

    resumed_cfg = cfg.model_copy(
        update={
            "grpo": cfg.grpo.model_copy(update={"steps": 5}),
            "checkpoint": cfg.checkpoint.model_copy(update={"resume_from": "best"}),
        }
    )
    summary = run_training(resumed_cfg, resume=True)
    assert_accounting(summary)
    assert summary["steps"] == summary["policy_version"] == 5
    after_steps, after_vals = split_validation(read_metrics(tmp_path))
    assert_metric_lines(after_steps, 5)
    assert after_steps[:first_top] == steps[:first_top]  # the lines up to the best step are the first run's
    assert sorted(v["step"] for v in after_vals) == [0, 2, 4]  # no step validated twice
    superseded = tmp_path / "checkpoints" / "superseded"
    moved = sorted(p.name[:11] for p in superseded.iterdir()) if superseded.is_dir() else []
    assert moved == (["step-000004"] if first_top < 4 else [])
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 5
