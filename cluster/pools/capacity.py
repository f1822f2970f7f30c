"""The sizes of the rollout and reward pools while a job runs (docs/scaling.md).

Each pool's size is decided between steps, by the driver's loop thread, from two inputs:
- the size asked by hand (`segr1 scale`, i.e. `TrainDriver.request_resize`), bounded by 1..max_workers;
  without one, the pool's ceiling is `max_workers` (None: num_workers);
- in disaggregated mode, the cluster's capacity: the units of the pool's resource (`segr1_rollout`,
  `segr1_reward`, which the KubeRay worker groups advertise) on the alive nodes, read at most every
  `placement.capacity_interval_s` seconds. The pool grows into new capacity up to its ceiling and shrinks to what
  is left when a node is drained or removed (never below one actor).
Colocated mode has no per-pool capacity: the pools keep their sizes unless asked by hand.

`request` runs on another thread of the driver actor (max_concurrency 2): it records the sizes and waits until the
loop applied them, so the caller gets the sizes after the change.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import ray

from cluster.config import TrainConfig
from cluster.pools.actor_pool import ActorPool
from cluster.pools.topology import POOL_RESOURCES

logger = logging.getLogger(__name__)

SCALED_POOLS = ("rollout", "reward")


def pool_bounds(cfg: TrainConfig, pool: str) -> tuple[int, int]:
    """(num_workers, max_workers) of `pool`: the size at start and the most it may be scaled to."""
    section = getattr(cfg, pool)
    return section.num_workers, section.max_workers or section.num_workers


def units_per_actor(cfg: TrainConfig, pool: str) -> float:
    """Units of the pool's resource one actor takes (cluster/pools/topology.py adds 1 unless the config sets it)."""
    return float(getattr(cfg, pool).resources.custom.get(POOL_RESOURCES[pool], 1))


def capacity_of(cfg: TrainConfig, pool: str, resources: dict[str, float] | None = None) -> int | None:
    """Actors of `pool` the alive nodes can hold (None in colocated mode: no per-pool resource)."""
    if cfg.placement.mode != "disaggregated":
        return None
    if resources is None:
        resources = ray.cluster_resources()  # totals of the alive nodes
    return math.floor(resources.get(POOL_RESOURCES[pool], 0.0) / units_per_actor(cfg, pool) + 1e-9)


def check_request(cfg: TrainConfig, sizes: dict[str, int | None]) -> dict[str, int]:
    """The sizes asked for, each within 1..max_workers, or a ValueError naming the key to raise."""
    asked = {}
    for pool, n in sizes.items():
        if n is None:
            continue
        if pool not in SCALED_POOLS:
            raise ValueError(f"unknown pool {pool!r}: scale one of {', '.join(SCALED_POOLS)}")
        most = pool_bounds(cfg, pool)[1]
        if not 1 <= n <= most:
            raise ValueError(
                f"{pool} pool size {n} is outside 1..{most} ({pool}.max_workers); raise {pool}.max_workers "
                "in the job's config to scale further"
            )
        asked[pool] = int(n)
    if not asked:
        raise ValueError("nothing to scale: give a size for rollout and/or reward")
    return asked


class PoolSizer:
    """Applies hand-asked sizes and, in disaggregated mode, follows the cluster's capacity (see module doc)."""

    def __init__(
        self,
        cfg: TrainConfig,
        pools: dict[str, ActorPool],
        resources: Callable[[], dict[str, float]] = ray.cluster_resources,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self.pools = pools
        self._resources = resources
        self._clock = clock
        self._follow = cfg.placement.mode == "disaggregated"
        self._lock = threading.Condition()
        self._asked: dict[str, int] = {}
        self._asked_seq = self._applied_seq = 0
        self.capacity: dict[str, int | None] = dict.fromkeys(pools)  # at the last read
        self._next_read = 0.0
        self._sizes = {pool: p.size for pool, p in pools.items()}  # read by other threads

    def target(self, pool: str) -> int:
        """The size `pool` should have now."""
        asked = self._asked.get(pool)
        if not self._follow:
            return asked or self.pools[pool].size
        ceiling = asked or pool_bounds(self.cfg, pool)[1]
        room = self.capacity.get(pool)
        return max(1, ceiling if room is None else min(ceiling, room))

    def sizes(self) -> dict[str, int]:
        """The pools' sizes at the last `apply` (safe to read from any thread)."""
        with self._lock:
            return dict(self._sizes)

    def apply(self) -> list[str]:
        """Resize the pools that are off their target; returns the names of those resized. Loop thread only."""
        now = self._clock()
        with self._lock:
            seq = self._asked_seq
            fresh = seq != self._applied_seq
        if self._follow and (fresh or now >= self._next_read):
            resources = self._resources()
            self.capacity = {pool: capacity_of(self.cfg, pool, resources) for pool in self.pools}
            self._next_read = now + self.cfg.placement.capacity_interval_s
        changed = []
        for pool, p in self.pools.items():
            n = self.target(pool)
            if n != p.size:
                logger.info("%s pool: %d -> %d workers (capacity %s)", pool, p.size, n, self.capacity[pool])
                p.resize(n)
                changed.append(pool)
        with self._lock:
            self._applied_seq = seq
            self._sizes = {pool: p.size for pool, p in self.pools.items()}
            self._lock.notify_all()
        return changed

    def request(self, sizes: dict[str, int | None], timeout: float = 120.0) -> dict:
        """Ask for pool sizes (checked against max_workers); waits until the loop applied them. Any thread."""
        asked = check_request(self.cfg, sizes)
        before = self.sizes()
        with self._lock:
            self._asked.update(asked)
            self._asked_seq += 1
            seq = self._asked_seq
            applied = self._lock.wait_for(lambda: self._applied_seq >= seq, timeout=timeout)
        return {"before": before, "after": self.sizes(), "asked": asked, "applied": applied}
