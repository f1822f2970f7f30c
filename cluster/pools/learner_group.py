"""The learner ranks as one learner, as the driver and the weight publisher see it.

    group = LearnerGroup.start(cfg, Learner)       # learner-0..n-1 (cluster/pools/topology.py places them)
    call = group.step(batch, refs)                 # Learner.step_by_ref on EVERY rank (one ray.put of the batch)
    stats = group.wait(call)                       # rank 0's answer, once every rank's part returned
    path = group.save_checkpoint(data_cursor=...)  # blocking calls for the rest

Every method is explicit. Collective ones (the learner's contract: every rank takes part) run on every rank with
the same arguments; rank-0-only ones (weight-sync set-up, keep-best) on rank 0. A non-blocking call returns a
`LearnerCall` holding every rank's ref, and `wait` / `done` look at all of them, so a rank that died is seen as
soon as Ray reports it, not after the survivors' collective times out: they raise `LearnerDied` naming the rank,
its node and the cause Ray reported. The survivors of a dead rank are stuck in a collective, so a dead rank is
the group's death: cluster/driver/recovery.py kills every rank and starts the group again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from cluster.config import TrainConfig
from cluster.pools.topology import LearnerRanks, remove_learner_placement, spawn_learner_ranks
from protos import TrainBatch

logger = logging.getLogger(__name__)

# How long the other ranks' refs are given to show a death when one rank's call raised an ordinary error (a rank
# whose peer died fails in the collective, often before Ray reports the peer's death).
DEATH_GRACE_S = 30.0


def _death_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError, WorkerCrashedError

    return (RayActorError, WorkerCrashedError)


class LearnerDied(RuntimeError):
    """A learner rank died (its actor or its node). `step` is filled in by the driver (the step it was on)."""

    def __init__(self, rank_name: str, node: str, cause: str, step: int | None = None):
        super().__init__(f"{rank_name} (node {node}) died: {cause}")
        self.rank_name, self.node, self.cause, self.step = rank_name, node, cause, step

    def __reduce__(self):
        return (LearnerDied, (self.rank_name, self.node, self.cause, self.step))


def short_cause(err: BaseException) -> str:
    """The first lines of what Ray reported (its messages run to a dozen lines)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return " ".join(lines[:3])[:600] or type(err).__name__


@dataclass(frozen=True)
class LearnerCall:
    """One method running on the ranks: every rank's ref, rank 0's first (rank 0's answer is the group's)."""

    refs: tuple[Any, ...]
    names: tuple[str, ...]

    def by_rank(self) -> dict[str, Any]:
        """{rank name: ref}: to wait on beside other actors' refs (cluster/driver/weights.py)."""
        return dict(zip(self.names, self.refs, strict=True))


class LearnerGroup:
    """`learner.ranks` Learner actors that the driver uses as one (see the module docstring)."""

    def __init__(self, ranks: LearnerRanks):
        self._ranks = ranks

    @classmethod
    def start(cls, cfg: TrainConfig, learner_cls: type) -> LearnerGroup:
        ranks = spawn_learner_ranks(cfg, learner_cls)
        logger.info("learner group: %s on %s", ", ".join(ranks.names), ", ".join(ranks.nodes))
        return cls(ranks)

    @property
    def names(self) -> list[str]:
        return list(self._ranks.names)

    def handles(self) -> dict[str, Any]:
        """{rank name: actor handle}, in rank order."""
        return dict(zip(self._ranks.names, self._ranks.handles, strict=True))

    @property
    def nodes(self) -> list[str]:
        return list(self._ranks.nodes)

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until every rank is constructed (or failed to be); False when some were not after `timeout` s."""
        refs = [h.__ray_ready__.remote() for h in self._ranks.handles]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        return not pending

    # -- training (non-blocking) ------------------------------------------------------------------------------
    def step(self, batch: TrainBatch, refs: Sequence[Any]) -> LearnerCall:
        """Learner.step_by_ref on every rank: the batch is put in the object store once for all ranks, and
        `refs` (its rollouts, then its samples) are resolved by Ray on each rank, never read here."""
        return self._every_rank("step_by_ref", ray.put(batch), *refs)

    def wait(self, call: LearnerCall, timeout: float | None = None) -> Any:
        """Rank 0's result of `call`, once every rank's part returned; LearnerDied when a rank died."""
        pending = list(call.refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                raise TimeoutError(f"learner group: no answer within {timeout} s")
            self._check(done[0], list(call.refs))
        return ray.get(call.refs[0])

    def done(self, call: LearnerCall) -> bool:
        """True when every rank's part of `call` returned (non-blocking); LearnerDied when a rank died."""
        refs = list(call.refs)
        finished, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for r in finished:
            self._check(r, refs)
        return len(finished) == len(refs)

    # -- checkpoints and keep-best (blocking) -----------------------------------------------------------------
    def save_checkpoint(self, **kwargs: Any) -> str:
        return self.wait(self._every_rank("save_checkpoint", **kwargs))

    def load_checkpoint(self, path: str | None) -> dict:
        """Every rank loads `path` (None: the latest); the checkpoint's driver state."""
        return self.wait(self._every_rank("load_checkpoint", path))

    def mark_best(self, *args: Any) -> Any:
        return self.wait(self._rank0("mark_best", *args))

    # -- weight sync (cluster/driver/weights.py) --------------------------------------------------------------
    def weight_sync_backend(self) -> str:
        return self.wait(self._rank0("weight_sync_backend"))

    def weight_sync_prepare(self, members: list[str]) -> dict:
        return self.wait(self._rank0("weight_sync_prepare", members))

    def weight_sync_connect(self) -> LearnerCall:
        return self._rank0("weight_sync_connect")

    def broadcast_weights(self) -> LearnerCall:
        return self._every_rank("broadcast_weights")

    def weight_sync_abort(self, timeout: float) -> None:
        """Abandon the generation on rank 0, in its `control` concurrency group: it runs beside the blocked
        connect or broadcast."""
        handle = self._ranks.handles[0]
        ray.get(handle.weight_sync_abort.options(concurrency_group="control").remote(), timeout=timeout)

    def export_weights(self, base: int | None = None) -> Any:
        """The ObjectRef of rank 0's CPU copy of the weights (every rank takes part: a sharded learner gathers);
        handed to rollout workers, never read here. base: see Learner.export_weights."""
        return self._every_rank("export_weights", base).refs[0]

    # -- calls ------------------------------------------------------------------------------------------------
    def _every_rank(self, method: str, *args: Any, **kwargs: Any) -> LearnerCall:
        refs = tuple(getattr(h, method).remote(*args, **kwargs) for h in self._ranks.handles)
        return LearnerCall(refs, tuple(self._ranks.names))

    def _rank0(self, method: str, *args: Any) -> LearnerCall:
        ref = getattr(self._ranks.handles[0], method).remote(*args)
        return LearnerCall((ref,), (self._ranks.names[0],))

    def _check(self, ref: Any, refs: list[Any]) -> None:
        """Raise LearnerDied when the finished `ref` reports its rank's death; an ordinary error is re-raised
        unless another rank of the call turns out to have died (the error was the collective breaking)."""
        try:
            ray.get(ref)
        except _death_errors() as err:
            raise self._died(refs.index(ref), err) from None
        except Exception:
            others = [r for r in refs if r != ref]
            done, _ = ray.wait(others, num_returns=len(others), timeout=DEATH_GRACE_S) if others else ([], [])
            for r in done:
                try:
                    ray.get(r)
                except _death_errors() as err:
                    raise self._died(refs.index(r), err) from None
                except Exception:
                    continue
            raise

    def check_alive(self, timeout: float = 5.0) -> None:
        """Raise LearnerDied when a rank is dead: Ray answers a call to a dead actor at once (a live rank busy
        with a step answers later, and counts as alive)."""
        refs = [h.__ray_ready__.remote() for h in self._ranks.handles]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in done:
            try:
                ray.get(ref)
            except _death_errors() as err:
                raise self._died(refs.index(ref), err) from None

    def died(self, rank_name: str, err: BaseException) -> LearnerDied:
        """The LearnerDied of rank `rank_name`, whose call failed with `err` (seen by another waiter)."""
        return self._died(self._ranks.names.index(rank_name), err)

    def _died(self, index: int, err: BaseException) -> LearnerDied:
        return LearnerDied(self._ranks.names[index], self._ranks.nodes[index], short_cause(err))

    def kill(self) -> None:
        """Kill every rank (a dead rank's peers hang in a collective) and free the placement group."""
        for h in self._ranks.handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception as err:  # already gone
                logger.debug("killing a learner rank: %s", err)
        remove_learner_placement(self._ranks)

    def shutdown(self, timeout: float = 60.0) -> None:
        """close() on every rank (removes the weight-sync shared memory), then kill them. Never raises: a dead
        rank must not hide the error that ended the job."""
        refs = [h.close.remote() for h in self._ranks.handles]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for r in done:
            try:
                ray.get(r)
            except Exception as err:
                logger.warning("closing learner rank: %s", short_cause(err))
        self.kill()
