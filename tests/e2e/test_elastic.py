"""Pools that follow the cluster (docs/scaling.md), on a `ray.cluster_utils.Cluster`: several Ray nodes on this
machine, each advertising what its KubeRay group advertises (cluster/k8s/raycluster-qwen7b-8gpu.yaml: the head
`segr1_driver`, one node per pool with `segr1_learner` / `segr1_rollout` / `segr1_reward`), disaggregated
placement.

One job, several scenarios, as an operator and KubeRay would see them:
- every pool's actors land on nodes of their own group (node ids);
- the reward pool is slowed on purpose (a RewardWorker subclass handed in through `Workers`), so the learner
  waits on scoring: the autoscaling policy asks Ray's autoscaler for one more reward unit (the request state in
  the GCS, and the job's decisions), never beyond reward.max_workers;
- the test then plays KubeRay: it adds a reward node (what the request would bring) and a rollout node; both
  pools grow into them, and the new rollout worker serves (its tokens > 0 in a trained step, its policy version
  current);
- it removes both nodes: the pools shrink back without a crash loop;
- the test then stops the run (tests/e2e/run_control.py: each stage waits for its event, not for a number of
  steps, so the run lasts as long as the scenario whatever the machine's speed): no lost group, and the wait share
  that decided the request, read from the lines of the decision's steps, is above placement.autoscale.wait_share.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.e2e.conftest import REPO, assert_accounting, assert_metric_lines, e2e_config, read_metrics
from tests.e2e.run_control import following_the_cluster, stop_run, wait_for_event, wait_for_line

pytestmark = pytest.mark.slow

NAMESPACE = "segr1-elastic"
SLOW_SCORE_S = 0.4  # per score call: the learner waits on the reward pool


def _slow_reward_class():
    from reward_service.worker import RewardWorker

    class SlowReward(RewardWorker):
        def score(self, groups, *samples):
            time.sleep(SLOW_SCORE_S)  # a slow segmenter, on purpose
            return super().score(groups, *samples)

    return SlowReward


def slow_reward_workers():
    """`Workers` of the job: the real rollout worker and learner, a slow reward worker."""
    from actors.worker import RolloutWorker
    from cluster.pools.topology import Workers
    from learner.learner import Learner

    return Workers(rollout=RolloutWorker, reward=_slow_reward_class(), learner=Learner)


def _node(cluster, **resources):
    return cluster.add_node(num_cpus=1, resources=resources, include_dashboard=False)


@pytest.fixture(scope="module")
def multinode():
    """A head (segr1_driver) plus one learner, one rollout and one reward node; the session's local Ray (if any)
    is put aside for the module and started again afterwards. The nodes use the machine's own address, as
    cluster_utils does: `ray.init` resolves a 127.0.0.1 cluster address to it when connecting."""
    import ray
    from ray.cluster_utils import Cluster

    from tests.conftest import init_session_ray

    had_session_ray = ray.is_initialized()
    if had_session_ray:
        ray.shutdown()
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), old_path) if p
    )  # this module, in actors
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "resources": {"segr1_driver": 1}, "include_dashboard": False},
    )
    try:
        nodes = {
            "learner": _node(cluster, segr1_learner=1),
            "rollout": _node(cluster, segr1_rollout=1),
            "reward": _node(cluster, segr1_reward=1),
        }
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        yield ray, cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
        if had_session_ray:
            init_session_ray()


def _node_of(ray, name: str) -> str:
    """The node id the named actor of the job runs on (asked of the actor itself)."""
    handle = ray.get_actor(name, namespace=NAMESPACE)
    return ray.get(
        handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60
    )


def _requested_units(ray, resource: str) -> float:
    """Units of `resource` asked of Ray's autoscaler (request_resources), from the GCS: the v1 KV entry or the
    v2 cluster resource constraints."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(b"autoscaler_resource_request")
    if raw:
        return sum(b.get(resource, 0.0) for b in json.loads(raw))
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import get_cluster_resource_state

    state = get_cluster_resource_state(GcsClient(address=ray.get_runtime_context().gcs_address))
    total = 0.0
    for constraint in state.cluster_resource_constraints:
        for req in constraint.resource_requests:
            total += req.request.resources_bundle.get(resource, 0.0) * req.count
    return total


def _dump_driver_log(cluster, run_dir) -> None:
    """On failure: the last metrics lines and what the driver and pools logged (the actors' stderr)."""
    from pathlib import Path

    for row in read_metrics(run_dir)[-5:]:
        print(
            {k: row.get(k) for k in ("step", "rollout_workers", "reward_workers", "step_s", "weight_sync_s")}
        )
    logs = Path(cluster.head_node.get_session_dir_path()) / "logs"
    for path in sorted(logs.glob("worker-*.err")):
        text = path.read_text(errors="replace")
        if "driver" in text or "pool" in text:
            print(f"--- {path.name}\n" + "\n".join(text.splitlines()[-60:]))


WAIT_SHARE, WINDOW = 0.2, 2  # placement.autoscale: a pool waited on > 20% of 2 steps asks for one more unit


def _job_config(assets, run_dir):
    """Disaggregated, async, both pools 1..2 following the cluster, autoscaling quick to act; the test stops it."""
    return e2e_config(
        assets,
        run_dir,
        *following_the_cluster(NAMESPACE),
        f"placement.autoscale={{enabled: true, wait_share: {WAIT_SHARE}, window: {WINDOW}, idle_window: 1000, "
        "cooldown_s: 0}",
        "rollout.num_workers=1",
        "rollout.max_workers=2",
        "reward.num_workers=1",
        "reward.max_workers=2",
        "weight_sync.timeout_s=10",  # a group member on a removed node: not five minutes (docs/scaling.md)
        # the transformers engine: a new vLLM worker takes longer to start than this short run lasts, and the
        # pools' behaviour does not depend on the engine (vLLM rollouts: test_train, test_learner_group)
        "rollout.engine=hf",
    )


def _assert_placed(ray, cluster, nodes) -> None:
    """Each pool's actor on its own group's node, the driver on the head."""
    node_ids = {name: n.node_id for name, n in nodes.items()}
    for actor, group in (("learner-0", "learner"), ("rollout-0", "rollout"), ("reward-0", "reward")):
        assert _node_of(ray, actor) == node_ids[group], f"{actor} is not on the {group} group's node"
    assert _node_of(ray, "driver") == cluster.head_node.node_id


def _grow(ray, cluster, run_dir, run_ref, max_staleness: int) -> tuple[dict, int]:
    """Play KubeRay: a reward node (what the request asks for) and a rollout node; both pools grow into them and
    rollout-1 serves. (the added nodes, the step of the first line trained on rollout-1's groups)"""
    extra = {"rollout": _node(cluster, segr1_rollout=1), "reward": _node(cluster, segr1_reward=1)}

    def served_by_rollout_1(line):
        return line.get("reward_workers") == 2 and line["by_rollout_worker"].get("rollout-1")

    what = "a step trained on rollout-1's groups, two reward workers"
    line = wait_for_line(run_dir, served_by_rollout_1, 180, what, run_ref)
    new = line["by_rollout_worker"]["rollout-1"]
    assert new["tokens"] > 0
    assert line["policy_version"] - 1 - new["policy_version"] <= max_staleness, line
    assert _node_of(ray, "rollout-1") == extra["rollout"].node_id
    assert _node_of(ray, "reward-1") == extra["reward"].node_id
    assert _requested_units(ray, "segr1_reward") <= 2  # reward.max_workers
    return extra, line["step"]


def _assert_decided_on_waits(summary: dict, rows: list[dict]) -> None:
    """The first reward scale-up was decided on its window's wait shares: read from the lines of those steps."""
    ups = [d for d in summary["scale_decisions"] if d["direction"] == "up"]
    assert ups and all(d["units"] <= 2 for d in summary["scale_decisions"]), summary["scale_decisions"]
    reward_up = next((d for d in ups if d["pool"] == "reward"), None)
    assert reward_up is not None, summary["scale_decisions"]
    window = [r for r in rows if reward_up["step"] - WINDOW < r["step"] <= reward_up["step"]]
    shares = [r["wait_reward_share"] for r in window]
    assert len(shares) == WINDOW and sum(shares) / WINDOW > WAIT_SHARE, (reward_up, shares)


def test_pools_follow_the_cluster_and_autoscaling_asks_for_reward(assets, multinode, tmp_path):
    from cluster.driver.loop import TrainDriver
    from cluster.pools.topology import spawn_driver

    ray, cluster, nodes = multinode
    cfg = _job_config(assets, tmp_path)
    driver = spawn_driver(cfg, TrainDriver, cfg, slow_reward_workers, False)
    run_ref = driver.run.remote()
    try:
        wait_for_line(tmp_path, lambda r: r["step"] >= 1, 300, "step 1 in metrics.jsonl", run_ref)
        _assert_placed(ray, cluster, nodes)

        # the slow reward pool: the policy asks for a second reward unit, and never for a third
        wanted = lambda: _requested_units(ray, "segr1_reward") >= 2  # noqa: E731
        wait_for_event(wanted, 120, "a request for 2 segr1_reward units", run_ref)

        # KubeRay's answer (a reward pod), and an operator raising the rollout group: both pools grow into them
        extra, at = _grow(ray, cluster, tmp_path, run_ref, cfg.grpo.max_staleness)

        # the nodes go away (spot reclaim, scale-down): the pools shrink back, no crash loop
        cluster.remove_node(extra["rollout"])
        cluster.remove_node(extra["reward"])

        def shrunk(line):
            return line["step"] > at and line["rollout_workers"] == 1 and line["reward_workers"] == 1

        wait_for_line(tmp_path, shrunk, 180, "both pools back to one worker", run_ref)
        summary = stop_run(ray, driver, run_ref, timeout=600)
    except BaseException:
        _dump_driver_log(cluster, tmp_path)
        raise
    finally:
        ray.kill(driver, no_restart=True)
    rows = read_metrics(tmp_path)
    assert summary["stopped_early"], summary
    assert_metric_lines(rows, summary["steps"])
    assert_accounting(summary)
    assert summary["rollout_workers"] == ["rollout-0"] and summary["reward_workers"] == ["reward-0"]
    _assert_decided_on_waits(summary, rows)
