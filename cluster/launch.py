"""Launching a training job: wires the worker classes into the topology and runs the driver as a Ray actor.

    run_training(cfg, resume)   what `segr1 train` and `python -m cluster.train` (ray job submit) run

Imports point one way: launch -> driver -> topology, launch -> topology. Topology is handed the classes it runs
(`Workers`) and the driver the function that names them (`training_workers`), so neither imports the other's
caller nor a worker package. The worker packages are imported in the driver actor's process, where the pools
start, not on the submitting machine.
"""

from __future__ import annotations

import sys
from typing import Any

import ray
from ray.exceptions import RayActorError

from cluster.config import TrainConfig
from cluster.driver import TrainDriver
from cluster.job_paths import check_job_paths
from cluster.placement import check_pool_resources
from cluster.topology import Workers, init_ray, spawn_driver


def training_workers() -> Workers:
    """The classes of a training job's actors: rollout-<i>, reward-<i> and learner-<rank>."""
    from actors.worker import RolloutWorker
    from learner.learner import Learner
    from reward_service.worker import RewardWorker

    return Workers(rollout=RolloutWorker, reward=RewardWorker, learner=Learner)


class DriverActor(TrainDriver):
    """TrainDriver as the `driver` actor: an error while it starts (a data set missing, a checkpoint unreadable)
    is raised by run(), not by __init__. Ray 2.60 ends a threaded actor (max_concurrency 2) whose __init__ raised
    with a "Fatal Python error: Aborted" dump, printed after the real error."""

    def __init__(self, *args: Any):
        self._start_error: BaseException | None = None
        try:
            super().__init__(*args)
        except Exception as err:
            self._start_error = err

    def run(self) -> dict:
        if self._start_error is not None:
            raise self._start_error
        return super().run()

    def close(self) -> None:
        if self._start_error is None:
            return super().close()
        for pool in (getattr(self, "rollout", None), getattr(self, "reward", None)):  # what started before
            if pool is not None:
                pool.shutdown()
        if getattr(self, "learner", None) is not None:
            ray.kill(self.learner, no_restart=True)


def spawn_driver_actor(cfg: TrainConfig, resume: bool = False) -> Any:
    """The training driver as the actor `driver` (cluster/topology.py places it), its pools of
    `training_workers()`."""
    return spawn_driver(cfg, DriverActor, cfg, training_workers, resume)


def _get_run(run_ref: Any) -> dict:
    """The driver's summary; a learner group that could not be restarted raises its own LearnerGroupFailed
    (one message, no Ray traceback: cluster/recovery.py)."""
    from cluster.recovery import LearnerGroupFailed

    try:
        return ray.get(run_ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, LearnerGroupFailed):
            raise err.cause from None
        raise


def run_training(cfg: TrainConfig, resume: bool = False) -> dict:
    """Start (or connect to) Ray, run the driver actor to the end and return its summary. Ctrl-C asks the driver
    to finish the step in progress, checkpoint and stop; a second Ctrl-C kills it."""
    check_job_paths(cfg)  # `ray job submit --working-dir .`: relative paths point into the uploaded copy
    init_ray(cfg)
    check_pool_resources(cfg)  # disaggregated: every pool's resource is advertised somewhere, else say which
    driver = spawn_driver_actor(cfg, resume)
    run_ref = driver.run.remote()
    try:
        try:
            summary = _get_run(run_ref)
        except KeyboardInterrupt:
            print(
                "\nstopping: finishing the current step and writing a checkpoint (Ctrl-C again to abort)",
                file=sys.stderr,
            )
            ray.get(driver.request_stop.remote())
            summary = _get_run(run_ref)
    finally:  # also when run() failed: free the actor names (`driver`, `rollout-0`, ...) for the next job
        try:
            ray.get(driver.close.remote(), timeout=120)
        except RayActorError:  # it died: nothing to close, and the error above says why
            pass
        finally:
            ray.kill(driver, no_restart=True)
    return summary
