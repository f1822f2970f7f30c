"""Fault injection: a rollout actor and a reward actor are killed by name (`rollout-0`, `reward-0` in namespace
segr1, as an operator or a node failure would) while the job runs as the driver actor. The pools restart them under
the same names and re-issue their work: two restarts, groups_lost 0, and the run trained exactly the data an
undisturbed run would have (no group skipped, none trained twice). Driven by events (tests/e2e/run_control.py):
each kill follows a metrics line, the run is stopped once both restarts show in its lines, and the checks read the
steps it did."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import assert_accounting, assert_metric_lines, e2e_config, read_metrics, start_job
from tests.e2e.run_control import UNTIL_STOPPED, stop_run, wait_for_line

pytestmark = pytest.mark.slow


def _expected_ids(cfg, steps: int) -> list[set[str]]:
    """The samples of each sync step: the reader's order (B per step), which a retry must not disturb."""
    from cluster.data.reader import DatasetReader

    reader = DatasetReader.from_config(cfg)
    return [{s.id for s in reader.next_batch(cfg.grpo.batch_size)} for _ in range(steps)]


def _restarts(n: int):
    """Matches a metrics line that counts at least n actor restarts."""
    return lambda row: row["actor_restarts"] >= n


def test_killed_rollout_and_reward_actors_cost_only_the_retry(assets, sft_policy, ray_job, tmp_path):
    ray = ray_job
    # transformers engine here: the kill/restart path is the same for both engines, and each vLLM restart (LLM()
    # start, 4-13 s; minutes on a loaded machine) cost this test 89 -> 244 s where the suite has a budget
    cfg = e2e_config(
        assets,
        tmp_path,
        f"grpo.steps={UNTIL_STOPPED}",
        "rollout.engine=hf",
        "rollout.num_workers=2",  # the others carry on while the killed one restarts
        "reward.num_workers=2",
        # weights that barely move (only the smallest fp32 values change), sent as deltas: the restarted worker
        # joins a new weight-sync generation, which must start from a full version
        "learner.lr=1e-10",
        "weight_sync.delta=true",
        policy=sft_policy,
    )
    driver, run_ref = start_job(cfg)
    try:
        wait_for_line(tmp_path, lambda r: r["step"] >= 1, 240, "step 1 in metrics.jsonl", run_ref)
        ray.kill(ray.get_actor("rollout-0", namespace="segr1"), no_restart=True)
        wait_for_line(tmp_path, _restarts(1), 180, "a step after rollout-0's restart", run_ref)
        ray.kill(ray.get_actor("reward-0", namespace="segr1"), no_restart=True)
        wait_for_line(tmp_path, _restarts(2), 180, "a step after reward-0's restart", run_ref)
        summary = stop_run(ray, driver, run_ref, timeout=300)
    finally:
        ray.kill(driver, no_restart=True)
    assert_accounting(summary)
    steps = summary["steps"]
    assert summary["stopped_early"] and steps >= 3, summary  # stopped by the test: kills after steps 1 and 2+
    assert summary["actor_restarts"] >= 2, summary
    assert summary["rollout_workers"] == ["rollout-0", "rollout-1"]  # replaced under the same names
    assert summary["reward_workers"] == ["reward-0", "reward-1"]
    rows = read_metrics(tmp_path)
    assert_metric_lines(rows, steps)
    assert rows[-1]["actor_restarts"] == summary["actor_restarts"]
    assert [set(r["sample_ids"]) for r in rows] == _expected_ids(cfg, steps)
    assert summary["groups_trained"] == steps * cfg.grpo.batch_size
    # deltas that were applied: fewer bytes than the whole policy, and the engines hold the learner's weights
    assert any(
        r["weight_sync_delta"] and r["weight_sync_bytes"] < r["weight_sync_full_bytes"] for r in rows
    ), rows
    assert all(r["mismatch_logp_abs"] < 1e-3 and r["mismatch_outside_fraction"] == 0.0 for r in rows), rows
