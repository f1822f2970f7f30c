"""Operating a running job: Ctrl-C on `python -m cluster.train` finishes the step in progress, writes a checkpoint
and exits 0, and `--resume` goes on from exactly there; the rollout pool is scaled up and down while the job runs
(`request_resize`, what an operator scaling the KubeRay rollout group does) without losing a group, and the worker
that joins generates with the learner's current weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.conftest import (
    REPO,
    assert_accounting,
    assert_metric_lines,
    e2e_config,
    finish_job,
    job_actor_names,
    read_metrics,
    read_summary,
    start_job,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_ctrl_c_checkpoints_exits_cleanly_and_resume_continues(assets, sft_policy, ray_job, tmp_path):
    from cluster.config import dump_config
    from learner.checkpoint import latest_checkpoint, read_state

    ray = ray_job
    steps = 40  # far more than run before the signal
    cfg = e2e_config(assets, tmp_path, f"grpo.steps={steps}", "grpo.mode=async", policy=sft_policy)
    config_file = tmp_path / "job.yaml"
    config_file.write_text(dump_config(cfg))
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,  # the test session's Ray: no second cluster
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.train", "--config", str(config_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the signal goes to the job's driver process alone
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or len(read_metrics(tmp_path)) >= 2,
            300,
            "step 2 in metrics.jsonl",
        )
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    assert "stopping: finishing the current step" in err
    summary = read_summary(tmp_path)
    assert '"stopped_early": true' in out  # the summary printed on stdout is the one written to summary.json
    assert summary["stopped_early"] and 2 <= summary["steps"] < steps, summary
    assert_accounting(summary)
    stopped = summary["steps"]
    assert_metric_lines(read_metrics(tmp_path), stopped)
    ckpt = latest_checkpoint(cfg.checkpoint.dir)
    assert int(read_state(ckpt)["step"]) == stopped  # written on the way out, at the last finished step
    wait_for(lambda: not job_actor_names(ray), 60, "the stopped job's actors to exit")

    cfg2 = e2e_config(assets, tmp_path, f"grpo.steps={stopped + 2}", "grpo.mode=async", policy=sft_policy)
    driver, run_ref = start_job(cfg2, resume=True)
    resumed = finish_job(ray, driver, run_ref, timeout=300)
    assert resumed["steps"] == resumed["policy_version"] == stopped + 2 and not resumed["stopped_early"]
    assert_accounting(resumed)
    assert_metric_lines(read_metrics(tmp_path), stopped + 2)


def test_rollout_pool_scales_up_and_down_while_training(assets, sft_policy, ray_job, tmp_path):
    ray = ray_job
    steps = 8
    cfg = e2e_config(
        assets,
        tmp_path,
        f"grpo.steps={steps}",
        "rollout.num_workers=1",
        "rollout.max_workers=2",
        "reward.num_workers=1",
        policy=sft_policy,
    )
    driver, run_ref = start_job(cfg)
    try:
        wait_for(lambda: len(read_metrics(tmp_path)) >= 1, 240, "step 1 in metrics.jsonl")
        answer = ray.get(driver.request_resize.remote(rollout=2))
        assert answer["before"] == {"rollout": 1, "reward": 1} and answer["after"] == {
            "rollout": 2,
            "reward": 1,
        }
        wait_for(lambda: "rollout-1" in job_actor_names(ray), 120, "rollout-1 to start")
        grown_at = len(read_metrics(tmp_path))
        wait_for(
            lambda: len(read_metrics(tmp_path)) >= grown_at + 2, 240, "two steps with two rollout workers"
        )
        assert ray.get(driver.request_resize.remote(rollout=1))["after"]["rollout"] == 1
        with pytest.raises(ray.exceptions.RayTaskError, match=r"outside 1..2 \(rollout.max_workers\)"):
            ray.get(
                driver.request_resize.remote(rollout=3)
            )  # above rollout.max_workers: refused, the run goes on
        summary = finish_job(ray, driver, run_ref, timeout=300)
    finally:
        ray.kill(driver, no_restart=True)
    assert_accounting(summary)
    assert summary["steps"] == steps and not summary["stopped_early"]
    assert summary["rollout_workers"] == ["rollout-0"]  # rollout-1 drained and removed
    assert summary["groups_trained"] == steps * cfg.grpo.batch_size
    rows = read_metrics(tmp_path)
    assert_metric_lines(rows, steps)
    for r in rows:
        # sync mode: every group was generated by the learner's current weights, the new worker's included
        # (it got them on joining); a worker left on its initial weights would show up as clipping
        assert r["staleness_max"] == 0 and r["clip_fraction"] < 0.01, r
