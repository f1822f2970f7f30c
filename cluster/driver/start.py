"""Starting a job's learner group and rollout and reward pools, in the order the placement needs.

`start_workers` creates them phase by phase (cluster/pools/placement.py `start_phases`): where vLLM shares a GPU
with the learner or SAM2 (qwen3b-1gpu.yaml), the rollout engines are built and profiled (each actor's start, its
on_start ping included, has returned) before the learner and the reward workers are created; elsewhere all three
start at once. Each part is set on the driver as soon as it exists, so a start that fails part-way closes what had
started (cluster/launch.py DriverActor.close).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cluster.config import TrainConfig
from cluster.driver.weights import WeightPublisher
from cluster.pools.capacity import capacity_of
from cluster.pools.learner_group import LearnerGroup
from cluster.pools.placement import start_phases
from cluster.pools.topology import Workers, make_reward_pool, make_rollout_pool

logger = logging.getLogger(__name__)

# How long a phase may take to start before the next one starts anyway (a warning says so): engines that never
# finish (no room for an actor) must not hold the job's start forever; the pool reports their failure as usual.
PHASE_TIMEOUT_S = 1800.0


def start_workers(driver: Any, cfg: TrainConfig, classes: Workers, on_error: Callable) -> None:
    """Set driver.weights, .learner, .rollout and .reward. on_error(handle, err): the rollout pool's repair.
    driver.starting names the part being started ("learner", "rollout", "reward"; None once all are), so a failed
    start can be attributed (cluster/preflight.py)."""
    driver.weights = WeightPublisher(cfg)  # bound to the learner once it exists
    room = lambda pool: lambda: capacity_of(cfg, pool)  # noqa: E731  (dead actor: restart, or drop if no room)
    starters = {
        "learner": lambda: LearnerGroup.start(cfg, classes.learner),
        # a new or restarted rollout worker loads the current weights; one with stale weights is resynced
        "rollout": lambda: make_rollout_pool(
            cfg,
            classes.rollout,
            on_start=driver.weights.on_start,
            on_error=on_error,
            capacity=room("rollout"),
        ),
        "reward": lambda: make_reward_pool(cfg, classes.reward, capacity=room("reward")),
    }
    phases = start_phases(cfg)
    for i, phase in enumerate(phases):
        for part in phase:
            driver.starting = part
            setattr(driver, part, starters[part]())
        if i + 1 < len(phases):
            _wait_started(driver, phase, phases[i + 1])
    driver.starting = "learner"  # binding to the learner asks its backend: a first call to its ranks
    driver.weights.rebind(driver.learner)
    driver.starting = None


def _wait_started(driver: Any, phase: tuple[str, ...], then: tuple[str, ...]) -> None:
    logger.info("starting %s before %s (they share a GPU)", ", ".join(phase), ", ".join(then))
    for part in phase:
        if not getattr(driver, part).wait_started(timeout=PHASE_TIMEOUT_S):
            logger.warning(
                "the %s pool has not finished starting after %.0f s; starting %s anyway",
                part,
                PHASE_TIMEOUT_S,
                ", ".join(then),
            )
