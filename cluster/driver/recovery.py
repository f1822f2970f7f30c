"""Recovery from a dead learner rank inside the job (the driver's hook: `run_with_recovery`).

When a rank dies (its actor, or the node under it), the learner group (cluster/pools/learner_group.py) raises
LearnerDied. Up to `learner.max_restarts` times the driver then
1. kills every rank (the survivors hang in a collective) and frees their placement group;
2. throws away the training work in the rollout and reward pools: the queued at once, the running once it ends
   (it was drawn after the checkpoint it rewinds to, and is drawn again; `discard_in_flight`);
3. starts the group again (on any node with room: the dead node's bundles are placed elsewhere), loads the LATEST
   checkpoint and rewinds to it what `--resume` rewinds: step, policy version, reader cursor, chunk numbering
   (so sampling seeds replay identically), the accounting, and metrics.jsonl (cut to the checkpoint's step);
4. re-forms the weight-sync group with the new rank 0 and publishes the checkpoint's weights to the rollout
   workers (told first to accept an older version: `RolloutWorker.rewind`).
The accounting of the final history is the checkpoint's plus what came after, so generated = trained + dropped +
filtered + left_over still holds; what the rewind threw away is counted beside it (cluster/driver/state.py Accounting:
learner_restarts, groups_replayed, groups_rewound).

When no restart is left or no checkpoint exists, the job fails with LearnerGroupFailed: which rank died, on which
node, at which step, the cause Ray reported; `segr1 train` adds the command that continues the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from cluster.config import TrainConfig
from cluster.driver.state import Accounting, Chunk
from cluster.driver.validation import Validator
from cluster.pools.actor_pool import ActorPool, wait_any
from cluster.pools.learner_group import LearnerDied, LearnerGroup

logger = logging.getLogger(__name__)


class Restartable(Protocol):
    """What recovery needs of the driver (TrainDriver): its state, and four operations."""

    cfg: TrainConfig
    step: int
    acct: Accounting
    learner: LearnerGroup
    last_checkpoint: str | None

    def drain_in_flight(self) -> int: ...  # finish the pools' work in flight and throw it away

    def start_learner(self) -> None: ...  # a new learner group, which the weight publisher sends from

    def rewind(self, state: dict) -> None: ...  # back to a checkpoint's state, metrics.jsonl included

    def republish(self) -> None: ...  # the current version to every rollout worker


class JobFailed(RuntimeError):
    """What ends a job with one message and no Ray traceback (`segr1 train` adds the command that continues it).
    `resumable`: a checkpoint exists to `--resume` from."""

    def __init__(self, message: str, resumable: bool):
        super().__init__(message)
        self.resumable = resumable

    def __reduce__(self):
        return (type(self), (str(self), self.resumable))


class LearnerGroupFailed(JobFailed):
    """The learner group died and was not restarted."""


class CheckpointFailed(JobFailed):
    """The learner could not write a checkpoint (disk full, quota, permissions): learner/checkpoint.py's
    CheckpointError says which, why, and that the newest complete checkpoint is untouched."""


def checkpoint_failed(err: Exception, checkpoint_dir: str) -> CheckpointFailed:
    """The CheckpointFailed of a save that raised `err` on a learner rank (Ray's error around the rank's)."""
    from learner.checkpoint import latest_checkpoint

    cause = getattr(err, "cause", None) or err
    resumable = latest_checkpoint(checkpoint_dir) is not None
    return CheckpointFailed(f"the learner could not write a checkpoint: {cause}", resumable)


def run_with_recovery(driver: Restartable, body: Callable[[], None]) -> None:
    """Run `body` (the driver's training loop); after a learner death restart the group and run it again."""
    while True:
        try:
            return body()
        except LearnerDied as died:
            died.step = driver.step + 1  # the step being trained, checkpointed or published when it died
            restart_learner(driver, died)


def _fail(died: LearnerDied, why: str, resumable: bool) -> LearnerGroupFailed:
    return LearnerGroupFailed(
        f"learner rank {died.rank_name} on node {died.node} died at step {died.step}: {died.cause} -- {why}",
        resumable,
    )


def restart_learner(driver: Restartable, died: LearnerDied) -> None:
    """Steps 1-4 of the module docstring, or LearnerGroupFailed."""
    cfg = driver.cfg
    logger.error("learner group: %s at step %s", died, died.step)
    driver.learner.kill()
    used, limit = driver.acct.learner_restarts, cfg.learner.max_restarts
    saved = _has_checkpoint(driver)
    if used >= limit:
        spent = f", all {used} used" if used else ": no restart inside the job"
        raise _fail(died, f"learner.max_restarts={limit}{spent}", resumable=saved)
    if not saved:
        why = f"no checkpoint to restart from yet (checkpoint.every={cfg.checkpoint.every})"
        raise _fail(died, why, resumable=False)
    logger.info("learner restart: %d group(s) in flight discarded", driver.drain_in_flight())
    before = driver.acct
    driver.start_learner()
    driver.rewind(driver.learner.load_checkpoint(None))
    a = driver.acct
    a.learner_restarts = before.learner_restarts + 1
    a.groups_replayed = before.groups_replayed + before.groups_trained - a.groups_trained
    a.groups_rewound = before.groups_rewound + before.groups_generated - a.groups_generated
    driver.republish()
    logger.warning(
        "learner group restarted (%d of %d) on %s from step %d: %d group(s) to train again",
        a.learner_restarts,
        limit,
        ", ".join(driver.learner.nodes),
        driver.step,
        before.groups_trained - a.groups_trained,
    )


def discard_in_flight(pools: tuple[ActorPool, ...], validator: Validator) -> int:
    """Step 2 of the module docstring: the training work of the pools is thrown away, the queued at once, the
    running once it ends (failed included: a rollout worker that missed a version cannot catch up while no learner
    runs), and a finished rollout is not sent on to scoring. Validation work goes to the validator as always. How
    many groups were thrown away."""
    thrown = 0
    while True:
        for pool in pools:
            thrown += sum(
                len(chunk.requests) for chunk in pool.discard_queued(lambda k: isinstance(k, Chunk))
            )
        if not any(pool.pending for pool in pools):
            return thrown
        wait_any(pools, timeout=0.5)
        for pool in pools:
            for key, result in pool.poll(timeout=0):
                if not validator.take(key, result):
                    thrown += len(key.requests)


def _has_checkpoint(driver: Restartable) -> bool:
    """This run saved (or resumed from) a checkpoint, or one is in checkpoint.dir (a save that completed while
    its rank died, before the driver heard back)."""
    from learner.checkpoint import latest_checkpoint

    return driver.last_checkpoint is not None or latest_checkpoint(driver.cfg.checkpoint.dir) is not None
