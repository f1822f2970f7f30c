"""The best split of N GPUs between the rollout, reward and learner pools (`segr1 plan --throughput --gpus N`):
every count of rollout workers, reward workers and learner ranks that fits in N GPUs at the config's GPUs per
actor (rollout: its tensor-parallel degree) and in memory (the learner's plan at that many FSDP ranks), predicted
by the throughput model (cluster/plan/throughput.py), best first."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.plan.throughput import Prediction, Profile, Shape, predict, with_split


@dataclass
class Split:
    rollout_workers: int
    reward_workers: int
    learner_ranks: int
    gpus: float
    prediction: Prediction


def gpus_per_actor(cfg) -> tuple[float, float, float]:
    """GPUs one rollout worker, one reward worker and one learner rank take (0 on a CPU-only config)."""
    rollout = cfg.rollout.resources.num_gpus
    if rollout > 0:
        rollout = max(rollout, cfg.rollout.tensor_parallel_size)
    learner = cfg.learner.resources.num_gpus or (1.0 if cfg.learner.num_gpus > 0 else 0.0)
    return rollout, cfg.reward.resources.num_gpus, learner


def best_splits(
    shape: Shape, cfg, profile: Profile, gpus: int, learner_fits=None, top: int = 5
) -> list[Split]:
    """The splits of `gpus` GPUs for cfg's `shape` (Shape.from_config), most samples/s first (fewer GPUs first
    on a tie). `learner_fits(ranks)` says whether the learner fits in memory at that many ranks (default:
    always)."""
    per = gpus_per_actor(cfg)
    if min(per) <= 0:
        raise ValueError("a split of GPUs needs a GPU config: every pool with resources.num_gpus > 0")
    out = []
    for ranks in range(1, int(gpus / per[2]) + 1):
        if learner_fits is not None and not learner_fits(ranks):
            continue
        left = gpus - ranks * per[2]
        for rollout in range(1, int(left / per[0]) + 1):
            room = left - rollout * per[0]
            for reward in range(1, int(room / per[1] + 1e-9) + 1):
                used = ranks * per[2] + rollout * per[0] + reward * per[1]
                p = predict(with_split(shape, rollout, reward, ranks), profile)
                out.append(Split(rollout, reward, ranks, _gpu_count(used), p))
    out.sort(key=lambda s: (-s.prediction.samples_per_s, s.gpus))
    return out[:top]


def _gpu_count(used: float) -> float:
    return math.ceil(used - 1e-9) if used > 1 else round(used, 3)
