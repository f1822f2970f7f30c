"""Training on episodes of two turns (rollout.max_turns=2) on local Ray, vLLM rollout workers and GrabCut reward
workers: after its first answer each completion sees the mask its prompts made and answers again; the learner
trains on both turns' tokens of each episode (two images in one sequence). Sync and async mode lose no group,
async stays within max_staleness, and in sync mode the learner's logprobs of every policy token equal vLLM's:
the sequence it scores is the one the engine fed and generated, token for token. Validation during training
looks again too, through the pools, with the figures `segr1 eval` computes in process."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import (
    VAL_SAMPLES,
    assert_accounting,
    assert_metric_lines,
    e2e_config,
    read_metrics,
    split_validation,
)
from tests.e2e.test_validation import _starting_policy_figures

pytestmark = pytest.mark.slow


def _episodes_went_on(rows: list[dict]) -> None:
    assert all(1.0 <= r["episode_turns_mean"] <= 2.0 and 0.0 <= r["stop_rate"] <= 1.0 for r in rows), rows
    # the SFT'd policy answers in the format: most first answers make a mask, so episodes take a second turn
    assert any(r["episode_turns_mean"] > 1.0 for r in rows), [r["episode_turns_mean"] for r in rows]


def test_two_turn_sync_run_trains_every_turn_of_its_episodes(assets, sft_policy, held_out, ray_job, tmp_path):
    from cluster.driver.validation import select_samples
    from cluster.launch import run_training

    steps = 3
    cfg = e2e_config(
        assets,
        tmp_path,
        "rollout.max_turns=2",
        f"grpo.steps={steps}",
        f"data.eval={held_out}",
        "eval.before_train=true",
        "eval.every=2",
        f"eval.samples={VAL_SAMPLES}",
        policy=sft_policy,
    )
    summary = run_training(cfg)
    assert_accounting(summary)
    assert summary["steps"] == steps and summary["groups_trained"] == steps * cfg.grpo.batch_size
    rows, vals = split_validation(read_metrics(tmp_path))
    assert_metric_lines(rows, steps)
    # validation looks again through the pools, as `segr1 eval` does in process: the same figures at step 0
    assert [v["step"] for v in vals] == [0, 2]
    expected = _starting_policy_figures(cfg, select_samples(str(held_out), VAL_SAMPLES, cfg.seed))
    looked = expected["refinement"]
    assert looked["turns_mean"] > 1.0  # the starting policy's first answers make masks: it does look again
    for key, want in [("mean_iou", expected["mean_iou"]), ("parse_rate", expected["parse_rate"]),
                      ("iou_turn1", looked["turn1_mean_iou"]), ("turns_mean", looked["turns_mean"]),
                      ("stop_rate", looked["stop_rate"])]:  # fmt: skip
        assert vals[0][f"val/{key}"] == pytest.approx(want, abs=1e-9), key
    _episodes_went_on(rows)
    for r in rows:
        # vLLM (fp32) and the learner score the same weights on the same tokens after the same two-image prefix
        assert r["first_ratio_mean"] == 1.0 and r["mismatch_logp_abs"] < 1e-3, r
        assert r["mismatch_outside_fraction"] == 0.0 and r["staleness_max"] == 0, r


def test_two_turn_async_run_stays_within_staleness_and_loses_nothing(
    assets, sft_policy, held_out, ray_job, tmp_path
):
    from cluster.launch import run_training

    steps = 4
    cfg = e2e_config(
        assets,
        tmp_path,
        "rollout.max_turns=2",
        "grpo.mode=async",
        "grpo.max_staleness=1",
        f"grpo.steps={steps}",
        f"data.eval={held_out}",
        "eval.every=2",
        f"eval.samples={VAL_SAMPLES}",
        policy=sft_policy,
    )
    summary = run_training(cfg)
    assert_accounting(summary)
    assert summary["steps"] == steps and summary["mode"] == "async"
    rows, vals = split_validation(read_metrics(tmp_path))
    assert_metric_lines(rows, steps)
    assert [v["step"] for v in vals] == [
        2,
        4,
    ]  # validations of two turns interleaved with the training chunks
    assert all(v["val/samples"] == VAL_SAMPLES and 1.0 <= v["val/turns_mean"] <= 2.0 for v in vals), vals
    _episodes_went_on(rows)
    assert all(r["staleness_max"] <= cfg.grpo.max_staleness for r in rows), [r["staleness_max"] for r in rows]
