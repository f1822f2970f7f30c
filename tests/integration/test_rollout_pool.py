"""The rollout pool on a real local Ray: RolloutWorker actors named rollout-<i> (cluster/pools/topology.py) with the
transformers engine and the tiny Qwen2.5-VL. A killed actor is replaced and its requests answered exactly once; its
replacement, which missed the weight update, refuses (StaleWeightsError), is resynced by the pool's on_error and
the request retried by the pool, once; the pool grows and shrinks mid-run; every group is stamped with the version
that generated it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from actors.engine import StaleWeightsError
from actors.worker import RolloutWorker
from cluster.config import build_config
from cluster.pools.actor_pool import WorkFailed
from cluster.pools.topology import make_rollout_pool
from protos import RolloutRequest, Sample, SamplingConfig
from tests.support.pool_results import DEADLINE_S, collect_exactly_once, wait_until_dead

pytestmark = pytest.mark.usefixtures("ray_local")

NAMESPACE = "segr1-test-rollout"


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    """The session's tiny Qwen2.5-VL (tests/conftest.py)."""
    return tiny_policy_dir


def _cfg(policy, workers: int):
    return build_config(
        {
            "model": {"policy": str(policy)},
            "prompt": {"preset": "compact"},  # the tiny policy's short prompts
            "rollout": {"engine": "hf", "num_workers": workers, "resources": {"num_cpus": 0}},
            "data": {"image_size": 56},
            "placement": {"namespace": NAMESPACE},
        }
    )


def _weights(policy, scale: float):
    """Every parameter of the tiny policy, changed, as (name, tensor) with Hugging Face names."""

    from runtime.qwen_vl import load_policy

    model = load_policy(policy, "float32", "cpu")
    return [(n, p.detach() * scale) for n, p in model.named_parameters()]


def _sample(i: int) -> Sample:
    rng = np.random.default_rng(i)
    buf, mbuf = io.BytesIO(), io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    Image.fromarray((rng.random((48, 64)) > 0.5).astype(np.uint8)).save(mbuf, format="PNG")
    return Sample(
        id=f"s{i}", source="test", split="train", task="foreground", instruction="Segment it.",
        image=buf.getvalue(), mask=mbuf.getvalue(), width=64, height=48,
    )  # fmt: skip


def _request(i: int, version: int) -> RolloutRequest:
    return RolloutRequest(
        request_id=f"r{i}",
        sample_id=f"s{i}",
        instruction="Segment it.",
        group_size=2,
        sampling=SamplingConfig(max_tokens=4, seed=i),
        min_policy_version=version,
    )


def _generate_call(ray, i: int, version: int, sample_refs: dict):
    return lambda handle: handle.generate.remote([_request(i, version)], sample_refs[i])


def _collect(pool, keys) -> dict:
    results = collect_exactly_once(pool, keys)
    for value in results.values():
        assert not isinstance(value, WorkFailed), value.error
    return {key: value[0] for key, value in results.items()}


def test_killed_worker_is_replaced_resynced_by_the_pool_and_each_request_answered_once(ray_local, policy):
    """One worker, so that its replacement must take the work: version 1 pushed, the worker killed (and seen
    dead) before a request is sent. The request goes to the dead actor, is re-issued to the replacement, which
    holds version 0 and refuses it; on_error (the driver's repair) resyncs it, the pool retries, and it answers
    with version 1. The stale refusal happens exactly once: every later request is served at version 1."""
    ray = ray_local
    state = {"ref": ray.put(_weights(policy, 1.5)), "version": 1}
    refused = []

    def on_error(
        handle, err
    ) -> bool:  # what the driver does (cluster/driver/loop.py): push the current weights
        if isinstance(err, StaleWeightsError):
            refused.append((err.worker, err.held, err.needed))
            ray.get(handle.load_weights.remote(state["ref"], state["version"]))
            return True
        return False

    pool = make_rollout_pool(_cfg(policy, 1), RolloutWorker, on_error=on_error)
    try:
        assert pool.broadcast(lambda h: h.load_weights.remote(state["ref"], 1)) == {"rollout-0": 1}
        victim = pool.handles()["rollout-0"]
        ray.kill(victim, no_restart=True)
        wait_until_dead(ray, victim)  # a request sent now cannot reach the old actor
        refs = {i: ray.put(_sample(i)) for i in range(4)}
        pool.submit(0, _generate_call(ray, 0, 1, refs))
        groups = _collect(pool, [0])
        assert refused == [("rollout-0", 0, 1)]  # the replacement refused once, then was resynced
        assert pool.stats.restarts == 1 and pool.stats.failed == 0
        for i in range(1, 4):
            pool.submit(i, _generate_call(ray, i, 1, refs))
        groups.update(_collect(pool, range(1, 4)))
        assert all(g.policy_version == 1 and g.group_id == f"r{i}" for i, g in groups.items())
        assert {g.worker for g in groups.values()} == {"rollout-0"}
        assert refused == [("rollout-0", 0, 1)] and pool.stats.completed == 4 and pool.pending == 0
        assert ray.get(pool.handles()["rollout-0"].ping.remote())["policy_version"] == 1
    finally:
        pool.shutdown()


def test_pool_grows_and_shrinks_mid_run_with_current_weights(ray_local, policy):
    ray = ray_local
    state = {"ref": ray.put(_weights(policy, 0.5)), "version": 3}

    started = []

    def on_start(handle):  # a new worker receives the current weights before it serves
        started.append(handle.load_weights.remote(state["ref"], state["version"]))
        return started[-1:]

    pool = make_rollout_pool(_cfg(policy, 1), RolloutWorker, on_start=on_start)
    try:
        refs = {i: ray.put(_sample(i)) for i in range(10)}
        for i in range(3):
            pool.submit(i, _generate_call(ray, i, 3, refs))
        pool.resize(3)
        assert pool.names == ["rollout-0", "rollout-1", "rollout-2"]
        for i in range(3, 8):
            pool.submit(i, _generate_call(ray, i, 3, refs))
        first = _collect(pool, range(8))
        ray.get(
            started, timeout=DEADLINE_S
        )  # all started: shrinking drains the newest (an actor still starting would go first)
        pool.resize(1)  # the two newest drain and go
        for i in range(8, 10):
            pool.submit(i, _generate_call(ray, i, 3, refs))
        second = _collect(pool, range(8, 10))
        groups = {**first, **second}
        assert sorted(groups) == list(range(10))
        assert all(g.policy_version == 3 for g in groups.values())
        assert {g.worker for g in second.values()} == {"rollout-0"}
        assert pool.names == ["rollout-0"] and pool.pending == 0
        pings = [ray.get(h.ping.remote()) for h in pool.handles().values()]
        assert [p["policy_version"] for p in pings] == [3]
    finally:
        pool.shutdown()
