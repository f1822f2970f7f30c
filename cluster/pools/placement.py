"""Where every actor of a training job runs, made visible, and checked before anything is placed.

- `Placement` (the driver): the node (id and IP) of every actor, `driver`, `learner-<r>`, `rollout-<i>`,
  `reward-<i>`, in summary.json["placement"] = {actor: {"node_id", "node_ip", "pool"}} and as the Prometheus gauge
  `segr1_actor_info{actor,pool,node_id,node_ip} 1` (exported as `ray_segr1_actor_info`). An actor restarted
  elsewhere (a node lost) is located again: its old series drops to 0, the new one is 1.
- `check_pool_resources` (cluster/launch.py, before the driver starts): in disaggregated mode every pool's custom
  resource must be advertised by some node, else the job fails at once naming the resource and the KubeRay worker
  group that should advertise it, instead of an actor pending forever.
- `start_phases` (the driver's start, cluster/driver/start.py): which pools start together, in which order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import ray

from cluster.config import ConfigError, TrainConfig
from cluster.pools.actor_pool import ActorPool
from cluster.pools.metrics import ACTOR_INFO
from cluster.pools.topology import DRIVER_RESOURCE, POOL_RESOURCES, requested_cpus

logger = logging.getLogger(__name__)


# The KubeRay group of cluster/k8s/raycluster-*.yaml that advertises each resource (rayStartParams.resources).
_GROUP = {DRIVER_RESOURCE: "the head group (headGroupSpec)"}
_GROUP.update({res: f"the worker group `{pool}`" for pool, res in POOL_RESOURCES.items()})


def check_pool_resources(cfg: TrainConfig) -> None:
    """Disaggregated placement: each resource the actors ask for exists somewhere in the cluster. Any mode: warn
    when the pools ask for more CPUs than the cluster has now (some actors then wait for capacity)."""
    have = ray.cluster_resources()
    want = requested_cpus(cfg)
    if want > have.get("CPU", 0):
        logger.warning(
            "the pools ask for %g CPUs (rollout, reward, learner resources.num_cpus) but the cluster has %g now: "
            "some actors wait until capacity appears (`ray start --num-cpus %d`, or an autoscaler)",
            want,
            have.get("CPU", 0),
            math.ceil(want),
        )
    if cfg.placement.mode != "disaggregated":
        return
    missing = [res for res in (DRIVER_RESOURCE, *POOL_RESOURCES.values()) if have.get(res, 0) <= 0]
    if missing:
        lines = [f"  {res}: {_GROUP[res]} must advertise it" for res in missing]
        raise ConfigError(
            "placement.mode=disaggregated: no node of this Ray cluster advertises "
            + ", ".join(missing)
            + "; its actors would wait forever.\n"
            + "\n".join(lines)
            + "\n(rayStartParams.resources in cluster/k8s/raycluster-*.yaml, or `ray start --resources "
            "'{\"segr1_rollout\": 1}'`; a group scaled to 0 replicas advertises nothing), or run with "
            "placement.mode=colocated"
        )


def shares_gpu(cfg: TrainConfig) -> bool:
    """Whether vLLM rollout engines may share a GPU with the learner or the reward workers: colocated placement
    with fractional GPU requests, which Ray packs onto one device (a whole-GPU request gets a device of its own;
    disaggregated pools run on different nodes)."""
    if cfg.placement.mode != "colocated" or cfg.rollout.engine != "vllm":
        return False
    fractional = lambda section: 0 < section.resources.num_gpus < 1  # noqa: E731
    return fractional(cfg.rollout) and (fractional(cfg.learner) or fractional(cfg.reward))


def start_phases(cfg: TrainConfig) -> tuple[tuple[str, ...], ...]:
    """The pools (learner, rollout, reward) started together, phase by phase: every actor of a phase has
    finished starting (constructed, its on_start done) before the next phase is created. Where vLLM shares a
    GPU, the rollout engines start alone first: vLLM measures the device's free memory while it profiles
    (vllm/v1/worker/gpu_worker.py determine_available_memory), so a learner or SAM2 loading meanwhile would
    shrink its KV cache, possibly to nothing, or trip its profiling assertion. Elsewhere all three start at once."""
    if shares_gpu(cfg):
        return (("rollout",), ("learner", "reward"))
    return (("learner", "rollout", "reward"),)


def _where(_instance: Any) -> dict:
    """Runs inside an actor (handle.__ray_call__): the node it is on."""
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


class Placement:
    """The node of every actor of the job, kept current as pools restart or resize their actors."""

    def __init__(self, learner_ranks: Callable[[], dict[str, Any]], pools: tuple[ActorPool, ...]):
        """learner_ranks() -> {rank name: handle} of the current learner group (a restarted group has new ones)."""
        self.actors: dict[str, dict] = {}
        self._learner_ranks = learner_ranks
        self._handles: dict[str, Any] = {}  # actor -> the handle last located
        self._pending: dict[Any, tuple[str, str, Any]] = {}  # ObjectRef of _where -> (actor, pool, handle)
        self._record("driver", "driver", _where(None))
        self._pools = pools
        self.refresh(pools)

    def refresh(self, pools: tuple[ActorPool, ...]) -> None:
        """Locate new or replaced actors (non-blocking) and record what has answered meanwhile."""
        named = [("learner", self._learner_ranks())] + [(pool.prefix, pool.handles()) for pool in pools]
        for prefix, handles in named:
            for name, handle in handles.items():
                if self._handles.get(name) is not handle:
                    self._locate(name, prefix, handle)
        self._collect(timeout=0)

    def summary(self, timeout: float = 10.0) -> dict:
        """{actor: {"node_id", "node_ip", "pool"}} (waits up to `timeout` s for actors still being located; a
        replacement still starting has node_id None: it is not where its predecessor was)."""
        self.refresh(self._pools)
        self._collect(timeout)
        return {name: dict(info) for name, info in sorted(self.actors.items())}

    def _locate(self, name: str, pool: str, handle: Any) -> None:
        old = self.actors.get(name)
        if old is not None and self._handles.get(name) is not None and self._handles[name] is not handle:
            # a replacement: its predecessor's node is no longer where `name` runs (None until it answers)
            if old["node_id"] is not None:
                ACTOR_INFO.set(0, actor=name, pool=pool, node_id=old["node_id"], node_ip=old["node_ip"])
            self.actors[name] = {"node_id": None, "node_ip": None, "pool": pool}
        self._handles[name] = handle
        self._pending[handle.__ray_call__.remote(_where)] = (name, pool, handle)

    def _collect(self, timeout: float) -> None:
        if not self._pending:
            return
        refs = list(self._pending)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in ready:
            name, pool, handle = self._pending.pop(ref)
            if self._handles.get(name) is not handle:  # a predecessor's late answer
                continue
            try:
                self._record(name, pool, ray.get(ref))
            except Exception as err:  # died before answering: its replacement is located instead
                logger.debug("placement of %s unknown: %s", name, err)

    def _record(self, name: str, pool: str, where: dict) -> None:
        old = self.actors.get(name)
        moved = old is not None and old["node_id"] is not None
        if moved and (old["node_id"], old["node_ip"]) != (where["node_id"], where["node_ip"]):
            ACTOR_INFO.set(0, actor=name, pool=pool, node_id=old["node_id"], node_ip=old["node_ip"])
        self.actors[name] = {**where, "pool": pool}
        ACTOR_INFO.set(1, actor=name, pool=pool, node_id=where["node_id"], node_ip=where["node_ip"])
