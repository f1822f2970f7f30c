"""Training on episodes of two turns (rollout.max_turns=2) on local Ray, vLLM rollout workers and GrabCut reward
workers: after its first answer each completion sees the mask its prompts made and answers again; the learner
trains on both turns' tokens of each episode (two images in one sequence). Sync and async mode lose no group,
async stays within max_staleness, and in sync mode the learner's logprobs of every policy token equal vLLM's:
the sequence it scores is the one the engine fed and generated, token for token."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import assert_accounting, assert_metric_lines, e2e_config, read_metrics

pytestmark = pytest.mark.slow


def _episodes_went_on(rows: list[dict]) -> None:
    assert all(1.0 <= r["episode_turns_mean"] <= 2.0 and 0.0 <= r["stop_rate"] <= 1.0 for r in rows), rows
    # the SFT'd policy answers in the format: most first answers make a mask, so episodes take a second turn
    assert any(r["episode_turns_mean"] > 1.0 for r in rows), [r["episode_turns_mean"] for r in rows]


def test_two_turn_sync_run_trains_every_turn_of_its_episodes(assets, sft_policy, ray_job, tmp_path):
    from cluster.launch import run_training

    steps = 3
    cfg = e2e_config(assets, tmp_path, "rollout.max_turns=2", f"grpo.steps={steps}", policy=sft_policy)
    summary = run_training(cfg)
    assert_accounting(summary)
    assert summary["steps"] == steps and summary["groups_trained"] == steps * cfg.grpo.batch_size
    rows = read_metrics(tmp_path)
    assert_metric_lines(rows, steps)
    _episodes_went_on(rows)
    for r in rows:
        # vLLM (fp32) and the learner score the same weights on the same tokens after the same two-image prefix
        assert r["first_ratio_mean"] == 1.0 and r["mismatch_logp_abs"] < 1e-3, r
        assert r["mismatch_outside_fraction"] == 0.0 and r["staleness_max"] == 0, r


def test_two_turn_async_run_stays_within_staleness_and_loses_nothing(assets, sft_policy, ray_job, tmp_path):
    from cluster.launch import run_training

    steps = 4
    cfg = e2e_config(
        assets,
        tmp_path,
        "rollout.max_turns=2",
        "grpo.mode=async",
        "grpo.max_staleness=1",
        f"grpo.steps={steps}",
        policy=sft_policy,
    )
    summary = run_training(cfg)
    assert_accounting(summary)
    assert summary["steps"] == steps and summary["mode"] == "async"
    rows = read_metrics(tmp_path)
    assert_metric_lines(rows, steps)
    _episodes_went_on(rows)
    assert all(r["staleness_max"] <= cfg.grpo.max_staleness for r in rows), [r["staleness_max"] for r in rows]
