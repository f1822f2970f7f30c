"""Resume after a killed job: the driver actor (and with it the learner and the pools it owns) is killed inside step
4 of 6, with a checkpoint every 2 steps; `resume=True` (`segr1 train --resume`) continues from the latest checkpoint
at the right step and data cursor: every step trains the samples an uninterrupted run would (the reader's order),
the step redone after the checkpoint reproduces the killed run's step (same data, sampling seeds and weights: same
rewards and loss), and metrics.jsonl ends with one line per step. The killed run's reward workers hold step 4's
scoring at a gate (tests/e2e/run_control.py) until the kill: it dies inside step 4 whatever the machine's speed."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import (
    assert_accounting,
    assert_metric_lines,
    e2e_config,
    finish_job,
    job_actor_names,
    read_metrics,
    start_job,
    wait_for,
)
from tests.e2e.run_control import kill_gate, start_gate, start_held_job, wait_held

pytestmark = pytest.mark.slow

STEPS = 6


def _expected_ids(cfg, steps: int) -> list[set[str]]:
    from cluster.data.reader import DatasetReader

    reader = DatasetReader.from_config(cfg)
    return [{s.id for s in reader.next_batch(cfg.grpo.batch_size)} for _ in range(steps)]


def test_resume_after_a_killed_driver_continues_at_the_right_step_and_cursor(
    assets, sft_policy, ray_job, tmp_path
):
    from learner.checkpoint import latest_checkpoint, read_state

    ray = ray_job
    # 64 samples, B=12: the run crosses an epoch boundary (step 6), so the cursor must carry the epoch too.
    cfg = e2e_config(
        assets, tmp_path, f"grpo.steps={STEPS}", "grpo.batch_size=12", "checkpoint.every=2", policy=sft_policy
    )
    gate = start_gate(ray, "resume-gate")
    try:
        driver, run_ref = start_held_job(cfg, "resume-gate", hold_from=3)  # step 4's groups: policy version 3
        wait_held(ray, gate, 300, "step 4's scoring held at the gate", run_ref)
        ray.kill(driver, no_restart=True)  # inside step 4, no checkpoint on the way out: a crash, not Ctrl-C
        wait_for(lambda: not job_actor_names(ray), 60, "the killed job's actors to exit")
    finally:
        kill_gate(ray, gate)
    killed = read_metrics(tmp_path)
    ckpt = latest_checkpoint(cfg.checkpoint.dir)
    resumed_from = int(read_state(ckpt)["step"])
    assert resumed_from == 2 and len(killed) == 3, (resumed_from, len(killed))

    driver, run_ref = start_job(cfg, resume=True)
    summary = finish_job(ray, driver, run_ref, timeout=300)

    assert_accounting(summary)
    assert summary["steps"] == summary["policy_version"] == STEPS
    assert summary["groups_trained"] == STEPS * cfg.grpo.batch_size  # restored counts + the resumed steps
    rows = read_metrics(tmp_path)
    assert_metric_lines(rows, STEPS)  # the killed run's lines after the checkpoint were dropped
    assert rows[:resumed_from] == killed[:resumed_from]
    assert [set(r["sample_ids"]) for r in rows] == _expected_ids(cfg, STEPS)
    redone = list(zip(killed[resumed_from:], rows[resumed_from:3], strict=True))  # step 3: before and after
    for before, after in redone:  # same data, seeds and weights: the same step again
        assert sorted(before["sample_ids"]) == sorted(after["sample_ids"])
        assert after["reward_total"] == pytest.approx(before["reward_total"], abs=1e-6)
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-5)
