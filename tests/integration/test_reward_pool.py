"""The reward pool on a real local Ray: RewardWorker actors named reward-<i> (cluster/pools/topology.py), a killed actor
is restarted and every group is answered exactly once, with the same rewards as an in-process worker."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.config import TrainConfig
from cluster.pools.topology import make_reward_pool
from protos import Completion, GroupScores, RolloutGroup, Sample
from protos.answer import format_answer
from reward_service.worker import RewardWorker
from runtime.images import encode_png
from tests.support.pool_results import collect_exactly_once, wait_until_dead

pytestmark = pytest.mark.usefixtures("ray_local")

NAMESPACE = "segr1-test-reward"


def _sample(i: int) -> Sample:
    rng = np.random.default_rng(i)
    image = np.clip(rng.normal(100, 10, (96, 128, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:96, 0:128]
    cx, cy = 40 + 6 * i, 30 + 4 * i
    gt = (yy - cy) ** 2 + (xx - cx) ** 2 < 18**2
    image[gt] = (200, 40, 40)
    return Sample(
        id=f"s{i}",
        source="test",
        split="train",
        task="foreground",
        instruction="segment",
        image=encode_png(image),
        mask=encode_png(gt),
        width=128,
        height=96,
    )


def _group(i: int) -> RolloutGroup:
    s = 64 / 128  # the policy saw 64x64
    cx, cy = (40 + 6 * i) * s, (30 + 4 * i) * 64 / 96
    texts = [
        format_answer([[cx - 10, cy - 10, cx + 10, cy + 10]], [[cx, cy]], [1], "the disk"),
        format_answer([[2, 2, 62, 62]], [[cx, cy]], [1], "everything"),
        "no answer",
        format_answer([[cx - 6, cy - 6, cx + 6, cy + 6]], [[cx, cy]], [1], ""),
    ]
    comps = [Completion(text=t, token_ids=[1], logprobs=[-0.2]) for t in texts]
    return RolloutGroup(
        temperature=1.0,
        max_tokens=64,
        prompt_token_ids=[1, 2, 3],
        group_id=f"g{i}",
        sample_id=f"s{i}",
        policy_version=1,
        completions=comps,
    )


def test_killed_reward_actor_every_group_answered_once(ray_local):
    cfg = TrainConfig(
        data={"image_size": 64},
        reward={"num_workers": 2, "max_inflight_per_worker": 2, "resources": {"num_cpus": 0}},
        placement={"namespace": NAMESPACE},
    )
    pool = make_reward_pool(cfg, RewardWorker)
    try:
        assert pool.names == ["reward-0", "reward-1"]
        handles = pool.handles()
        assert ray_local.get(handles["reward-0"].ping.remote())["segmenter"] == "grabcut"
        n = 10
        refs = {i: ray_local.put(_sample(i)) for i in range(n)}  # each sample in the object store once
        victim = ray_local.get_actor("reward-0", namespace=NAMESPACE)
        ray_local.kill(victim, no_restart=True)
        wait_until_dead(ray_local, victim)  # the pool has not seen it: it still sends reward-0 its share
        for i in range(n):
            pool.submit(f"g{i}", lambda a, i=i: a.score.remote([_group(i)], refs[i]))
        results: dict[str, list[GroupScores]] = collect_exactly_once(pool, [f"g{i}" for i in range(n)])
        assert pool.pending == 0 and pool.stats.restarts == 1
        assert pool.stats.retries >= 1  # the groups sent to the dead actor were re-issued, not lost
        assert pool.stats.completed == n and pool.stats.failed == 0
        assert "reward-0" in pool.names  # restarted under its own name
        assert (
            ray_local.get(ray_local.get_actor("reward-0", namespace=NAMESPACE).ping.remote())["name"]
            == "reward-0"
        )
        local = RewardWorker(cfg.policy_spec(), cfg.reward, name="local")
        for i in range(n):
            [gs] = results[f"g{i}"]
            assert gs.group_id == f"g{i}" and gs.reward_worker in ("reward-0", "reward-1")
            [want] = local.score([_group(i)], _sample(i))
            assert gs.totals == pytest.approx(want.totals)
        assert results["g0"][0].scores[2].parse_failure == "missing_bbox"
    finally:
        pool.shutdown()
