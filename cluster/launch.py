"""Launching a training job: wires the worker classes into the topology and runs the driver as a Ray actor.

    run_training(cfg, resume)   what `segr1 train` and `python -m cluster.train` (ray job submit) run

Imports point one way: launch -> driver -> topology, launch -> topology. Topology is handed the classes it runs
(`Workers`) and the driver the function that names them (`training_workers`), so neither imports the other's
caller nor a worker package. The worker packages are imported in the driver actor's process, where the pools
start, not on the submitting machine.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import ray
from ray.exceptions import RayActorError

from cluster.config import TrainConfig
from cluster.driver.loop import TrainDriver
from cluster.job_paths import check_job_paths, check_start
from cluster.pools.learner_group import short_cause
from cluster.pools.placement import check_pool_resources
from cluster.pools.topology import Workers, init_ray, spawn_driver

logger = logging.getLogger(__name__)


def training_workers() -> Workers:
    """The classes of a training job's actors: rollout-<i>, reward-<i> and learner-<rank>."""
    from actors.worker import RolloutWorker
    from learner.learner import Learner
    from reward_service.worker import RewardWorker

    return Workers(rollout=RolloutWorker, reward=RewardWorker, learner=Learner)


class DriverActor(TrainDriver):
    """TrainDriver as the `driver` actor: an error while it starts (a data set that does not read, a checkpoint
    that does not load, a tracker that cannot open) is raised by run(), not by __init__, and close() then stops
    what had started. Ray 2.60 ends a threaded actor (max_concurrency 2) whose __init__ raised with a "Fatal Python
    error: Aborted" dump, printed after the real error."""

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
        # what started before the error: each part closed on its own, so one that fails leaves the rest closing
        # (the learner group's shutdown kills every rank and removes their placement group)
        for part in ("rollout", "reward", "learner"):
            started = getattr(self, part, None)
            try:
                if started is not None:
                    started.shutdown()
            except Exception as err:
                logger.warning("closing the %s of a job that failed to start: %s", part, _reason(err))


def spawn_driver_actor(cfg: TrainConfig, resume: bool = False, progress_bar: bool = True) -> Any:
    """The training driver as the actor `driver` (cluster/pools/topology.py places it), its pools of
    `training_workers()`."""
    return spawn_driver(cfg, DriverActor, cfg, training_workers, resume, progress_bar)


def _get_run(run_ref: Any) -> dict:
    """The driver's summary; a learner group that could not be restarted or a checkpoint that could not be
    written raises its own JobFailed (one message, no Ray traceback: cluster/driver/recovery.py)."""
    from cluster.driver.recovery import JobFailed

    try:
        return ray.get(run_ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, JobFailed):
            raise err.cause from None
        raise


def run_training(cfg: TrainConfig, resume: bool = False, progress_bar: bool = True) -> dict:
    """Start (or connect to) Ray, run the driver actor to the end and return its summary. Ctrl-C asks the driver
    to finish the step in progress, checkpoint and stop; a second Ctrl-C kills it. What the machine can tell
    before Ray starts is checked first (cluster/job_paths.py); an error after that is raised as it came, after
    every actor of the job was stopped (a failure while stopping them is logged, never raised over it).
    `progress_bar=False`: no step bar from the driver (the demo draws its own)."""
    check_job_paths(cfg)  # `ray job submit --working-dir .`: relative paths point into the uploaded copy
    check_start(cfg, resume)  # tracker libraries, inputs readable, outputs writable: one ConfigError
    init_ray(cfg)
    check_pool_resources(cfg)  # disaggregated: every pool's resource is advertised somewhere, else say which
    driver = spawn_driver_actor(cfg, resume, progress_bar)
    try:
        run_ref = driver.run.remote()
        try:
            return _get_run(run_ref)
        except KeyboardInterrupt:
            print(
                "\nstopping: finishing the current step and writing a checkpoint (Ctrl-C again to abort)",
                file=sys.stderr,
            )
            ray.get(driver.request_stop.remote())
            return _get_run(run_ref)
    finally:  # also when run() failed: free the actor names (`driver`, `rollout-0`, ...) for the next job
        stop_driver(driver)


def stop_driver(driver: Any, timeout_s: float = 120.0) -> None:
    """Close the job's actors (the pools, every learner rank and their placement group), then kill the driver.
    Never raises: it runs while the job's own error is on its way to the user, which must stay the last word."""
    try:
        try:
            ray.get(driver.close.remote(), timeout=timeout_s)
        except RayActorError:  # it died: its actors died with it (Ray ends the actors an actor owns)
            pass
        except Exception as err:
            logger.warning("closing the job's actors failed: %s", _reason(err))
    finally:  # a Ctrl-C while closing still ends the driver, and the actors it owns with it
        try:
            ray.kill(driver, no_restart=True)
        except Exception as err:
            logger.warning("killing the driver actor failed: %s", _reason(err))


def _reason(err: BaseException) -> str:
    """What went wrong, in one line: for a RayTaskError its cause (its own first lines name the actor only)."""
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {short_cause(cause)}"
