"""The node-loss scenario of tests/e2e/test_learner_group.py, run in its own process (a `ray.cluster_utils.Cluster`
cannot share a process with the test session's local Ray):

    python -m tests.e2e.node_loss_job OUT.json HELD key.sub=value ...

A head (advertising segr1_driver, no CPUs), two nodes advertising segr1_learner (room for every rank on each),
one segr1_rollout node and one segr1_reward node, placement disaggregated. The reward workers hold the scoring of
the groups of policy version HELD (step HELD+1's in sync mode) at a gate (tests/e2e/run_control.py); while they
are held, the node that holds the learner ranks is removed, then the gate opens: the job must restart its group on
the other learner node. Once step HELD+1 is trained (only possible after the restart), the run is stopped. Writes
the summary and the node ids (before / after) to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _learner_node(ray) -> str:
    """The node of the learner group's live placement group (all its bundles are packed onto one node here)."""
    table = ray.util.placement_group_table().values()
    live = [pg for pg in table if pg["state"] == "CREATED" and "segr1_learner" in pg["bundles"][0]]
    nodes = {n for pg in live for n in pg["bundles_to_node_id"].values()}
    return nodes.pop() if len(live) == 1 and len(nodes) == 1 else ""


def _start_cluster(ranks: int):
    """(the cluster, its two learner nodes by node id)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "resources": {"segr1_driver": 1}, "include_dashboard": False},
    )
    learner_nodes = {}
    for _ in range(2):
        node = cluster.add_node(num_cpus=ranks, resources={"segr1_learner": ranks})
        learner_nodes[node.node_id] = node
    cluster.add_node(num_cpus=1, resources={"segr1_rollout": 1})
    cluster.add_node(num_cpus=1, resources={"segr1_reward": 1})
    return cluster, learner_nodes


def _lose_the_learners_node(ray, cluster, learner_nodes, cfg, held: int) -> dict:
    """Run the job, remove the ranks' node inside step held+1, stop once that step is trained after all."""
    from tests.e2e.conftest import wait_for
    from tests.e2e.run_control import (
        start_gate,
        start_held_job,
        stop_run,
        wait_dead,
        wait_for_line,
        wait_held,
    )

    run_dir = Path(cfg.metrics.run_dir)
    gate = start_gate(ray, "node-loss-gate")
    driver, run_ref = start_held_job(cfg, "node-loss-gate", held)
    wait_held(ray, gate, 400, f"step {held + 1}'s scoring held at the gate", run_ref)
    before = _learner_node(ray)
    assert before, "no live placement group of the learner ranks on one node"
    ns = cfg.placement.namespace
    ranks = [ray.get_actor(f"learner-{i}", namespace=ns) for i in range(cfg.learner.ranks)]
    cluster.remove_node(learner_nodes[before])
    for rank in ranks:
        wait_dead(ray, rank, 120, "the learner ranks of the removed node to be dead")
    ray.get(gate.open.remote(), timeout=60)
    what = f"step {held + 1} trained after the restart"
    wait_for_line(run_dir, lambda r: r["step"] > held, 400, what, run_ref)
    after = wait_for(lambda: _learner_node(ray), 30, "the restarted learner ranks' node")
    summary = stop_run(ray, driver, run_ref, timeout=600)
    return {"summary": summary, "before": before, "after": after, "learner_nodes": list(learner_nodes)}


def main(out: str, held: int, overrides: list[str]) -> None:
    import ray

    from cluster.config import load_config
    from tests.e2e.conftest import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG, [*overrides, "placement.mode=disaggregated"])
    cluster, learner_nodes = _start_cluster(cfg.learner.ranks)
    ray.init(address=cluster.address, namespace=cfg.placement.namespace, log_to_driver=False)
    try:
        result = _lose_the_learners_node(ray, cluster, learner_nodes, cfg, held)
        Path(out).write_text(json.dumps(result))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
