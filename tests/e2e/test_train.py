"""Short runs of the demo config on local Ray (driver actor, vLLM rollout workers, reward workers with GrabCut, the
learner, gloo weight broadcast): the synchronous run with two workers per pool, as the demo has, loses no group,
writes one metrics line per step with every documented key and its reward rises (from the SFT warm-up's policy,
which answers in a parseable format); the asynchronous run stays within
max_staleness and validates every two steps; the synchronous filter refills every batch."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import (
    RISE_STEPS,
    VAL_SAMPLES,
    assert_accounting,
    assert_metric_lines,
    e2e_config,
    read_metrics,
    read_summary,
    split_validation,
)

pytestmark = pytest.mark.slow


def test_sync_run_accounts_for_every_group(sync_run):
    cfg, run_dir, summary = sync_run
    assert summary == read_summary(run_dir)
    assert_accounting(summary)
    assert summary["steps"] == summary["policy_version"] == RISE_STEPS
    assert summary["groups_trained"] == RISE_STEPS * cfg.grpo.batch_size  # sync: every group is trained
    assert summary["groups_dropped_stale"] == 0 and summary["actor_restarts"] == 0
    assert summary["rollout_workers"] == ["rollout-0", "rollout-1"]
    assert summary["reward_workers"] == ["reward-0", "reward-1"]
    assert (run_dir / "checkpoints" / f"step-{RISE_STEPS:06d}" / "policy" / "config.json").is_file()


def test_sync_run_writes_one_metrics_line_per_step(sync_run):
    cfg, run_dir, _ = sync_run
    rows = read_metrics(run_dir)
    assert_metric_lines(rows, RISE_STEPS)
    for r in rows:
        assert r["staleness_max"] == 0  # sync: trained by the policy that generated it
        assert r["groups"] == cfg.grpo.batch_size and len(r["sample_ids"]) == cfg.grpo.batch_size
        assert r["policy_version"] == r["step"]
        assert 0.0 <= r["parse_failure_rate"] <= 1.0 and r["weight_sync_s"] > 0
        assert 0 < r["weight_sync_bytes"] <= r["weight_sync_full_bytes"]  # weight_sync.delta is on
        assert 0.0 <= r.get("weight_sync_changed_fraction", 0.0) <= 1.0, r
        # the rollout workers generate with exactly the learner's weights (sync): the PPO ratio is 1, nothing
        # is clipped; a broken weight sync shows up here as clipping
        assert r["clip_fraction"] < 0.01, r
        # pi_old is the learner's own: one update per batch, so the ratio is exactly 1 from the first micro-batch
        assert r["first_ratio_mean"] == 1.0 and r["first_clip_fraction"] == 0.0 and r["num_updates"] == 1, r
        assert r["ratio_mean"] == 1.0 and r["clip_fraction"] == 0.0, r
        # the rollout engine (vLLM, demo.yaml) and the learner score the same weights on the same support (fp32):
        # the behaviour logprobs agree, the importance weights are ~1 and nothing is truncated
        assert r["mismatch_logp_abs"] < 1e-3 and r["mismatch_outside_fraction"] == 0.0, r
        assert abs(r["is_weight_mean"] - 1.0) < 1e-3 and r["is_truncated_fraction"] == 0.0, r
    # no filter: every zero-variance group is trained (with zero advantage) and counted both per step and in total
    assert sum(r["zero_variance_groups"] for r in rows) == read_summary(run_dir)["groups_zero_variance"]

    assert any(r["weight_sync_delta"] for r in rows), [r["weight_sync_bytes"] for r in rows]


def test_the_sft_warm_up_teaches_a_parseable_answer(sft_run, assets, tmp_path):
    """The short SFT every run here starts from (conftest `sft_run`): its loss fell to under a third, and the
    policy answers images it never saw in the format the reward parser accepts (greedy: 3 of 4 at least)."""
    from cluster.data.synth import generate_samples
    from learner.policy import Policy
    from learner.sft import greedy_answers
    from reward_service.parser import parse_answer

    folder, result = sft_run
    assert result.last_loss < result.first_loss / 3, result
    cfg = e2e_config(assets, tmp_path, policy=folder)
    held_out = list(generate_samples(4, seed=7, size=64))
    answers = greedy_answers(Policy(cfg.policy_spec(), cfg.learner), held_out, max_new_tokens=100)
    fmt, size = cfg.reward.answer_format, cfg.data.image_size
    parsed = [parse_answer(a, 64, 64, policy_image_size=size, answer_format=fmt) for a in answers]
    assert sum(p.ok for p in parsed) >= 3, [(a, p.failure) for a, p in zip(answers, parsed, strict=True)]


def test_reward_rises(sync_run):
    """GRPO raises the reward of what it samples: the mean `reward_total` of the last 4 steps beats the first 4.

    The run starts from a policy that knows the answer format (conftest `sft_policy`) but samples at a temperature
    above the one it was trained at, so a part of its answers do not parse and score 0: there is something to
    learn, and the format term (1 per parsed answer) is a strong, dense signal. Every step trains on the same 8
    images with G=8 (64 completions), so the comparison is not between different images. This fails when the
    advantages have the wrong sign, when the update does not reach the rollout workers (weights not broadcast),
    or when the learner does not step."""
    _, run_dir, _ = sync_run
    rows = read_metrics(run_dir)
    first = sum(r["reward_total"] for r in rows[:4]) / 4
    last = sum(r["reward_total"] for r in rows[-4:]) / 4
    assert last > first + 0.1, [round(r["reward_total"], 3) for r in rows]


def test_async_mode_respects_max_staleness_and_validates(assets, sft_policy, held_out, ray_job, tmp_path):
    """grpo.mode=async pipelines rollout, reward and learner; no trained group is older than max_staleness
    versions, older ones are dropped and counted; every group is accounted for. The run validates every two
    steps (eval.every=2) on held-out samples: validation work is never counted as training groups."""
    from cluster.launch import run_training

    steps = 6
    cfg = e2e_config(
        assets,
        tmp_path,
        "grpo.mode=async",
        "grpo.max_staleness=1",
        f"grpo.steps={steps}",
        "grpo.filter_zero_variance=true",
        f"data.eval={held_out}",
        "eval.every=2",
        f"eval.samples={VAL_SAMPLES}",
        # through the object store, as deltas against the version every worker holds (gloo: the other runs)
        "weight_sync.backend=object-store",
        "weight_sync.delta=true",
        policy=sft_policy,
    )
    summary = run_training(cfg)
    assert_accounting(summary)
    assert summary["steps"] == steps and summary["mode"] == "async"
    rows, vals = split_validation(read_metrics(tmp_path))
    assert_metric_lines(rows, steps)
    assert sorted(v["step"] for v in vals) == [2, 4, 6]
    assert all(v["policy_version"] >= v["step"] and v["val/samples"] == VAL_SAMPLES for v in vals)
    assert all(r["staleness_max"] <= cfg.grpo.max_staleness for r in rows), [r["staleness_max"] for r in rows]
    # the second batch was generated by policy 0 while step 1 trained: async really ran ahead
    assert max(r["staleness_max"] for r in rows) >= 1
    # stale groups were written by an older policy: their behaviour logprobs differ from the learner's pi_old,
    # and the importance weights that correct for it differ from 1 and are logged (the ratio still starts at 1)
    stale = [r for r in rows if r["staleness_max"] >= 1]
    assert all(r["mismatch_logp_abs"] > 0 for r in stale), [r["mismatch_logp_abs"] for r in rows]
    assert any(abs(r["is_weight_mean"] - 1.0) > 1e-6 for r in stale), [r["is_weight_mean"] for r in rows]
    assert all(r["first_ratio_mean"] == 1.0 and r["first_clip_fraction"] == 0.0 for r in rows)
    assert summary["groups_trained"] == steps * cfg.grpo.batch_size
    # the filter keeps zero-variance groups out of every step; each filtered group was counted as one
    assert all(r["zero_variance_groups"] == 0 for r in rows)
    assert summary["groups_filtered"] <= summary["groups_zero_variance"]
    # within the first epoch (24 of 64 samples): nothing trained twice, nothing read beyond what the pipeline
    # may hold (B x (max_staleness + 1) open groups past the trained ones)
    from cluster.data.reader import DatasetReader

    trained = [i for r in rows for i in r["sample_ids"]]
    assert len(trained) == len(set(trained))
    capacity = cfg.grpo.batch_size * (cfg.grpo.max_staleness + 1)
    readable = {s.id for s in DatasetReader.from_config(cfg).next_batch(len(trained) + capacity)}
    assert set(trained) <= readable


def test_sync_filter_refills_every_batch_to_batch_size(assets, sft_policy, ray_job, tmp_path):
    """grpo.filter_zero_variance in sync mode: the zero-variance groups are dropped and more prompts drawn until
    the step holds batch_size informative groups (DAPO's dynamic sampling); every extra group is counted.

    The reward is the format term alone (segmentation weight 0), so a group's rewards are all equal whenever its G
    answers all parse or all fail: with the SFT policy at temperature 1 (~90% parse) most groups are flat and
    the batch needs refilling."""
    from cluster.launch import run_training

    steps = 3
    cfg = e2e_config(
        assets,
        tmp_path,
        f"grpo.steps={steps}",
        "grpo.filter_zero_variance=true",
        "grpo.max_fill_rounds=40",
        "reward.weights.segmentation=0",
        policy=sft_policy,
    )
    summary = run_training(cfg)
    assert_accounting(summary)
    rows = read_metrics(tmp_path)
    assert_metric_lines(rows, steps)
    b = cfg.grpo.batch_size
    for r in rows:
        assert r["groups"] == b and len(r["sample_ids"]) == b and r["zero_variance_groups"] == 0, r
        assert r["first_ratio_mean"] == 1.0 and r["first_clip_fraction"] == 0.0, r
    assert summary["groups_trained"] == steps * b
    # the filter had work to do, and the refills were drawn and counted
    assert summary["groups_filtered"] > 0 and sum(r["fill_rounds"] for r in rows) > 0, (summary, rows)
    # sync: nothing goes stale or stays in the pipeline, so every generated group was trained or filtered
    assert summary["groups_generated"] == summary["groups_trained"] + summary["groups_filtered"]
    assert summary["groups_filtered"] == summary["groups_zero_variance"]
