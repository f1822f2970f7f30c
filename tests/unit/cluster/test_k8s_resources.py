"""cluster/k8s: Ray's own reading of each RayCluster (the autoscaler's) gives the resources we meant, each pool
group advertises its pool's resource, every actor of the shipped training config fits on its cluster, each pod's
object store holds what `segr1 plan` says it must, and the pools' max_workers equal their groups' bounds.
"""

from __future__ import annotations

import pytest

from tests.support.k8s_checks import check_bounds, check_object_store
from tests.support.kuberay import (
    DRIVER_RESOURCE,
    EXAMPLES,
    RayClusterSpec,
    Volume,
    VolumeMount,
    ray_node_types,
    raycluster,
    rayjob,
    train_config,
    worker_groups,
)

# ----------------------------------------------------------------------------------------------------------------
# Ray reads the resources we meant


@pytest.mark.parametrize("example", EXAMPLES)
def test_ray_reads_the_resources_we_meant(example):
    spec = raycluster(example).spec
    node_types = ray_node_types(f"segr1-{example}", spec)
    head = node_types.pop("headgroup")
    assert head["resources"].get("CPU", 0) == 0 and head["resources"].get("GPU", 0) == 0, (
        "the head runs no actors"
    )
    assert head["resources"].get(DRIVER_RESOURCE) == 1
    for name, group in worker_groups(spec).items():
        limits = group.template.spec.containers[0].resources.limits
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert gpus >= 1, f"{name}: every worker group of these examples is a GPU group"
        assert node_types[name]["resources"]["GPU"] == gpus, f"{name}: Ray sees a different GPU count"
        assert group.template.spec.tolerations, f"{name}: GPU nodes are usually tainted nvidia.com/gpu"


def test_each_pool_group_advertises_exactly_its_pool_resource():
    from cluster.pools.topology import POOL_RESOURCES

    assert set(POOL_RESOURCES.values()) == {"segr1_rollout", "segr1_reward", "segr1_learner"}
    seen = set()
    for example in EXAMPLES:
        spec = raycluster(example).spec
        node_types = ray_node_types(f"segr1-{example}", spec)
        for name in worker_groups(spec):
            custom = {k for k in node_types[name]["resources"] if k.startswith("segr1_")}
            if name in POOL_RESOURCES:
                assert custom == {POOL_RESOURCES[name]}, f"{example}/{name} advertises {custom}"
                seen.add(name)
            else:
                assert not custom, f"{example}/{name} is no pool group but advertises {custom}"
    assert seen == set(POOL_RESOURCES), "the disaggregated example needs rollout, reward and learner groups"


# ----------------------------------------------------------------------------------------------------------------
# The training config fits the cluster it is shipped with


def _demand(options: dict) -> dict[str, float]:
    return {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}


def _pack(demands: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[dict[str, float]] | None:
    """First-fit of actor demands onto node capacities; the unplaceable demands, or None when all fit."""
    free = [dict(n) for n in nodes]
    left = []
    for d in demands:
        for node in free:
            if all(node.get(k, 0) >= v - 1e-9 for k, v in d.items() if v > 0):
                for k, v in d.items():
                    node[k] = node.get(k, 0) - v
                break
        else:
            left.append(d)
    return left or None


def _nodes(spec: RayClusterSpec, node_types: dict[str, dict], at_most: bool) -> list[dict[str, float]]:
    """Ray resources of every node: the head plus `replicas` (at start) or `maxReplicas` pods per group."""
    out = [dict(node_types["headgroup"]["resources"])]
    for name, group in worker_groups(spec).items():
        n = (
            group.maxReplicas
            if at_most
            else (group.replicas if group.replicas is not None else group.minReplicas)
        )
        out += [dict(node_types[name]["resources"])] * n
    return out


@pytest.mark.parametrize("example", EXAMPLES)
def test_config_matches_its_cluster(example):
    from cluster.pools.topology import POOL_RESOURCES

    cluster, cfg = raycluster(example), train_config(example)
    groups = worker_groups(cluster.spec)
    if cfg.placement.mode == "disaggregated":
        assert set(POOL_RESOURCES) <= set(groups), "disaggregated needs one worker group per pool"
        assert cluster.spec.enableInTreeAutoscaling, (
            "the rollout group scales on its own through the autoscaler"
        )
        rollout = groups["rollout"]
        assert (cfg.rollout.max_workers or cfg.rollout.num_workers) <= rollout.maxReplicas
        assert cfg.rollout.num_workers <= (rollout.replicas or rollout.minReplicas)
        assert cfg.reward.num_workers <= (groups["reward"].replicas or groups["reward"].minReplicas)
        assert cfg.weight_sync.backend in ("auto", "nccl"), "pools on different pods sync weights over NCCL"
        # learner.resources are per rank: the ranks together reserve the learner's GPUs, all on the learner group
        assert cfg.learner.resources.num_gpus * cfg.learner.ranks == cfg.learner.num_gpus
        limits = groups["learner"].template.spec.containers[0].resources.limits
        assert cfg.learner.num_gpus <= int(limits["nvidia.com/gpu"]) * groups["learner"].maxReplicas
    else:
        assert not set(POOL_RESOURCES) & set(groups), "a colocated example has no per-pool groups"


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_actor_of_the_config_fits_on_the_cluster(example):
    from cluster.pools.topology import actor_options

    cluster, cfg = raycluster(example), train_config(example)
    node_types = ray_node_types(f"segr1-{example}", cluster.spec)

    def demands(rollout_workers: int) -> list[dict[str, float]]:
        learner = _demand(actor_options(cfg, "learner", cfg.learner.resources))  # one learner rank
        reward = _demand(actor_options(cfg, "reward", cfg.reward.resources))
        rollout = _demand(actor_options(cfg, "rollout", cfg.rollout.resources))
        # biggest first, as a scheduler would have to manage
        ranks = [learner] * cfg.learner.ranks
        return ranks + [reward] * cfg.reward.num_workers + [rollout] * rollout_workers

    left = _pack(demands(cfg.rollout.num_workers), _nodes(cluster.spec, node_types, at_most=False))
    assert left is None, f"{example}: at start these actors find no node: {left}"
    most = cfg.rollout.max_workers or cfg.rollout.num_workers
    left = _pack(demands(most), _nodes(cluster.spec, node_types, at_most=True))
    assert left is None, f"{example}: at rollout.max_workers={most} these actors find no node: {left}"


# ----------------------------------------------------------------------------------------------------------------
# Ray's object store against the memory plan; the pools' bounds against the groups'


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_pods_object_store_holds_what_the_plan_says(example):
    from cluster.plan.report import build_plan

    cfg = train_config(example)
    plan = build_plan(cfg)
    rollout = next(p for p in plan.object_store if p.pool == "rollout")
    assert rollout.terms[0].name == "weight version" and rollout.terms[0].bytes > 0
    for spec in (raycluster(example).spec, rayjob(example).spec.rayClusterSpec):
        assert check_object_store(spec, cfg, plan) == []


def test_a_16gi_dev_shm_cannot_hold_the_7b_weight_version():
    """issue 29: the rollout pods' own 16Gi /dev/shm capped Ray's object store at 0.95 x 16 GiB = 15.2 GiB, less
    than one bf16 version of the 7B policy (16.6 GB): a catch-up spilled to disk."""
    from cluster.plan.report import build_plan

    cfg = train_config("qwen7b-8gpu")
    spec = raycluster("qwen7b-8gpu").spec.model_copy(deep=True)
    rollout = worker_groups(spec)["rollout"].template.spec
    rollout.volumes.append(Volume(name="dshm", emptyDir={"medium": "Memory", "sizeLimit": "16Gi"}))
    rollout.containers[0].volumeMounts.append(VolumeMount(name="dshm", mountPath="/dev/shm"))
    (problem,) = check_object_store(spec, cfg, build_plan(cfg))
    assert (
        problem.startswith("rollout: Ray's object store is 15.2 GiB (/dev/shm 16.0 GiB")
        and "15.59 GiB" in problem
    )


@pytest.mark.parametrize("example", EXAMPLES)
def test_pool_bounds_equal_their_groups_max_replicas(example):
    """<pool>.max_workers of the config (set with the autoscaler, docs/scaling.md) == maxReplicas x actors per pod."""
    assert check_bounds(raycluster(example).spec, train_config(example), f"{example}.yaml") == []


def test_a_bound_that_differs_from_max_replicas_names_both():
    cfg = train_config("qwen7b-8gpu").model_copy(deep=True)
    cfg.reward.max_workers = 1
    (problem,) = check_bounds(raycluster("qwen7b-8gpu").spec, cfg, "qwen7b-8gpu.yaml")
    assert problem == (
        "qwen7b-8gpu.yaml: reward.max_workers=1 but worker group reward holds at most maxReplicas 2 x 1 actor(s) "
        "per pod = 2; set reward.max_workers: 2 or change maxReplicas"
    )
