"""What losing a rollout node costs a run, in wall time (the figure tests/e2e/test_multinode.py used to assert,
moved here: a test must not depend on how fast or loaded the machine is):

    python bench/node_loss.py --out bench/results/node_loss_cpu.json

tests/e2e/test_multinode.py's layout and job on a `ray.cluster_utils.Cluster` on this machine: a head advertising
segr1_driver (node health checked every second), two rollout nodes with room for 2 rollout workers each, a reward
node (2), a learner node; disaggregated placement, the async preset with two workers per pool, the transformers
engine. The same job runs twice, `--steps` steps each: undisturbed, and with the node holding `rollout-0` removed
(a crash: raylet and workers killed) after `--remove-at` steps, its worker restarted on the other rollout node.
The time lost = wall of the disturbed run - wall of the undisturbed one; the target is under 30 s. The policy and
data are bench/e2e.py's --quick ones; the JSON records the load average (every process shares the machine's cores
with whatever else runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from e2e import QUICK, bench_config, build_policy  # noqa: E402  (bench/e2e.py: its env, --quick policy, config)
from elastic import _metrics, _wait  # noqa: E402  (bench/elastic.py: metrics.jsonl lines, a polled wait)

TARGET_S = 30.0
NAMESPACE = "segr1-bench-node-loss"
OVERRIDES = [
    "grpo.mode=async",
    "placement.mode=disaggregated",
    f"placement.namespace={NAMESPACE}",
    "rollout.num_workers=2",
    "reward.num_workers=2",
    "rollout.engine=hf",
]


def _cluster():
    from ray.cluster_utils import Cluster

    head = {
        "num_cpus": 1,
        "resources": {"segr1_driver": 1},
        "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000},  # as the test: a lost node is seen in ~5 s
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(num_cpus=1, resources={"segr1_learner": 1})
    cluster.add_node(num_cpus=1, resources={"segr1_reward": 2})
    return cluster


def _node_of(ray, actor: str) -> str:
    handle = ray.get_actor(actor, namespace=NAMESPACE)
    return ray.get(
        handle.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()), timeout=120
    )


def run_once(ray, cluster, cfg, remove_at: int | None) -> dict:
    """One run on two fresh rollout nodes; with remove_at, the node of rollout-0 goes after that many steps."""
    from cluster.launch import spawn_driver_actor

    nodes = [cluster.add_node(num_cpus=1, resources={"segr1_rollout": 2}) for _ in range(2)]
    cluster.wait_for_nodes()
    driver = spawn_driver_actor(cfg)
    run_ref = driver.run.remote()
    at_step = None
    if remove_at is not None:
        run_dir = Path(cfg.metrics.run_dir)
        _wait(lambda: len(_metrics(run_dir)) >= remove_at, 900, f"step {remove_at}")
        victim = _node_of(ray, "rollout-0")
        at_step = len(_metrics(run_dir))
        cluster.remove_node(next(n for n in nodes if n.node_id == victim), allow_graceful=False)
        nodes = [n for n in nodes if n.node_id != victim]
    summary = ray.get(run_ref, timeout=1800)
    ray.get(driver.close.remote(), timeout=120)
    ray.kill(driver, no_restart=True)
    for node in nodes:
        cluster.remove_node(node)
    assert summary["groups_lost"] == 0 and summary["steps"] == cfg.grpo.steps, summary
    out = {"wall_s": round(summary["wall_s"], 1), "actor_restarts": summary["actor_restarts"]}
    if at_step is not None:
        out["removed_after_step"] = at_step  # == steps: the run ended before the removal (raise --steps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, what in (
        ("--steps", 6, "grpo.steps of both runs"),
        ("--remove-at", 2, "step after which rollout-0's node goes"),
    ):
        p.add_argument(flag, type=int, default=default, help=what)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "node_loss_cpu.json")
    p.add_argument("--work", type=Path, default=None, help="folder for the policy, data and runs (cached)")
    args = p.parse_args(argv)
    import ray

    work = args.work or Path(tempfile.mkdtemp(prefix="segr1-node-loss-"))
    policy, data = build_policy(work, QUICK, None)
    s = {**QUICK, "steps": args.steps}
    cluster = _cluster()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        result = {}
        for name, remove_at in (("undisturbed", None), ("node_lost", args.remove_at)):
            cfg = bench_config(policy, data, work / name, s, OVERRIDES)
            result[name] = run_once(ray, cluster, cfg, remove_at)
    finally:
        ray.shutdown()
        cluster.shutdown()
    lost_s = round(result["node_lost"]["wall_s"] - result["undisturbed"]["wall_s"], 1)
    result.update(
        lost_s=lost_s, target_s=TARGET_S, met=lost_s < TARGET_S, steps=args.steps, remove_at=args.remove_at,
        load_average=os.getloadavg(), cpus=os.cpu_count(),
        config="bench/e2e.py --quick policy, async, disaggregated, 2 workers per pool, transformers engine",
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"undisturbed {result['undisturbed']['wall_s']} s, rollout node lost {result['node_lost']['wall_s']} s "
        f"(+{lost_s} s; target < {TARGET_S:.0f} s: {'met' if lost_s < TARGET_S else 'NOT met'})"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
