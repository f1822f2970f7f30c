"""Publishing the learner's weights to the rollout pool, as the driver sees it.

Backends (weight_sync.backend; `auto` is resolved by the learner: nccl on GPU, gloo on CPU, cuda-ipc when
colocated on one GPU):
- a process group (gloo / nccl / cuda-ipc): the learner's rank 0 and every rollout worker. Parameters go in flat
  buckets (runtime/weights/), streamed into each engine one bucket at a time; an engine refuses to generate until
  it took every bucket of the version (a transfer cut half-way: until the next one re-sends it whole). The group is
  formed again (a new generation) whenever the pool's membership changes: a worker added, removed or restarted.
- a member that dies (a node lost) costs seconds, not weight_sync.timeout_s: Ray fails its pending call at once,
  the driver then abandons the generation on the learner and on every live member (runtime/weights/abandon.py),
  the pool restarts the dead one and the next publish forms a new generation with the live members.
- object-store: the learner exports CPU copies once per version, put in Ray's object store, and every worker
  loads them (with weight_sync.delta: deltas against the version every worker holds, whole to one that does not).
  Also the path by which a new or restarted worker catches up before it serves, and the fallback when a broadcast
  fails because a member died mid-transfer (both whole).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from cluster.config import TrainConfig
from cluster.pools.actor_pool import DEATH, ActorPool
from cluster.pools.learner_group import LearnerDied, LearnerGroup

logger = logging.getLogger(__name__)


class WeightPublisher:
    def __init__(self, cfg: TrainConfig, learner: LearnerGroup | None = None):
        """learner None: bound later by rebind() (the driver starts the rollout pool before the learner where they
        share a GPU: cluster/driver/start.py); until then only on_start at version 0 is served."""
        self.cfg = cfg
        self.version = 0
        self.aborts = 0  # generations abandoned because a member died (or a call of the group failed)
        if learner is not None:
            self.rebind(learner)

    def rebind(self, learner: LearnerGroup) -> None:
        """Publish from `learner` (a LearnerGroup) from now on: at the start, and after a learner restart."""
        self.learner = learner
        self.backend: str = learner.weight_sync_backend()
        self._members: tuple[str, ...] = ()  # the group's members; () while there is no working group
        self._tried: tuple[tuple[str, ...], int] | None = None  # (members, pool restarts) of the last forming
        self._export: tuple[tuple, Any] | None = None  # ((version, base), ObjectRef of the CPU weights)
        self._held: int | None = None  # the version every serving worker loaded from the object store
        self._generation = 0  # the weight-sync generation last prepared

    @property
    def collective(self) -> bool:
        return self.backend != "object-store"

    def setup(self, pool: ActorPool) -> None:
        """(Re)form the weight-sync group for the pool's current members; a no-op when nothing changed. Never
        raises: when forming fails, `publish` falls back to the object store and tries again later."""
        if not self.collective:
            return
        members = pool.serving()  # not an actor still starting: the group would wait for it (docs/scaling.md)
        names = tuple(sorted(members))
        if not names or (names, pool.stats.restarts) == self._tried:
            return
        self._tried, self._members = (names, pool.stats.restarts), ()
        try:
            info = self.learner.weight_sync_prepare(list(names))
            self._generation = int(info["generation"])
            joins = {name: h.weight_sync_join.remote(info) for name, h in members.items()}
            _gather({**self.learner.weight_sync_connect().by_rank(), **joins})
        except LearnerDied:
            raise  # the driver restarts the learner group (cluster/driver/recovery.py)
        except Exception as err:
            self._raise_if_learner_died(err)
            self._give_up(pool, err, "forming the group with " + ", ".join(names))
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
                self._raise_if_learner_died(err)
                if self._members:
                    self._give_up(pool, err, f"broadcasting version {version}")
                logger.warning(
                    "weight broadcast of version %d failed (%s); sending it through the object store",
                    version,
                    err,
                )
                self._members, self._tried = (), None
        self._store_publish(pool, version)
        return {"seconds": time.perf_counter() - t0, "backend": "object-store"}

    def _store_publish(self, pool: ActorPool, version: int) -> None:
        """Every serving worker loads `version` from the object store: with weight_sync.delta, as deltas against
        the version they all hold (Learner.export_weights), then whole to any that does not hold it (its
        load_weights answers its old version); a worker still starting gets it whole from on_start."""
        base = self._held if not self.collective else None  # after a failed broadcast: whole
        loaded = pool.broadcast(lambda a: a.load_weights.remote(self._exported(base), version))
        handles = pool.handles()
        behind = [name for name, v in loaded.items() if v != version and name in handles]
        if behind:
            logger.info(
                "weight sync: %s did not hold version %s; sending version %d whole", behind, base, version
            )
            ray.get([handles[name].load_weights.remote(self._exported(), version) for name in behind])
        self._held = version

    def _broadcast(self, pool: ActorPool) -> dict:
        receivers = {name: h.weight_sync_receive.remote() for name, h in pool.serving().items()}
        results = _gather({**self.learner.broadcast_weights().by_rank(), **receivers})
        got = [results[name] or {} for name in receivers]
        versions = [r.get("version") for r in got]
        if any(v != self.version for v in versions):
            raise RuntimeError(
                f"workers report versions {versions} after broadcasting version {self.version}"
            )
        decode_s = max((r.get("decode_s", 0.0) for r in got), default=0.0)
        return {**results[self.learner.names[0]], "decode_s": decode_s}

    def _raise_if_learner_died(self, err: BaseException) -> None:
        """A learner rank's death is the learner group's (cluster/driver/recovery.py restarts it), never a reason to
        fall back to the object store (whose weights come from the learner too)."""
        if isinstance(err, _CallFailed) and err.died and err.who in self.learner.names:
            raise self.learner.died(err.who, err.error) from err

    def _give_up(self, pool: ActorPool, err: BaseException, what: str) -> None:
        """A call of the group failed (typically: a member died, and Ray said so at once). Abandon the generation
        on the learner and on every live member now, instead of letting them wait out weight_sync.timeout_s,
        and have the pool restart the dead member (it catches up through the object store); the next publish
        forms a new generation with the live members."""
        self.aborts += 1
        dead = err.who if isinstance(err, _CallFailed) and err.died else None
        logger.warning(
            "weight sync (%s): %s failed (%s); abandoning generation %d%s",
            self.backend,
            what,
            err,
            self._generation,
            f" and restarting {dead}" if dead and dead != "learner" else "",
        )
        try:  # runs beside the blocked connect / broadcast
            self.learner.weight_sync_abort(timeout=60)
        except Exception as abort_err:
            logger.warning("weight sync: the learner did not abandon the generation (%s)", abort_err)
        for name, handle in pool.handles().items():
            if name != dead:
                handle.weight_sync_abort.remote(self._generation)  # not waited for: a dead one never answers
        if dead and dead != "learner":
            pool.report_death(dead, err)

    def on_start(self, handle: Any) -> list:
        """Run on a new or restarted rollout worker before it serves: load the current weights."""
        if self.version == 0:
            return [handle.ping.remote()]  # it loaded the starting policy from model.policy itself
        return [handle.load_weights.remote(self._exported(), self.version)]

    def _exported(self, base: int | None = None) -> Any:
        """The ObjectRef of the current version from the learner: whole, or (weight_sync.delta) as deltas against
        `base`, the version every worker holds."""
        if self._export is None or self._export[0] != (self.version, base):
            self._export = ((self.version, base), self.learner.export_weights(base))
        return self._export[1]


class _CallFailed(RuntimeError):
    """One call of a weight-sync generation failed: `who` ran it ("learner" or a member's name)."""

    def __init__(self, who: str, err: BaseException):
        super().__init__(f"{who}: {err}")
        self.who, self.error, self.died = who, err, isinstance(err, DEATH)


def _gather(calls: dict[str, Any]) -> dict[str, Any]:
    """The results of `calls` (who -> ObjectRef), raising `_CallFailed` at the FIRST failure without waiting for
    the others: a dead member's call fails as soon as Ray knows, while the learner's (and the live members')
    would wait for the transport's timeout."""
    pending = {ref: who for who, ref in calls.items()}
    out: dict[str, Any] = {}
    while pending:
        ray.wait(list(pending), num_returns=1)
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            who = pending.pop(ref)
            try:
                out[who] = ray.get(ref)
            except Exception as err:
                raise _CallFailed(who, err) from err
    return out
