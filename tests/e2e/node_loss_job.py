"""The node-loss scenario of tests/e2e/test_learner_group.py, run in its own process (a `ray.cluster_utils.Cluster`
cannot share a process with the test session's local Ray):

    python -m tests.e2e.node_loss_job OUT.json key.sub=value ...

A head (advertising segr1_driver, no CPUs), two nodes advertising segr1_learner (room for every rank on each),
one segr1_rollout node and one segr1_reward node, placement disaggregated. Once step 3 is logged, the node that
holds the learner ranks is removed; the job must restart its group on the other learner node. Writes the summary
and the node ids (before / after) to OUT.json.
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


def main(out: str, overrides: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from cluster.config import load_config
    from cluster.launch import spawn_driver_actor
    from tests.e2e.conftest import DEMO_CONFIG, read_metrics, wait_for

    cfg = load_config(DEMO_CONFIG, [*overrides, "placement.mode=disaggregated"])
    ranks = cfg.learner.ranks
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
    ray.init(address=cluster.address, namespace=cfg.placement.namespace, log_to_driver=False)
    try:
        run_dir = Path(cfg.metrics.run_dir)
        driver = spawn_driver_actor(cfg)
        run_ref = driver.run.remote()
        wait_for(lambda: len(read_metrics(run_dir)) >= 3, 400, "step 3 in metrics.jsonl", every=0.05)
        before = wait_for(lambda: _learner_node(ray), 30, "the learner ranks' node")
        cluster.remove_node(learner_nodes[before])
        summary = ray.get(run_ref, timeout=600)
        after = _learner_node(ray)  # before close(): closing the driver frees the group's placement
        ray.get(driver.close.remote(), timeout=120)
        result = {"summary": summary, "before": before, "after": after, "learner_nodes": list(learner_nodes)}
        Path(out).write_text(json.dumps(result))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
