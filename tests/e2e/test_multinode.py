"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`), each advertising the resource its KubeRay group
does (cluster/k8s/): the head `segr1_driver`, two rollout nodes `segr1_rollout`, a reward node `segr1_reward`, a
learner node `segr1_learner`. Disaggregated placement, the async test preset.

- A missing pool resource fails at once, naming the resource and the KubeRay group that should advertise it.
- Each pool's actors land on their own nodes (by node id, asked of each actor).
- Removing the node holding `rollout-0` mid-run (a crash): the worker is restarted under its name on the other
  rollout node and serves again, the rollouts stored on the lost node are generated again, groups_lost 0. The test stops the run once the replacement's groups are trained
  (tests/e2e/run_control.py), so the run lasts as long as the scenario whatever the machine's speed. What the loss
  costs in wall time is a figure, not a test: bench/node_loss.py.

The session's local Ray (tests/conftest.py) is shut down for this module and started again afterwards. The head
checks node health every second (Ray's default: every 3 s, a node is declared dead after 5 failed checks).
"""

from __future__ import annotations

import pytest

from tests.conftest import LOCAL_RAY
from tests.e2e.conftest import (
    assert_accounting,
    assert_metric_lines,
    e2e_config,
    kill_job_actors,
    read_metrics,
    start_job,
)
from tests.e2e.run_control import UNTIL_STOPPED, stop_run, wait_for_event, wait_for_line

pytestmark = pytest.mark.slow

# the async test preset, disaggregated, two workers per pool; the transformers engine: a new vLLM engine's start
# (4-13 s, far more on a loaded machine) would be most of the replacement's time, while the node loss and the
# weight-sync teardown do not depend on the engine. bench/node_loss.py times the same scenario.
OVERRIDES = (
    "placement.mode=disaggregated",
    "grpo.mode=async",
    "rollout.num_workers=2",
    "reward.num_workers=2",
    "rollout.engine=hf",
)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    had_local = ray.is_initialized()
    ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"segr1_driver": 1},
            "include_dashboard": False,
            # Ray declares a node dead after health_check_failure_threshold (5) failed checks, one every
            # health_check_period_ms (3000 by default: ~15 s); 1 s here keeps the test's margin on a loaded machine
            # Ray keeps a task's result under 100 KB inline with its owner (the driver), where no node loss can
            # take it; 1 KB here puts the rollouts in the rollout nodes' object stores, as real groups are, so a
            # lost rollout node loses the rollouts on it and the driver must generate them again
            "_system_config": {"health_check_period_ms": 1000, "max_direct_call_object_size": 1024},
        },
    )
    nodes = {
        "rollout-a": c.add_node(num_cpus=1, resources={"segr1_rollout": 2}),
        "learner": c.add_node(num_cpus=1, resources={"segr1_learner": 1}),
    }
    ray.init(address=c.address, namespace="segr1-test", log_to_driver=False)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        if had_local:  # what tests/conftest.py's ray_local started, for the rest of the session
            ray.init(**LOCAL_RAY)


def _node_of(ray, actor: str) -> str:
    handle = ray.get_actor(actor, namespace="segr1")
    return ray.get(
        handle.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()), timeout=60
    )


def _assert_placed(ray, c, ids: dict) -> None:
    """Each pool's actors on their own group's nodes, the driver on the head (asked of the running actors)."""
    assert _node_of(ray, "driver") == c.head_node.node_id
    assert _node_of(ray, "learner-0") == ids["learner"]
    assert _node_of(ray, "reward-0") == _node_of(ray, "reward-1") == ids["reward"]
    assert {_node_of(ray, "rollout-0"), _node_of(ray, "rollout-1")} <= {ids["rollout-a"], ids["rollout-b"]}


def _replacement_line(run_dir) -> dict | None:
    """The first metrics line trained on groups of the replaced rollout-0: generated at a policy version no older
    than that of the first line that counted the restart (the dead worker's groups are older)."""
    rows = read_metrics(run_dir)
    first = next((r for r in rows if r["actor_restarts"] >= 1), None)
    if first is None:
        return None
    served = lambda r: r["by_rollout_worker"].get("rollout-0", {}).get("policy_version", -1)  # noqa: E731
    return next(
        (r for r in rows if r["step"] >= first["step"] and served(r) >= first["policy_version"]), None
    )


def test_disaggregated_placement_and_a_lost_rollout_node_is_replaced(cluster, assets, sft_policy, tmp_path):
    import ray

    from cluster.config import ConfigError
    from cluster.pools.placement import check_pool_resources

    c, nodes = cluster
    run_dir = tmp_path / "lost"
    cfg = e2e_config(assets, run_dir, *OVERRIDES, f"grpo.steps={UNTIL_STOPPED}", policy=sft_policy)
    with pytest.raises(ConfigError, match=r"segr1_reward: the worker group `reward` must advertise it"):
        check_pool_resources(cfg)  # no reward node yet: fails at once, not an actor pending forever
    nodes["reward"] = c.add_node(num_cpus=1, resources={"segr1_reward": 2})
    nodes["rollout-b"] = c.add_node(num_cpus=1, resources={"segr1_rollout": 2})
    c.wait_for_nodes()
    check_pool_resources(cfg)

    ids = {name: n.node_id for name, n in nodes.items()}
    driver, run_ref = start_job(cfg)
    try:
        wait_for_line(run_dir, lambda r: r["step"] >= 2, 300, "step 2 of the run in metrics.jsonl", run_ref)
        _assert_placed(ray, c, ids)
        lost = _node_of(ray, "rollout-0")
        c.remove_node(next(n for n in c.worker_nodes if n.node_id == lost), allow_graceful=False)  # a crash
        what = "a step trained on the replaced rollout-0's groups"
        wait_for_event(lambda: _replacement_line(run_dir), 300, what, run_ref)
        summary = stop_run(ray, driver, run_ref, timeout=600)
    finally:
        kill_job_actors(ray)
    assert_accounting(summary)
    assert summary["stopped_early"] and summary["actor_restarts"] >= 1, summary
    assert summary["rollout_workers"] == ["rollout-0", "rollout-1"]
    where = {actor: p["node_id"] for actor, p in summary["placement"].items()}
    (survivor,) = {ids["rollout-a"], ids["rollout-b"]} - {lost}
    assert where["rollout-0"] == where["rollout-1"] == survivor, summary["placement"]
    assert lost not in where.values() and where["learner-0"] == ids["learner"], summary["placement"]
    assert all(p["node_ip"] for p in summary["placement"].values())
    assert {p["pool"] for p in summary["placement"].values()} == {"driver", "learner", "rollout", "reward"}
    assert_metric_lines(read_metrics(run_dir), summary["steps"])
