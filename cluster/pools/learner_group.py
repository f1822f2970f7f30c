"""The learner ranks as one learner, as the driver and the weight publisher see it.

    group = LearnerGroup.start(cfg, Learner)          # learner-0..n-1 (cluster/pools/topology.py places them)
    ref = group.step.remote(groups, *samples)         # runs on EVERY rank; the ref is rank 0's
    stats = group.get(ref)                            # waits on every rank's ref of that call
    group.mark_best.remote(...)                       # rank-0-only methods run on rank 0 alone

Collective methods (the learner's contract: every rank takes part) are called on every rank with the same
arguments; rank-0-only ones on rank 0. `get` / `ready` look at every rank's ref of the call, so a rank that died
is seen as soon as Ray reports it, not after the survivors' collective times out: they raise `LearnerDied`
naming the rank, its node and the cause Ray reported. The survivors of a dead rank are stuck in a collective, so
a dead rank is the group's death: cluster/driver/recovery.py kills every rank and starts the group again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import ray

from cluster.config import TrainConfig
from cluster.pools.topology import LearnerRanks, remove_learner_placement, spawn_learner_ranks

logger = logging.getLogger(__name__)

COLLECTIVE = frozenset(
    {"step", "loss_on", "save_checkpoint", "load_checkpoint", "broadcast_weights", "export_weights", "close"}
)
RANK0_ONLY = frozenset(
    {
        "weight_sync_prepare",
        "weight_sync_connect",
        "weight_sync_abort",
        "weight_sync_backend",
        "mark_best",
        "weight_sync_group",
    }
)
# How long the other ranks' refs are given to show a death when one rank's call raised an ordinary error (a rank
# whose peer died fails in the collective, often before Ray reports the peer's death).
DEATH_GRACE_S = 30.0
_REMEMBERED_CALLS = 256


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


class _Method:
    def __init__(self, group: LearnerGroup, name: str, options: dict | None = None):
        self._group, self._name, self._options = group, name, options or {}

    def options(self, **options: Any) -> _Method:
        """Ray call options for every rank's call, e.g. concurrency_group="control" (weight_sync_abort)."""
        return _Method(self._group, self._name, {**self._options, **options})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._group._call(self._name, args, kwargs, self._options)


class LearnerGroup:
    """`learner.ranks` Learner actors that the driver uses as one (see the module docstring)."""

    def __init__(self, ranks: LearnerRanks):
        self._ranks = ranks
        self._calls: OrderedDict[Any, list[Any]] = OrderedDict()  # rank 0's ref -> every rank's ref

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

    def __getattr__(self, name: str) -> _Method:
        if name in COLLECTIVE or name in RANK0_ONLY:
            return _Method(self, name)
        raise AttributeError(f"LearnerGroup has no method {name!r}")

    def _call(self, name: str, args: tuple, kwargs: dict, options: dict) -> Any:
        handles = self._ranks.handles if name in COLLECTIVE else self._ranks.handles[:1]
        methods = [getattr(h, name) for h in handles]
        refs = [(m.options(**options) if options else m).remote(*args, **kwargs) for m in methods]
        self._calls[refs[0]] = refs
        while (
            len(self._calls) > _REMEMBERED_CALLS
        ):  # refs handed on and never waited for here (export_weights)
            self._calls.popitem(last=False)
        return refs[0]

    def refs(self, ref: Any) -> list[Any]:
        """Every rank's ref of the call whose rank-0 ref is `ref` (to ray.wait on beside other work)."""
        return list(self._calls.get(ref, [ref]))

    def get(self, ref: Any, timeout: float | None = None) -> Any:
        """Rank 0's result of the call, once every rank's part returned; LearnerDied when a rank died."""
        refs = self.refs(ref)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                raise TimeoutError(f"learner group: no answer within {timeout} s")
            self._check(done[0], refs)
        self._calls.pop(ref, None)
        return ray.get(ref)

    def ready(self, ref: Any) -> bool:
        """True when every rank's part of the call returned (non-blocking); LearnerDied when a rank died."""
        refs = self.refs(ref)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for r in done:
            self._check(r, refs)
        return len(done) == len(refs)

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
        self._calls.clear()

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
