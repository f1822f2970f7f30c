"""The learner group (learner.world_size ranks `learner-0..n-1`) and its recovery inside the job.

One module-scoped run serves several checks: a 2-rank sync run (checkpoint every 2 steps) whose `learner-1` is
killed by name inside step 4 recovers from the step-2 checkpoint, trains on, and is stopped by the test once step 4
is trained again: groups_lost 0, step 3's groups counted as replayed, and every step training exactly the reader's
samples (nothing trained twice in the final history). The same run is then resumed with 1 rank and again with 2
(the optimiser state crosses world sizes). With learner.max_restarts=0, `python -m cluster.train` exits non-zero
with one message, printed last. The faults land inside a known step whatever the machine's speed: the reward
workers hold step 4's scoring at a gate until the fault is in (tests/e2e/run_control.py).
"""

from __future__ import annotations

import os
import shutil
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
    read_metrics,
    wait_for,
)
from tests.e2e.run_control import (
    UNTIL_STOPPED,
    kill_and_confirm,
    kill_gate,
    start_gate,
    start_held_job,
    stop_run,
    wait_for_line,
    wait_held,
)

pytestmark = pytest.mark.slow

RANKS = 2
SMALL = ("checkpoint.every=2",)
HELD = 3  # the reward workers hold the groups of policy version 3 (step 4's) until the fault is in


def _expected_ids(cfg, steps: int) -> list[set[str]]:
    from cluster.data.reader import DatasetReader

    reader = DatasetReader.from_config(cfg)
    return [{s.id for s in reader.next_batch(cfg.grpo.batch_size)} for _ in range(steps)]


@pytest.fixture(scope="module")
def killed_rank_run(assets, sft_policy, e2e_ray, tmp_path_factory):
    """A sync run on RANKS learner ranks; the last rank is killed inside step 4, the run stopped once step 4 is
    trained again (after the restart: before it, step 4 could not finish)."""
    from tests.e2e.conftest import kill_job_actors

    ray = e2e_ray
    run_dir = tmp_path_factory.mktemp("learner-group")
    cfg = e2e_config(
        assets,
        run_dir,
        f"grpo.steps={UNTIL_STOPPED}",
        f"learner.world_size={RANKS}",
        *SMALL,
        # deltas from a sharded learner (rank 0 packs the gathered tensors); the restarted group starts whole
        "weight_sync.delta=true",
        "weight_sync.delta_max_changed=1.0",
        policy=sft_policy,
    )
    gate = start_gate(ray, "learner-group-gate")
    try:
        driver, run_ref = start_held_job(cfg, "learner-group-gate", HELD)
        wait_held(ray, gate, 300, "step 4's scoring held at the gate", run_ref)
        assert len(read_metrics(run_dir)) == HELD  # steps 1-3 done, the step-2 checkpoint saved
        kill_and_confirm(ray, f"learner-{RANKS - 1}", "segr1")
        ray.get(gate.open.remote(), timeout=60)
        wait_for_line(run_dir, lambda r: r["step"] > HELD, 300, "step 4 trained after the restart", run_ref)
        summary = stop_run(ray, driver, run_ref, timeout=400)
    finally:
        kill_job_actors(ray)
        kill_gate(ray, gate)
    return cfg, run_dir, summary


def test_a_killed_learner_rank_restarts_the_group_from_its_checkpoint(killed_rank_run):
    cfg, run_dir, summary = killed_rank_run
    B, steps = cfg.grpo.batch_size, summary["steps"]
    assert_accounting(summary)
    assert summary["stopped_early"] and steps == summary["policy_version"] > HELD, summary
    assert summary["learner_ranks"] == [f"learner-{i}" for i in range(RANKS)]
    assert summary["learner_restarts"] == 1, summary
    # step 3 was trained after the step-2 checkpoint, then again after the rewind; step 4 only after it
    assert summary["groups_replayed"] == B, summary
    assert summary["groups_rewound"] >= 2 * B, summary  # steps 3 and 4 were generated before the kill
    assert summary["groups_trained"] == steps * B  # the final history: nothing counted twice
    rows = read_metrics(run_dir)
    assert_metric_lines(rows, steps)  # the lines after the checkpoint were dropped and written again
    assert [set(r["sample_ids"]) for r in rows] == _expected_ids(cfg, steps)
    # every line's version went as deltas but the first (the restarted learner's first version, the checkpoint's,
    # went whole when it was re-sent, a publish without a line); the engines held exactly the learner's weights
    assert [r["weight_sync_delta"] for r in rows][:2] == [0, 1], rows
    assert all(r["mismatch_logp_abs"] < 1e-3 and r["mismatch_outside_fraction"] == 0.0 for r in rows), rows


def test_resume_from_two_ranks_to_one_and_back(killed_rank_run, assets, sft_policy, ray_job, tmp_path):
    """--resume with another world size continues at the right step and data cursor. It resumes a copy of the
    killed run's folder, so the test above reads the killed run as it ended, whichever runs first."""
    from cluster.launch import run_training

    cfg, killed_dir, killed = killed_rank_run
    run_dir = tmp_path / "resumed"
    shutil.copytree(killed_dir, run_dir)
    done = killed["steps"]
    for steps, ranks in ((done + 1, 1), (done + 2, RANKS)):
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
    assert_metric_lines(rows, done + 2)
    assert [set(r["sample_ids"]) for r in rows] == _expected_ids(cfg, done + 2)


def test_without_restarts_the_job_fails_with_one_message(assets, sft_policy, ray_job, tmp_path):
    """learner.max_restarts=0: the CLI exits 1 and its last words name the rank, the step, the cause and the
    --resume command; no traceback from the cleanup."""
    ray = ray_job
    # the transformers engine: what is checked is the learner's failure message, and a vLLM worker starts slower
    # grpo.steps: the run cannot end before the kill, however fast it is
    extra = [
        f"grpo.steps={UNTIL_STOPPED}",
        "checkpoint.every=1",
        "learner.max_restarts=0",
        "rollout.engine=hf",
    ]
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
    holds the learner ranks inside step 4: the group starts again on the other segr1_learner node and trains on."""
    import json

    overrides = [
        *e2e_overrides(assets, tmp_path, sft_policy),
        f"grpo.steps={UNTIL_STOPPED}",
        f"learner.world_size={RANKS}",
        *SMALL,
    ]
    out = tmp_path / "node-loss.json"
    cmd = [sys.executable, "-m", "tests.e2e.node_loss_job", str(out), str(HELD), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert_accounting(summary)
    assert summary["stopped_early"] and summary["steps"] > HELD, summary
    assert summary["learner_restarts"] == 1 and summary["groups_replayed"] > 0, summary  # step 3, again
    assert result["after"] and result["after"] != result["before"], result
    assert result["after"] in result["learner_nodes"], result
    assert_metric_lines(read_metrics(tmp_path), summary["steps"])
