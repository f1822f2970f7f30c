"""The rollout pool on a real local Ray: RolloutWorker actors named rollout-<i> (cluster/topology.py) with the
transformers engine and the tiny Qwen2.5-VL. A killed actor is replaced and its requests answered exactly once; a
replacement that missed a weight update is detected (StaleWeightsError) and resynced before it generates; the
pool grows and shrinks mid-run; every group is stamped with the version that generated it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from actors.engine import StaleWeightsError
from actors.worker import RolloutWorker
from cluster.config import build_config
from cluster.pool import WorkFailed
from cluster.topology import make_rollout_pool
from protos import RolloutRequest, Sample, SamplingConfig

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


def _collect(pool, n: int) -> dict:
    results = {}
    while len(results) < n:
        for key, value in pool.poll(timeout=10):
            assert key not in results, f"request {key} answered twice"
            assert not isinstance(value, WorkFailed), value.error
            results[key] = value[0]
    return results


def test_killed_worker_is_replaced_resynced_and_each_request_answered_once(ray_local, policy):
    ray = ray_local
    state = {"ref": None, "version": 0}
    resyncs = []

    def on_error(handle, err) -> bool:  # what the driver does: push the current weights, then retry
        if isinstance(err, StaleWeightsError) and state["ref"] is not None:
            resyncs.append(err.worker)
            ray.get(handle.load_weights.remote(state["ref"], state["version"]))
            return True
        return False

    pool = make_rollout_pool(_cfg(policy, 2), RolloutWorker, on_error=on_error)
    try:
        state["ref"], state["version"] = ray.put(_weights(policy, 1.5)), 1
        versions = pool.broadcast(lambda h: h.load_weights.remote(state["ref"], 1))
        assert versions == {"rollout-0": 1, "rollout-1": 1}
        refs = {i: ray.put(_sample(i)) for i in range(6)}
        for i in range(6):
            pool.submit(i, _generate_call(ray, i, 1, refs))
        ray.kill(ray.get_actor("rollout-0", namespace=NAMESPACE), no_restart=True)
        groups = _collect(pool, 6)
        assert sorted(groups) == list(range(6))
        assert all(g.policy_version == 1 and g.group_id == f"r{i}" for i, g in groups.items())
        assert {g.worker for g in groups.values()} <= {"rollout-0", "rollout-1"}
        assert pool.stats.restarts == 1 and pool.stats.completed == 6
        # The replacement started on version 0: a request it took was refused, resynced, then answered.
        assert set(resyncs) <= {"rollout-0"}
        replacement = pool.handles()["rollout-0"]
        if ray.get(replacement.ping.remote())["policy_version"] == 0:  # it took none of the re-issued work
            with pytest.raises(StaleWeightsError, match="holds policy version 0"):
                ray.get(replacement.generate.remote([_request(0, 1)], refs[0]))
            ray.get(replacement.load_weights.remote(state["ref"], 1))
        else:
            assert resyncs == ["rollout-0"] * len(resyncs) and resyncs
        again = ray.get(replacement.generate.remote([_request(0, 1)], refs[0]))
        assert again[0].policy_version == 1 and again[0].worker == "rollout-0"
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
        first = _collect(pool, 8)
        ray.get(started)  # all started: shrinking drains the newest (an actor still starting would go first)
        pool.resize(1)  # the two newest drain and go
        for i in range(8, 10):
            pool.submit(i, _generate_call(ray, i, 3, refs))
        second = _collect(pool, 2)
        groups = {**first, **second}
        assert sorted(groups) == list(range(10))
        assert all(g.policy_version == 3 for g in groups.values())
        assert {g.worker for g in second.values()} == {"rollout-0"}
        assert pool.names == ["rollout-0"] and pool.pending == 0
        pings = [ray.get(h.ping.remote()) for h in pool.handles().values()]
        assert [p["policy_version"] for p in pings] == [3]
    finally:
        pool.shutdown()
