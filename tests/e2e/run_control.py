"""Event-driven control of a training run for the e2e tests, so that no test depends on how fast the machine is.

- A run the test ends itself: grpo.steps=UNTIL_STOPPED (more than any test reaches), the scenario's faults
  land while it runs whatever the speed, and once the test has seen the events it waits for, `stop_run` asks the
  driver to finish its step and return (`request_stop`); assertions read the steps actually done.
- `wait_for_line` finds THE metrics.jsonl line of an event (the first one matching), never just the newest line,
  and fails naming what it waited for, or at once with the run's own end or error if the run ended first.
- A gate (`start_gate`, `held_workers`): the job's reward workers hold the scoring of the groups a given policy
  version generated until the test opens the gate; the driver then sits inside a known step (in sync mode,
  version v's groups are step v+1's) while the test kills or removes what it wants, and nothing after it has run.

    python -m tests.e2e.run_control stop NAMESPACE   # request_stop of the job at RAY_ADDRESS (a submitted job)
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import finish_job, read_metrics, wait_for

UNTIL_STOPPED = 10_000  # grpo.steps of a run that the test stops once its scenario is done


def following_the_cluster(namespace: str) -> list[str]:
    """Overrides of a disaggregated async job, run until the test stops it, whose pools follow the cluster's
    capacity (checked every 0.5 s): the elastic and autoscaler tests' jobs."""
    return [
        f"grpo.steps={UNTIL_STOPPED}",
        "grpo.mode=async",
        "placement.mode=disaggregated",
        f"placement.namespace={namespace}",
        "placement.capacity_interval_s=0.5",
    ]


GATE_NAMESPACE = "segr1-test-gates"  # not the job's: kill_job_actors and job_actor_names leave the gate alone


def _run_ended(ray, run_ref, what: str) -> None:
    """Fail now if the run returned (or raised: its own error is raised) before `what` happened."""
    if run_ref is not None and ray.wait([run_ref], timeout=0)[0]:
        summary = ray.get(run_ref)
        raise AssertionError(f"the run ended (step {summary.get('steps')}) before {what}")


def wait_for_event(condition: Callable[[], object], timeout: float, what: str, run_ref=None, every=0.2):
    """wait_for, failing at once (with the run's error or end) if the run `run_ref` finished first."""
    import ray

    def seen():
        value = condition()
        if not value:
            _run_ended(ray, run_ref, what)
        return value

    return wait_for(seen, timeout, what, every=every)


def first_line(run_dir: Path, match: Callable[[dict], object]) -> dict | None:
    """The first metrics.jsonl line that `match`es (lines of validations included), else None."""
    return next((row for row in read_metrics(run_dir) if match(row)), None)


def wait_for_line(run_dir: Path, match: Callable[[dict], object], timeout: float, what: str, run_ref=None):
    """The first metrics.jsonl line that `match`es, once written (see wait_for_event)."""
    return wait_for_event(lambda: first_line(run_dir, match), timeout, what, run_ref, every=0.1)


def stop_run(ray, driver, run_ref, timeout: float) -> dict:
    """Ask the driver to finish the step in progress and return; its summary once run() ended (at most `timeout`
    s), the pools and the driver closed."""
    ray.get(driver.request_stop.remote(), timeout=60)
    return finish_job(ray, driver, run_ref, timeout, "the run to end after request_stop()")


def kill_and_confirm(ray, name: str, namespace: str, timeout: float = 60) -> None:
    """Kill the named actor and wait until a call to it fails: from then on no work of it can complete."""
    handle = ray.get_actor(name, namespace=namespace)
    ray.kill(handle, no_restart=True)
    wait_dead(ray, handle, timeout, f"{name} to be dead after ray.kill")


def wait_dead(ray, handle, timeout: float, what: str) -> None:
    """Wait until a call to `handle` fails with the actor's death (a killed actor, a removed node)."""

    def dead() -> bool:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:  # its node is gone and Ray has not said so yet
            pass
        return False

    wait_for(dead, timeout, what)


# -- the gate -----------------------------------------------------------------------------------------------------
class Gate:
    """Holds every caller of enter() until open() (an async actor: enter() and open() run side by side)."""

    def __init__(self):
        self._open = asyncio.Event()
        self._held = 0

    async def enter(self) -> None:
        self._held += 1
        await self._open.wait()

    async def open(self) -> None:
        self._open.set()

    async def held(self) -> int:
        return self._held


def start_gate(ray, name: str):
    """The named Gate actor, on this process's node (never on a node a test removes)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options = {"name": name, "namespace": GATE_NAMESPACE, "num_cpus": 0, "scheduling_strategy": here}
    gate = ray.remote(Gate).options(**options).remote()
    ray.get(gate.held.remote(), timeout=120)
    return gate


def wait_held(ray, gate, timeout: float, what: str, run_ref=None) -> None:
    """Wait until a reward worker is held at the gate (the driver is inside the held step)."""
    wait_for_event(lambda: ray.get(gate.held.remote(), timeout=30) > 0, timeout, what, run_ref)


def held_workers(gate: str, hold_from: int):
    """`Workers` of a job (cluster.launch.training_workers) whose reward workers wait at the gate `gate` before
    scoring any group generated by policy version >= hold_from."""
    import ray

    from cluster.launch import training_workers
    from cluster.pools.topology import Workers

    real = training_workers()

    class HeldReward(real.reward):
        def score(self, groups, *samples):
            if any(g.policy_version >= hold_from for g in groups):
                ray.get(ray.get_actor(gate, namespace=GATE_NAMESPACE).enter.remote())
            return super().score(groups, *samples)

    return Workers(rollout=real.rollout, reward=HeldReward, learner=real.learner)


def start_held_job(cfg, gate: str, hold_from: int, resume: bool = False):
    """conftest.start_job, its reward workers holding at the gate (held_workers)."""
    from cluster.launch import DriverActor
    from cluster.pools.topology import spawn_driver

    workers = functools.partial(held_workers, gate, hold_from)
    driver = spawn_driver(cfg, DriverActor, cfg, workers, resume)
    return driver, driver.run.remote()


def kill_gate(ray, gate) -> None:
    ray.kill(gate, no_restart=True)


def _stop_main(namespace: str) -> int:
    """request_stop of the job's driver in `namespace` of the cluster at RAY_ADDRESS."""
    import ray

    ray.init(namespace=namespace, log_to_driver=False, logging_level="ERROR")
    try:
        ray.get(ray.get_actor("driver", namespace=namespace).request_stop.remote(), timeout=60)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "stop":
        sys.exit("usage: python -m tests.e2e.run_control stop NAMESPACE")
    sys.exit(_stop_main(sys.argv[2]))
