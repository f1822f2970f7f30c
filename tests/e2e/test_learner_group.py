"""The learner group (learner.world_size ranks `learner-0..n-1`) and its recovery inside the job.

One module-scoped run serves several checks: a 2-rank sync run whose `learner-1` is killed by name after step 3
(checkpoint every 2 steps) recovers from the step-2 checkpoint and ends with the configured steps, groups_lost 0,
the replayed groups counted, and every step training exactly the reader's samples (nothing trained twice in the
final history). The same run is then resumed with 1 rank and again with 2 (the optimiser state crosses world sizes).
With learner.max_restarts=0, `python -m cluster.train` exits non-zero with one message, printed last.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import (
    DEMO_CONFIG,
    REPO,
    assert_accounting,
    assert_metric_lines,
    e2e_config,
    e2e_overrides,
    finish_job,
    read_metrics,
    start_job,
    wait_for,
)

pytestmark = pytest.mark.slow

RANKS = 2
STEPS = 5
SMALL = ("checkpoint.every=2",)


def _expected_ids(cfg, steps: int) -> list[set[str]]:
    from cluster.data.reader import DatasetReader

    reader = DatasetReader.from_config(cfg)
    return [{s.id for s in reader.next_batch(cfg.grpo.batch_size)} for _ in range(steps)]


@pytest.fixture(scope="module")
def killed_rank_run(assets, sft_policy, e2e_ray, tmp_path_factory):
    """5 sync steps on RANKS learner ranks; the last rank is killed by name once step 3 is logged."""
    from tests.e2e.conftest import kill_job_actors

    ray = e2e_ray
    run_dir = tmp_path_factory.mktemp("learner-group")
    cfg = e2e_config(
        assets, run_dir, f"grpo.steps={STEPS}", f"learner.world_size={RANKS}", *SMALL, policy=sft_policy
    )
    driver, run_ref = start_job(cfg)
    try:
        wait_for(lambda: len(read_metrics(run_dir)) >= 3, 300, "step 3 in metrics.jsonl", every=0.05)
        ray.kill(ray.get_actor(f"learner-{RANKS - 1}", namespace="segr1"), no_restart=True)
        summary = finish_job(ray, driver, run_ref, timeout=400)
    finally:
        kill_job_actors(ray)
    return cfg, run_dir, summary


def test_a_killed_learner_rank_restarts_the_group_from_its_checkpoint(killed_rank_run):
    cfg, run_dir, summary = killed_rank_run
    B = cfg.grpo.batch_size
    assert_accounting(summary)
    assert summary["steps"] == summary["policy_version"] == STEPS and not summary["stopped_early"]
    assert summary["learner_ranks"] == [f"learner-{i}" for i in range(RANKS)]
    assert summary["learner_restarts"] == 1, summary
    # step 3 (at least) was trained after the step-2 checkpoint, then again after the rewind
    assert summary["groups_replayed"] >= B and summary["groups_replayed"] % B == 0, summary
    assert summary["groups_rewound"] >= summary["groups_replayed"], summary
    assert summary["groups_trained"] == STEPS * B  # the final history: nothing counted twice
    rows = read_metrics(run_dir)
    assert_metric_lines(rows, STEPS)  # the lines after the checkpoint were dropped and written again
    assert [set(r["sample_ids"]) for r in rows] == _expected_ids(cfg, STEPS)


def test_resume_from_two_ranks_to_one_and_back(killed_rank_run, assets, sft_policy, ray_job):
    """--resume with another world size continues at the right step and data cursor."""
    from cluster.launch import run_training

    cfg, run_dir, _ = killed_rank_run
    for steps, ranks in ((STEPS + 1, 1), (STEPS + 2, RANKS)):
        more = e2e_config(
            assets,
            run_dir,
            f"grpo.steps={steps}",
            f"learner.world_size={ranks}",
            *SMALL,
            "checkpoint.every=1",
            "rollout.engine=hf",  # the learner's resume across world sizes; a transformers worker starts faster
            policy=sft_policy,
        )
        summary = run_training(more, resume=True)
        assert_accounting(summary)
        assert summary["steps"] == summary["policy_version"] == steps
        assert summary["learner_ranks"] == [f"learner-{i}" for i in range(ranks)]
    rows = read_metrics(run_dir)
    assert_metric_lines(rows, STEPS + 2)
    assert [set(r["sample_ids"]) for r in rows] == _expected_ids(cfg, STEPS + 2)


def test_without_restarts_the_job_fails_with_one_message(assets, sft_policy, ray_job, tmp_path):
    """learner.max_restarts=0: the CLI exits 1 and its last words name the rank, the step, the cause and the
    --resume command; no traceback from the cleanup."""
    ray = ray_job
    # the transformers engine: what is checked is the learner's failure message, and a vLLM worker starts slower
    extra = ["grpo.steps=4", "checkpoint.every=1", "learner.max_restarts=0", "rollout.engine=hf"]
    overrides = [*e2e_overrides(assets, tmp_path, sft_policy), *extra]
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, "-m", "cluster.train", "--config", str(DEMO_CONFIG), *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # a checkpoint to resume from is written (step 1's: checkpoint.every=1) before the kill
        ckpts = tmp_path / "checkpoints"
        wait_for(lambda: any(ckpts.glob("step-*")) or proc.poll() is not None, 300, "step 1's checkpoint")
        ray.kill(ray.get_actor("learner-0", namespace="segr1"), no_restart=True)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (proc.returncode, out[-2000:], err[-4000:])
    assert "Traceback" not in err, err[-4000:]
    last = [ln for ln in err.splitlines() if ln.strip()][-2:]
    assert last[0].startswith("segr1 train: learner rank learner-0 on node "), last
    assert " died at step " in last[0] and "learner.max_restarts=0" in last[0], last
    expected = " ".join(["segr1 train --config", str(DEMO_CONFIG), *overrides, "--resume"])
    assert last[1] == f"continue from the latest checkpoint with: {expected}", last


def test_losing_the_learners_node_restarts_the_group_on_another(assets, sft_policy, tmp_path):
    """On a ray.cluster_utils.Cluster (its own process: tests/e2e/node_loss_job.py), removing the node that
    holds the learner ranks mid-run: the group starts again on the other segr1_learner node and the run ends."""
    import json

    overrides = [
        *e2e_overrides(assets, tmp_path, sft_policy),
        f"grpo.steps={STEPS}",
        f"learner.world_size={RANKS}",
        *SMALL,
    ]
    out = tmp_path / "node-loss.json"
    cmd = [sys.executable, "-m", "tests.e2e.node_loss_job", str(out), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert_accounting(summary)
    assert summary["steps"] == STEPS and summary["learner_restarts"] == 1, summary
    assert result["after"] and result["after"] != result["before"], result
    assert result["after"] in result["learner_nodes"], result
    assert_metric_lines(read_metrics(tmp_path), STEPS)
