"""Where vLLM shares a GPU with the learner and SAM2 (qwen3b-1gpu.yaml's fractions of one GPU), the driver starts
the rollout engines first and creates the learner and the reward workers only once every engine has finished
starting (vLLM has profiled the device's memory by then: cluster/pools/placement.py `start_phases`). On a local
Ray advertising one GPU (no device is used) with stand-in workers that log their start (tests/support/start_order.py):
the order is read from that log, not from timings. Which configs share a GPU: tests/unit/cluster/pools/."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import e2e_config, kill_job_actors
from tests.support.start_order import LoggedLearner, LoggedReward, LoggedRollout, start_log

pytestmark = pytest.mark.slow

NAMESPACE = "segr1-start-order"
ONE_GPU_SHARED = [  # qwen3b-1gpu.yaml's fractions of one GPU, on the e2e demo
    "rollout.engine=vllm",
    "rollout.resources.num_gpus=0.3",
    "reward.resources.num_gpus=0.1",
    "learner.resources.num_gpus=0.6",
]


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    """A local Ray that advertises one GPU; the session's Ray (if any) is put aside and started again after."""
    import ray

    from tests.conftest import LOCAL_RAY, init_session_ray

    had_session_ray = ray.is_initialized()
    if had_session_ray:
        ray.shutdown()
    ray.init(**{**LOCAL_RAY, "num_gpus": 1})
    try:
        yield ray
    finally:
        ray.shutdown()
        if had_session_ray:
            init_session_ray()


def test_rollout_engines_finish_starting_before_the_learner_and_reward_workers_are_created(
    assets, ray_with_a_gpu, tmp_path
):
    from cluster.driver.loop import TrainDriver
    from cluster.pools.topology import Workers

    ray = ray_with_a_gpu
    cfg = e2e_config(
        assets, tmp_path, *ONE_GPU_SHARED, "metrics.trackers=[jsonl]", f"placement.namespace={NAMESPACE}"
    )
    log = start_log()
    workers = lambda: Workers(rollout=LoggedRollout, reward=LoggedReward, learner=LoggedLearner)  # noqa: E731
    driver = TrainDriver(cfg, workers)
    try:
        assert driver.reward.wait_started(timeout=120)  # the last phase may still be starting
        events = ray.get(log.read.remote())
    finally:
        driver.close()
        ray.kill(log)
        kill_job_actors(ray, NAMESPACE)
    assert sorted(events) == sorted(
        f"{a} {e}" for a in ("rollout-0", "reward-0", "learner-0") for e in ("start", "up")
    ), events
    rollout_up = events.index("rollout-0 up")
    assert rollout_up < events.index("learner-0 start"), events
    assert rollout_up < events.index("reward-0 start"), events
