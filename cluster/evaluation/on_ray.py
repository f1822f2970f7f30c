"""Evaluation on Ray: the loop of cluster/evaluation/loop.py over the rollout pool and a pool of `eval-<i>`
Predictor actors (reward_service.predictor.Predictor on the reward pool's resources, cluster/pools/topology.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cluster.evaluation.loop import evaluate_samples
from protos import Sample

logger = logging.getLogger(__name__)


class SampleRefs:
    """Each sample goes into the object store once, shared by both pools."""

    def __init__(self) -> None:
        self._refs: dict[str, object] = {}

    def __call__(self, samples: Sequence[Sample]) -> list:
        import ray

        for s in samples:
            if s.id not in self._refs:
                self._refs[s.id] = ray.put(s)
        return [self._refs[s.id] for s in samples]


def _pool_call(
    pool,
    method: str,
    chunk: int,
    args_per_item: Sequence,
    samples: Sequence[Sample],
    refs: SampleRefs,
    lead=(),
):
    """Split items into chunks, run `handle.<method>.remote(*lead, items, *sample_refs)` on the pool, return the
    flattened results in order (None for each item of a failed chunk)."""
    from cluster.pools.actor_pool import WorkFailed

    sample_refs = refs(samples)
    calls = []
    for k, start in enumerate(range(0, len(samples), chunk)):
        items = list(args_per_item[start : start + chunk]) if args_per_item is not None else None
        srefs = sample_refs[start : start + chunk]
        head = (*lead, items) if items is not None else tuple(lead)

        def call(h, head=head, srefs=srefs):
            return getattr(h, method).remote(*head, *srefs)

        calls.append((k, call, len(srefs)))
    results = pool.map([(k, c) for k, c, _ in calls])
    out: list = []
    for k, _, n in calls:
        res = results[k]
        if isinstance(res, WorkFailed):
            logger.warning("eval: %s failed on %d samples: %s", method, n, res.error)
            out += [None] * n
        else:
            out += list(res)
    return out


class PoolRollout:
    """`generate(requests, *samples)` over the Ray rollout pool, max_batch_groups groups per actor call."""

    def __init__(self, pool, refs: SampleRefs, chunk: int):
        self.pool, self.refs, self.chunk = pool, refs, chunk

    def generate(self, requests, *samples):
        return _pool_call(self.pool, "generate", self.chunk, requests, samples, self.refs)

    def next_turns(self, prompt_ids, answers, images, sampling):
        """RolloutWorker.next_turns (refinement's later turns) on one actor of the pool; raises when it fails
        (cluster/evaluation/refine.py then counts the chunk's samples as they stood)."""
        from cluster.pools.actor_pool import WorkFailed

        call = lambda h: h.next_turns.remote(prompt_ids, answers, images, sampling)  # noqa: E731
        out = self.pool.map([(0, call)])[0]
        if isinstance(out, WorkFailed):
            raise RuntimeError(f"next turns of {len(prompt_ids)} episodes failed: {out.error}")
        return out


class PoolPredictor:
    """`predict` / `baseline_masks` over the pool of `eval-<i>` Predictor actors."""

    def __init__(self, pool, refs: SampleRefs, chunk: int):
        self.pool, self.refs, self.chunk = pool, refs, chunk

    def predict(self, groups, *samples):
        out = _pool_call(self.pool, "predict", self.chunk, groups, samples, self.refs)
        return [p if p is not None else [] for p in out]

    def predict_answers(self, texts, *samples):
        out = _pool_call(self.pool, "predict_answers", self.chunk, texts, samples, self.refs)
        if any(p is None for p in out):
            raise RuntimeError(f"scoring {len(texts)} later-turn answers failed")
        return out

    def baseline_masks(self, kind: str, *samples):
        return _pool_call(self.pool, "baseline_masks", self.chunk, None, samples, self.refs, lead=(kind,))


def evaluate_on_ray(
    cfg, samples: Sequence[Sample], settings: dict, baselines: bool = True, progress: bool = True
):
    """evaluate_samples with the rollout pool and the Predictor actors of cluster/pools/topology.py (local Ray or
    RAY_ADDRESS)."""
    from actors.worker import RolloutWorker
    from cluster.pools import topology
    from reward_service.predictor import Predictor

    topology.init_ray(cfg)
    rollout_pool = topology.make_rollout_pool(cfg, RolloutWorker, phase="eval")
    predictor_pool = topology.make_eval_scorer_pool(cfg, Predictor)
    refs = SampleRefs()
    try:
        rollout = PoolRollout(rollout_pool, refs, cfg.rollout.max_batch_groups)
        predictor = PoolPredictor(predictor_pool, refs, cfg.rollout.max_batch_groups)
        return evaluate_samples(
            rollout, predictor, samples, **settings, baselines=baselines, progress=progress
        )
    finally:
        rollout_pool.shutdown()
        predictor_pool.shutdown()
