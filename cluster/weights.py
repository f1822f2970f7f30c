"""Publishing the learner's weights to the rollout pool, as the driver sees it.

Backends (weight_sync.backend; `auto` is resolved by the learner: nccl on GPU, gloo on CPU, cuda-ipc when
colocated on one GPU):
- a process group (gloo / nccl / cuda-ipc): the learner's rank 0 and every rollout worker. Parameters go in flat
  buckets (runtime/weights/); a worker switches version only when every bucket arrived. The group is
  formed again (a new generation) whenever the pool's membership changes: a worker added, removed or restarted.
- object-store: the learner exports CPU copies once per version, put in Ray's object store, and every worker
  loads them. Also the path by which a new or restarted worker catches up before it serves, and the fallback
  when a broadcast fails because a member died mid-transfer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from cluster.config import TrainConfig
from cluster.learner_group import LearnerDied
from cluster.pool import ActorPool

logger = logging.getLogger(__name__)


class WeightPublisher:
    def __init__(self, cfg: TrainConfig, learner: Any):
        self.cfg = cfg
        self.version = 0
        self.rebind(learner)

    def rebind(self, learner: Any) -> None:
        """Publish from `learner` (a LearnerGroup) from now on: at the start, and after a learner restart."""
        self.learner = learner
        self.backend: str = learner.get(learner.weight_sync_backend.remote())
        self._members: tuple[str, ...] = ()  # the group's members; () while there is no working group
        self._tried: tuple[tuple[str, ...], int] | None = None  # (members, pool restarts) of the last forming
        self._export: tuple[int, Any] | None = None  # (version, ObjectRef of the CPU weights)

    @property
    def collective(self) -> bool:
        return self.backend != "object-store"

    def setup(self, pool: ActorPool) -> None:
        """(Re)form the weight-sync group for the pool's current members; a no-op when nothing changed. Never
        raises: when forming fails, `publish` falls back to the object store and tries again later."""
        if not self.collective:
            return
        names = tuple(pool.names)
        if (names, pool.stats.restarts) == self._tried:
            return
        self._tried, self._members = (names, pool.stats.restarts), ()
        try:
            info = self.learner.get(self.learner.weight_sync_prepare.remote(list(names)))
            joins = [h.weight_sync_join.remote(info) for h in pool.handles().values()]
            connect = self.learner.weight_sync_connect.remote()
            ray.get(joins)
            self.learner.get(connect)
        except LearnerDied:
            raise  # the driver restarts the learner group (cluster/recovery.py)
        except Exception as err:
            # a member died while joining: the learner gave up after weight_sync.timeout_s
            logger.warning(
                "weight sync (%s): forming the group with %s failed (%s); the object store carries the "
                "weights until the next membership change re-forms it",
                self.backend,
                ", ".join(names),
                err,
            )
            return
        self._members = names
        logger.info("weight sync (%s): group formed with %s", self.backend, ", ".join(names))

    def publish(self, pool: ActorPool, version: int) -> dict:
        """Bring every rollout worker to `version` (the learner's current policy); returns timing figures."""
        t0 = time.perf_counter()
        self.version = version
        if self.collective:
            try:
                self.setup(pool)
                if not self._members:
                    raise RuntimeError("no weight-sync group")
                stats = self._broadcast(pool)
                return {**stats, "seconds": time.perf_counter() - t0, "backend": self.backend}
            except LearnerDied:
                raise
            except Exception as err:  # a member died mid-transfer: re-form the group next time
                logger.warning(
                    "weight broadcast of version %d failed (%s); sending it through the object store",
                    version,
                    err,
                )
                self._members, self._tried = (), None
        pool.broadcast(lambda a: a.load_weights.remote(self._exported(), version))
        return {"seconds": time.perf_counter() - t0, "backend": "object-store"}

    def _broadcast(self, pool: ActorPool) -> dict:
        receivers = [h.weight_sync_receive.remote() for h in pool.handles().values()]
        stats = self.learner.get(self.learner.broadcast_weights.remote())
        versions = ray.get(receivers)
        if any(v != self.version for v in versions):
            raise RuntimeError(
                f"workers report versions {versions} after broadcasting version {self.version}"
            )
        return stats

    def on_start(self, handle: Any) -> list:
        """Run on a new or restarted rollout worker before it serves: load the current weights."""
        if self.version == 0:
            return [handle.ping.remote()]  # it loaded the starting policy from model.policy itself
        return [handle.load_weights.remote(self._exported(), self.version)]

    def _exported(self) -> Any:
        if self._export is None or self._export[0] != self.version:
            self._export = (self.version, self.learner.export_weights.remote())
        return self._export[1]
