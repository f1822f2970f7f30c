"""The driver's scaling hooks in one object: pool sizes (cluster/pools/capacity.py), the learner's waits and the
autoscaling policy (cluster/pools/autoscale.py), and their metrics. TrainDriver calls `apply` between pipeline rounds,
`waited` after each wait of its loop, `step_done` after each optimiser step and `close` at the end. With
placement.autoscale on, the job's request to Ray's autoscaler stands from the driver's start (the policy's floor)
to `close` (docs/scaling.md)."""

from __future__ import annotations

import logging
import time

from cluster.config import TrainConfig
from cluster.pools import metrics as PM
from cluster.pools.actor_pool import ActorPool
from cluster.pools.autoscale import AutoscalePolicy, RayCapacityRequest, WaitClock
from cluster.pools.capacity import SCALED_POOLS, PoolSizer, pool_bounds

logger = logging.getLogger(__name__)


class Elastic:
    def __init__(self, cfg: TrainConfig, pools: dict[str, ActorPool], request=None):
        self.cfg = cfg
        self.pools = pools
        self.sizer = PoolSizer(cfg, pools)
        self.clock = WaitClock(SCALED_POOLS)
        self.shares = dict.fromkeys(SCALED_POOLS, 0.0)
        bounds = {pool: pool_bounds(cfg, pool) for pool in SCALED_POOLS}
        settings = cfg.placement.autoscale
        self.policy = AutoscalePolicy(settings, bounds) if settings.enabled else None
        self._request = request or (RayCapacityRequest(cfg) if self.policy else None)
        self.decisions: list[dict] = []
        if self.policy is not None:  # the standing request, from the start: nobody has to ask by hand
            logger.info(
                "autoscale: asking Ray's autoscaler for %s (placement.autoscale.floor)", self.policy.wanted
            )
            self._request(self.policy.wanted)
        self._export()

    def apply(self) -> list[str]:
        """Resize the pools to their targets now; the names of the pools resized."""
        changed = self.sizer.apply()
        if changed:
            self._export()
        return changed

    def waited(self, seconds: float, scoring: bool) -> None:
        self.clock.charge(seconds, scoring)

    def step_line(self, step: int, step_s: float) -> dict:
        """Close the step's wait accounting, run the autoscaling policy; the step's metrics.jsonl figures."""
        shares = self.step_done(step, step_s)
        out = {f"{pool}_workers": p.size for pool, p in self.pools.items()}
        out.update({f"wait_{pool}_share": shares[pool] for pool in self.pools})
        return out

    def step_done(self, step: int, step_s: float) -> dict[str, float]:
        """Close the step's wait accounting, run the autoscaling policy; the step's wait shares."""
        self.shares = self.clock.take(step_s)
        if self.policy is not None:
            decisions = self.policy.observe(self.shares, time.monotonic())
            for d in decisions:
                logger.info(
                    "autoscale: %s %s to %d units (step %d): %s", d.pool, d.direction, d.units, step, d.reason
                )
                PM.SCALE_DECISIONS.inc(pool=d.pool, direction=d.direction)
                self.decisions.append(
                    {"step": step, "pool": d.pool, "direction": d.direction, "units": d.units}
                )
            if decisions:
                self._request(self.policy.wanted)
        self._export()
        return self.shares

    def request_resize(self, rollout: int | None, reward: int | None) -> dict:
        return self.sizer.request({"rollout": rollout, "reward": reward})

    def close(self) -> None:
        """Release the autoscaler request this job made (the capacity goes back when the job ends)."""
        if self.policy is not None:
            try:
                self._request.release()
            except Exception as err:  # the cluster may be going away with the job
                logger.warning("autoscale: releasing the capacity request failed: %s", err)

    def _export(self) -> None:
        for pool, p in self.pools.items():
            PM.POOL_SIZE.set(p.size, pool=pool)
            PM.WAIT_SHARE.set(self.shares.get(pool, 0.0), pool=pool)
            room = self.sizer.capacity.get(pool)
            if room is not None:
                PM.POOL_CAPACITY.set(room, pool=pool)
            if self.policy is not None:
                PM.AUTOSCALE_REQUESTED.set(self.policy.wanted[pool], pool=pool)
