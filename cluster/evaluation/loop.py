"""The evaluation loop: rollout + segmenter, no learner, every sample exactly once, in a fixed order.

The core is `evaluate_samples(rollout, predictor, samples, ...)`: `rollout` is anything with
`generate(requests, *samples) -> list[RolloutGroup]` (an in-process actors.worker.RolloutWorker, or
`PoolRollout` over the Ray rollout pool) and `predictor` anything with `predict(groups, *samples)` and
`baseline_masks(kind, *samples)` (an in-process reward_service.predictor.Predictor, or `PoolPredictor` over Ray
actors, cluster/evaluation/on_ray.py). `evaluate(...) -> dict` gives the figures alone (the demo's before / after);
`segr1 eval` writes cluster/evaluation/report.py's `write_outputs(...)`.

Per sample, the prediction is completion 0 of its group (greedy decoding by default, so the group's completions
are identical; RolloutRequest needs G >= 2). A completion that does not parse into prompts, or whose group failed,
is scored as an EMPTY mask and counted in `missing`: never replaced by another sample's prediction. Predicted
masks are at each image's original size (the parser maps the policy's coordinates back to the original pixels and
the segmenter runs on the original image).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cluster.evaluation.metrics import DatasetMeters, IoUMeter, iou, s_measure
from cluster.evaluation.refine import refine_chunk, refinement_summary
from protos import RolloutGroup, RolloutRequest, Sample, SamplingConfig
from reward_service.predictor import BASELINES, CompletionPrediction
from reward_service.rewards import box_iou, enclosing_box, mask_bbox

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# Per-sample results


@dataclass
class SampleResult:
    id: str
    source: str
    split: str
    task: str
    instruction: str
    text: str
    parse_ok: bool
    parse_failure: str | None
    missing: bool  # no usable prediction: scored as an empty mask
    iou: float
    s_measure: float
    box_iou: float | None
    boxes: list[tuple[float, float, float, float]]  # predicted boxes, original pixels
    num_tokens: int
    finish_reason: str
    # the predicted 0/1 mask as PNG; None when missing
    mask_png: bytes | None = field(default=None, repr=False)
    # an episode of several turns (rollout.max_turns > 1): the answers it took, whether it ended with a stop, the
    # IoU of its first turn's mask (= iou for one turn) and the masks of the turns before the last (PNG or None)
    turns: int = 1
    stop: bool = False
    iou_turn1: float = 0.0
    earlier_png: list[bytes | None] = field(default_factory=list, repr=False)


def score_sample(
    sample: Sample,
    group: RolloutGroup | None,
    pred: CompletionPrediction | None,
    answer_format: str,
    gt: np.ndarray,
) -> SampleResult:
    """One sample's result from completion 0 of its group (None: the group or its scoring failed)."""
    from runtime.images import encode_png

    completion = group.completions[0] if group is not None else None
    mask = pred.mask if pred is not None else None
    earlier = pred.earlier if pred is not None else []
    last_iou = iou(mask, gt)
    true_box = mask_bbox(gt)
    b_iou = None
    if true_box is not None and answer_format == "full":
        pbox = enclosing_box(pred.boxes) if pred is not None else None
        b_iou = box_iou(pbox, true_box) if pbox is not None else 0.0
    return SampleResult(
        id=sample.id,
        source=sample.source,
        split=sample.split,
        task=sample.task,
        instruction=sample.instruction,
        text=completion.text if completion is not None else "",
        parse_ok=bool(pred is not None and pred.parse_ok),
        parse_failure=(pred.failure if pred is not None else "generation_failed"),
        missing=mask is None,
        iou=last_iou,
        s_measure=s_measure(mask, gt),
        box_iou=b_iou,
        boxes=list(pred.boxes) if pred is not None else [],
        num_tokens=len(completion.token_ids) if completion is not None else 0,
        finish_reason=completion.finish_reason if completion is not None else "abort",
        mask_png=None if mask is None else encode_png(mask),
        turns=len(earlier) + 1,
        stop=bool(pred is not None and pred.stop),
        iou_turn1=iou(earlier[0].mask, gt) if earlier else last_iou,
        earlier_png=[None if p.mask is None else encode_png(p.mask) for p in earlier],
    )


# ------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class EvalRun:
    summary: dict
    results: list[SampleResult]


def check_unique_ids(samples: Sequence[Sample]) -> None:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise ValueError(
                f"sample id {s.id!r} appears twice; evaluation covers every sample once, so ids must be unique "
                "(re-import the data set, or evaluate its shards separately)"
            )
        seen.add(s.id)


def make_requests(
    chunk: Sequence[Sample],
    start: int,
    group_size: int,
    sampling: SamplingConfig,
    seed: int,
    max_tokens: Mapping[str, int] | None = None,
):
    """One request per sample; sample k of the run gets the sampling seed `seed + k` (reproducible sampling) and
    the new-token limit of its task (`max_tokens[task]`; None: sampling.max_tokens)."""
    out = []
    for k, s in enumerate(chunk):
        limit = max_tokens.get(s.task, sampling.max_tokens) if max_tokens else sampling.max_tokens
        task_sampling = SamplingConfig(**{**sampling.model_dump(), "max_tokens": limit})
        out.append(
            RolloutRequest.for_sample(
                s,
                group_size,
                task_sampling,
                request_id=f"eval-{start + k}",
                seed=seed + start + k,
                purpose="eval",
            )
        )
    return out


def _generate(rollout, requests, chunk) -> list[RolloutGroup | None]:
    """The chunk's groups, in order; a failed call or a group for the wrong sample becomes None (missing)."""
    try:
        groups = list(rollout.generate(requests, *chunk))
    except Exception as err:
        logger.warning("eval: generate failed for %d samples (%s); they count as missing", len(chunk), err)
        return [None] * len(chunk)
    if len(groups) != len(chunk):
        logger.warning(
            "eval: generate returned %d groups for %d samples; all count as missing", len(groups), len(chunk)
        )
        return [None] * len(chunk)
    return [g if g is not None and g.sample_id == s.id else None for g, s in zip(groups, chunk, strict=True)]


def _predict(predictor, groups, chunk) -> list[CompletionPrediction | None]:
    idx = [k for k, g in enumerate(groups) if g is not None]
    out: list[CompletionPrediction | None] = [None] * len(chunk)
    if not idx:
        return out
    try:
        preds = predictor.predict([groups[k] for k in idx], *[chunk[k] for k in idx])
    except Exception as err:
        logger.warning("eval: scoring failed for %d samples (%s); they count as missing", len(idx), err)
        return out
    for k, per_group in zip(idx, preds, strict=True):
        out[k] = per_group[0] if per_group else None
    return out


def _chunks(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def evaluate_samples(
    rollout,
    predictor,
    samples: Sequence[Sample],
    *,
    sampling: SamplingConfig | None = None,
    max_tokens: Mapping[str, int] | None = None,
    group_size: int = 2,
    batch_size: int = 8,
    seed: int = 0,
    answer_format: str = "full",
    baselines: bool = True,
    progress: bool | str = False,
    turns: int = 1,
) -> EvalRun:
    """Every sample once, in the given order; see the module docstring. `progress`: a bar (a string: its label).
    `turns` > 1: each sample's policy looks again at the mask it made (cluster/evaluation/refine.py); its results
    are the last turn's, with the turn-1 IoU and the episodes' turns in the summary's `refinement`."""
    from tqdm import tqdm

    check_unique_ids(samples)
    sampling = sampling or SamplingConfig(temperature=0.0, max_tokens=400)
    results: list[SampleResult] = []
    meters = DatasetMeters()
    desc = progress if isinstance(progress, str) else "eval"
    bar = tqdm(total=len(samples), desc=desc, unit="sample", disable=not progress)
    for start, chunk in _chunks(samples, batch_size):
        requests = make_requests(chunk, start, group_size, sampling, seed, max_tokens)
        groups = _generate(rollout, requests, chunk)
        preds = _predict(predictor, groups, chunk)
        if turns > 1:
            preds = refine_chunk(rollout, predictor, chunk, groups, preds, turns, sampling)
        results += score_chunk(chunk, groups, preds, answer_format, meters)
        bar.update(len(chunk))
    bar.close()
    base = constant_baselines(predictor, samples, batch_size) if baselines else {}
    summary = summarize(results, base, meters)
    if turns > 1:
        summary["refinement"] = refinement_summary(results, turns)
    return EvalRun(summary, results)


def score_chunk(
    chunk: Sequence[Sample],
    groups: Sequence[RolloutGroup | None],
    preds: Sequence[CompletionPrediction | None],
    answer_format: str,
    meters: DatasetMeters,
) -> list[SampleResult]:
    """Each sample's result (score_sample) from its group and prediction (None: failed, scored as missing), also
    added to `meters`. Shared by evaluate_samples and validation during training (cluster/driver/validation.py)."""
    from runtime.images import decode_mask

    out = []
    for sample, group, pred in zip(chunk, groups, preds, strict=True):
        gt = decode_mask(sample.mask, f"sample {sample.id!r}: mask")  # (H, W) bool
        result = score_sample(sample, group, pred, answer_format, gt)
        out.append(result)
        meters.add(
            f"{result.source}/{result.split}", result.task, result.id, None if pred is None else pred.mask, gt
        )
    return out


def constant_baselines(predictor, samples: Sequence[Sample], batch_size: int = 8) -> dict:
    """{kind: {"mean_iou", "missing"}} of the whole-image and centre boxes given to the same segmenter."""
    from runtime.images import decode_mask

    out = {}
    for kind in BASELINES:
        meter = IoUMeter()
        for _, chunk in _chunks(samples, batch_size):
            try:
                masks = predictor.baseline_masks(kind, *chunk)
            except Exception as err:
                logger.warning("eval: baseline %s failed (%s)", kind, err)
                masks = [None] * len(chunk)
            for s, m in zip(chunk, masks, strict=True):
                meter.add(m, decode_mask(s.mask), key=s.id)
        res = meter.results()
        out[kind] = {"mean_iou": res["giou"], "missing": res["missing"]}
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(results: Sequence[SampleResult], baselines: dict, meters: DatasetMeters) -> dict:
    """The figures of a run: overall (mean_iou, s_measure, parse_rate, box_iou, ...) and per data set."""
    n = len(results)
    summary = {
        "n": n,
        "parse_rate": sum(r.parse_ok for r in results) / n if n else math.nan,
        "missing": sum(r.missing for r in results),
        "mean_iou": _mean(r.iou for r in results),
        "s_measure": _mean(r.s_measure for r in results),
        "box_iou": _mean(r.box_iou for r in results),
        "constant_baseline": baselines,
    }
    summary["datasets"] = meters.results()
    return summary


def evaluate(rollout, predictor, samples: Sequence[Sample], **kwargs) -> dict:
    """The figures of `evaluate_samples` (mean_iou, s_measure, parse_rate, box_iou, constant_baseline, missing,
    datasets); what the demo reports before and after RL."""
    return evaluate_samples(rollout, predictor, samples, **kwargs).summary


def settings_from_config(cfg, greedy: bool = True) -> dict:
    """evaluate_samples keyword arguments from a TrainConfig: greedy, the configured sampling (greedy=False), or
    with eval.generation_config the policy folder's generation_config.json; the new-token limit per task
    (eval.max_tokens); G=2 (the smallest group a RolloutRequest allows) unless sampling as configured; the
    rollout batch, the reward's answer format and the job seed."""
    from cluster.evaluation.inputs import generation_config_sampling

    if cfg.eval.generation_config and not greedy:
        raise ValueError(
            "eval.generation_config=true decodes as the policy's generation_config.json; drop --sample "
            "(rollout.sampling) or set eval.generation_config=false"
        )
    tokens = cfg.eval.max_tokens.model_dump()
    if cfg.eval.generation_config:
        sampling = SamplingConfig(
            **generation_config_sampling(cfg.model.policy), max_tokens=tokens["foreground"]
        )
    elif greedy:
        sampling = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=tokens["foreground"])
    else:
        s = cfg.rollout.sampling
        sampling = SamplingConfig(temperature=s.temperature, top_p=s.top_p, max_tokens=tokens["foreground"])
    return {
        "sampling": sampling,
        "max_tokens": tokens,
        "group_size": cfg.grpo.group_size if not greedy else 2,
        "batch_size": cfg.rollout.max_batch_groups * cfg.rollout.num_workers,
        "seed": cfg.seed,
        "answer_format": cfg.reward.answer_format,
        "turns": cfg.rollout.max_turns,  # a policy trained to look again is evaluated looking again
    }
