"""Asking Ray's autoscaler for rollout and reward capacity (placement.autoscale; off by default, on in the
cluster configs; docs/scaling.md).

- `WaitClock` (driver hooks): while the learner has nothing to train, the driver's loop waits in `_advance`; each
  wait is charged to the reward pool when groups sit in scoring (the reward pool holds work), else to the
  rollout pool. `take(step_s)` gives each pool's share of the step's time and starts the next step.
- `AutoscalePolicy` (pure: decisions from shares and a clock): each pool starts wanting its floor
  (`placement.autoscale.floor`: num_workers, or max_workers). A pool whose mean wait share over `window` steps
  exceeds `wait_share` gets one more unit requested (up to max_workers); a pool whose share stayed below
  `idle_share` for `idle_window` steps gives one requested unit back (down to its floor). After a decision the
  pool's history starts again and no other decision is taken for it for `cooldown_s` (hysteresis).
- `RayCapacityRequest` (the thin Ray adapter): hands the TOTAL wanted to Ray's autoscaler with
  `ray.autoscaler.sdk.request_resources(bundles=[...])`, one bundle per wanted actor of each pool (its pool
  resource and CPUs/GPUs); on KubeRay that adds pods of the pool's worker group until the bundles fit. The
  request stands from the job's start (so a group scaled down while no job ran comes back) and is replaced at
  each decision; `release` (the job's end) sends an empty request.
The pools themselves grow into the new capacity (cluster/pools/capacity.py): no actor waits unplaced for a node.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cluster.config import AutoscaleConfig, TrainConfig
from cluster.pools.topology import POOL_RESOURCES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    pool: str
    direction: str  # up | down
    units: int  # the pool's total requested after this decision
    share: float  # the mean wait share that decided it
    reason: str


class WaitClock:
    """Seconds the learner waited on each pool during the current step."""

    def __init__(self, pools: tuple[str, ...] = ("rollout", "reward")):
        self.waited = dict.fromkeys(pools, 0.0)

    def charge(self, seconds: float, scoring: bool) -> None:
        """A wait of the learner: on the reward pool when groups were being scored, else on the rollout pool."""
        self.waited["reward" if scoring else "rollout"] += max(0.0, seconds)

    def take(self, step_s: float) -> dict[str, float]:
        """Each pool's share (0..1) of a step of `step_s` seconds; resets for the next step."""
        shares = {p: min(1.0, w / step_s) if step_s > 0 else 0.0 for p, w in self.waited.items()}
        self.waited = dict.fromkeys(self.waited, 0.0)
        return shares


class AutoscalePolicy:
    """Decides, step by step, how many units of each pool to ask the cluster for (see module doc)."""

    def __init__(self, settings: AutoscaleConfig, bounds: dict[str, tuple[int, int]]):
        self.settings = settings
        self.bounds = bounds  # pool -> (least: num_workers, most: max_workers)
        at_max = settings.floor == "max_workers"
        self.floors = {pool: hi if at_max else lo for pool, (lo, hi) in bounds.items()}  # never asked below
        self.wanted = dict(self.floors)
        keep = max(settings.window, settings.idle_window)
        self._history = {pool: deque(maxlen=keep) for pool in bounds}
        self._last: dict[str, float | None] = dict.fromkeys(bounds)

    def observe(self, shares: dict[str, float], now: float) -> list[Decision]:
        """One step's wait shares; returns the decisions taken (at most one per pool)."""
        out = []
        for pool in self.bounds:
            self._history[pool].append(float(shares.get(pool, 0.0)))
            decision = self._decide(pool, now)
            if decision is not None:
                self.wanted[pool] = decision.units
                self._history[pool].clear()
                self._last[pool] = now
                out.append(decision)
        return out

    def _decide(self, pool: str, now: float) -> Decision | None:
        s, hi = self.settings, self.bounds[pool][1]
        last = self._last[pool]
        if last is not None and now - last < s.cooldown_s:
            return None
        history, wanted = list(self._history[pool]), self.wanted[pool]
        recent = history[-s.window :]
        if len(recent) == s.window and wanted < hi:
            share = sum(recent) / len(recent)
            if share > s.wait_share:
                why = f"learner waited {share:.0%} of the last {s.window} steps on it (> {s.wait_share:.0%})"
                return Decision(pool, "up", wanted + 1, share, why)
        idle = history[-s.idle_window :]
        if len(idle) == s.idle_window and wanted > self.floors[pool] and max(idle) < s.idle_share:
            share = sum(idle) / len(idle)
            why = f"wait share below {s.idle_share:.0%} for {s.idle_window} steps"
            return Decision(pool, "down", wanted - 1, share, why)
        return None


def pool_bundle(cfg: TrainConfig, pool: str) -> dict[str, float]:
    """The resource shape of one actor of `pool` on its KubeRay group (what the autoscaler must fit)."""
    section = getattr(cfg, pool)
    bundle = {POOL_RESOURCES[pool]: float(section.resources.custom.get(POOL_RESOURCES[pool], 1))}
    if section.resources.num_cpus:
        bundle["CPU"] = float(section.resources.num_cpus)
    if section.resources.num_gpus:
        bundle["GPU"] = float(section.resources.num_gpus)
    return bundle


class RayCapacityRequest:
    """Tells Ray's autoscaler the total each pool wants (`request_resources` replaces the previous request; the
    cluster holds one request at a time, so one job per cluster asks)."""

    def __init__(self, cfg: TrainConfig, send: Callable | None = None):
        if send is None:
            from ray.autoscaler.sdk import request_resources as send
        self.cfg = cfg
        self._send = send
        self.sent = False  # a request stands (release() clears it)

    def __call__(self, wanted: dict[str, int]) -> list[dict[str, float]]:
        """Request `wanted` actors of each pool in all (a standing request: the cluster keeps room for them)."""
        bundles = [pool_bundle(self.cfg, p) for p, n in wanted.items() for _ in range(n)]
        self._send(bundles=bundles)
        self.sent = True
        return bundles

    def release(self) -> None:
        """Withdraw the request (an empty one): the autoscaler may scale the idle groups down again."""
        if self.sent:
            self._send(bundles=[])
            self.sent = False
