"""Metrics of the training driver: the accounting of every training group (generated = trained + dropped_stale +
filtered, lost = 0; validation's groups are not among them: the pools count those under purpose="val"), the
staleness of what was trained and the latest validation (cluster/driver/validation.py), exported through Ray like every
pool's; and the line metrics.jsonl gets per step (`step_line`: the batch's rewards and staleness, every field of
the learner's StepStats, pool figures)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import ray

from protos import REWARD_TERMS, StepStats
from runtime.metrics import counter, gauge, histogram

logger = logging.getLogger(__name__)

# StepStats fields copied into every metrics.jsonl line under their own names (docs/e2e.md lists them)
LEARNER_KEYS = (
    "loss",
    "kl",
    "clip_fraction",
    "clip_fraction_low",
    "clip_fraction_high",
    "ratio_mean",
    "entropy",
    "first_ratio_mean",
    "first_clip_fraction",
    "is_weight_mean",
    "is_truncated_fraction",
    "is_masked_fraction",
    "mismatch_logp_abs",
    "mismatch_outside_fraction",
    "advantage_abs_mean",
    "num_updates",
    "skipped_non_finite",
    "grad_norm",
    "lr",
    "num_completions",
    "num_tokens",
)
# The other StepStats fields -> their metrics.jsonl key: step and policy_version are the driver's own (equal to the
# learner's: the driver takes its version from the StepStats), num_groups and step_s are named for the line.
RENAMED_KEYS = {
    "step": "step",
    "policy_version": "policy_version",
    "num_groups": "groups",
    "step_s": "learner_s",
}

GROUPS_GENERATED = counter("segr1_driver_groups_generated", "Rollout groups the driver received.")
GROUPS_TRAINED = counter("segr1_driver_groups_trained", "Groups that went into an optimiser step.")
GROUPS_DROPPED_STALE = counter(
    "segr1_driver_groups_dropped_stale", "Groups older than grpo.max_staleness policy versions, dropped."
)
GROUPS_FILTERED = counter(
    "segr1_driver_groups_filtered", "Zero-variance groups filtered out (grpo.filter_zero_variance)."
)
GROUPS_ZERO_VARIANCE = counter(
    "segr1_driver_groups_zero_variance",
    "Scored groups whose G rewards were all equal (no learning signal); filtered when grpo.filter_zero_variance.",
)
ACTOR_RESTARTS = counter("segr1_driver_actor_restarts", "Dead actors replaced by the pools.", ("pool",))
STALENESS = histogram(
    "segr1_driver_staleness",
    "Policy versions between the policy that generated a trained group and the learner's.",
    boundaries=(0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5),
)
STEP = gauge("segr1_driver_step", "Optimiser steps completed by the job.")
VAL_MEAN_IOU = gauge(
    "segr1_driver_val_mean_iou", "Validation (eval.every): mean IoU of the latest validation."
)
VAL_S_MEASURE = gauge("segr1_driver_val_s_measure", "Validation: mean S-measure of the latest validation.")
VAL_PARSE_RATE = gauge("segr1_driver_val_parse_rate", "Validation: share of answers that parsed.")
VAL_BOX_IOU = gauge("segr1_driver_val_box_iou", "Validation: mean box IoU (answer_format=full only).")
VAL_STEP = gauge("segr1_driver_val_step", "Optimiser step of the latest validation.")
VAL_SECONDS = gauge("segr1_driver_val_seconds", "Validation: wall time of the latest validation.")
EPISODE_TURNS = gauge(
    "segr1_driver_episode_turns", "Turns per episode of the latest step's completions (rollout.max_turns)."
)
STOP_RATE = gauge(
    "segr1_driver_stop_rate", "Share of the latest step's episodes that ended with a stop answer."
)
IOU_GAIN = gauge(
    "segr1_driver_iou_gain", "Latest step: mean IoU of the episodes' last masks minus of their first turn's."
)
VALIDATIONS = counter(
    "segr1_driver_validations", "Validations written (one metrics.jsonl line with val/* each)."
)


def step_line(
    stats: StepStats,
    batch: list,
    staleness: list[int],
    sync: dict,
    step_s: float,
    *,
    step: int,
    policy_version: int,
    restarts: int,
    fill_rounds: int = 0,
) -> dict:
    """One metrics.jsonl line: the step's rewards and staleness over `batch` (the RoutedGroups trained: headers
    and scores, cluster/driver/state.py), every field of the learner's StepStats (LEARNER_KEYS, RENAMED_KEYS; its
    counts give the throughput) and the pools' figures."""
    rewards = [c.rewards for r in batch for c in r.scores.scores]
    n = max(1, len(rewards))
    failures = sum(not c.parse_ok for r in batch for c in r.scores.scores)
    line = {
        "step": step,
        "time": time.time(),  # wall clock (Unix seconds) when the step finished
        "policy_version": policy_version,
        **{f"reward_{t}": sum(getattr(r, t) for r in rewards) / n for t in REWARD_TERMS},
        "parse_failure_rate": failures / n,
        "tokens_per_s": stats.num_tokens / step_s if step_s > 0 else 0.0,
        "masks_per_s": stats.num_completions / step_s if step_s > 0 else 0.0,
        "generate_s": max((r.header.generate_s for r in batch), default=0.0),
        "score_s": sum(r.scores.total_s for r in batch),
        "staleness_mean": sum(staleness) / max(1, len(staleness)),
        "staleness_max": max(staleness, default=0),
        **{k: getattr(stats, k) for k in LEARNER_KEYS},
        "learner_s": stats.step_s,
        "weight_sync_s": sync.get("seconds", 0.0),
        **sync_figures(sync),
        "step_s": step_s,
        "groups": stats.num_groups,
        "fill_rounds": fill_rounds,  # sync + filter_zero_variance: extra generation rounds to refill the batch
        "zero_variance_groups": sum(r.zero_variance for r in batch),
        "actor_restarts": restarts,
        "by_rollout_worker": _by_worker(batch),
        "sample_ids": [r.header.sample_id for r in batch],  # what this step trained on (resume / data order)
        **episode_figures(batch),
    }
    return line


def episode_figures(batch: list) -> dict:
    """Episodes of several turns (rollout.max_turns): mean turns per episode, the share that ended with a stop and
    the mean IoU of the first turn's masks (reward_iou is the last's). Also sets their Prometheus gauges."""
    scores = [c for r in batch for c in r.scores.scores]
    n = max(1, len(scores))
    out = {
        "episode_turns_mean": sum(c.num_turns for c in scores) / n,
        "stop_rate": sum(c.stop for c in scores) / n,
        "iou_turn1_mean": sum((c.turns[0] if c.turns else c.rewards).iou for c in scores) / n,
    }
    EPISODE_TURNS.set(out["episode_turns_mean"])
    STOP_RATE.set(out["stop_rate"])
    IOU_GAIN.set(sum(c.rewards.iou for c in scores) / n - out["iou_turn1_mean"])
    return out


def sync_figures(sync: dict) -> dict:
    """The weight publish's figures (cluster/driver/weights.py): bytes sent, and with weight_sync.delta the bytes
    of the whole version, whether it went as a delta, the changed fraction and the encode / decode seconds."""
    out = {"weight_sync_bytes": sync.get("bytes", 0)}
    if "full_bytes" in sync:
        out.update(
            weight_sync_full_bytes=sync["full_bytes"],
            weight_sync_delta=int(bool(sync.get("delta"))),
            weight_sync_encode_s=sync.get("encode_s", 0.0),
            weight_sync_decode_s=sync.get("decode_s", 0.0),
        )
        if "changed_fraction" in sync:
            out["weight_sync_changed_fraction"] = sync["changed_fraction"]
    return out


def _by_worker(batch: list) -> dict[str, dict[str, int]]:
    """Per rollout worker: tokens of the step's trained groups it generated and the oldest policy version used."""
    out: dict[str, dict[str, int]] = {}
    for r in batch:
        h = r.header
        w = out.setdefault(h.worker or "?", {"tokens": 0, "policy_version": h.policy_version})
        w["tokens"] += h.completion_tokens
        w["policy_version"] = min(w["policy_version"], h.policy_version)
    return out


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def step_bar(cfg: Any, shown: bool) -> Any:
    """The bar of optimiser steps: Ray's tqdm, whose state the submitting process draws (log_to_driver)."""
    if not shown:
        return _NoBar()
    from ray.experimental.tqdm_ray import tqdm

    return tqdm(total=cfg.grpo.steps, desc=f"GRPO ({cfg.grpo.mode})", position=0)


def run_summary(d: Any, wall_s: float) -> dict:
    """summary.json: the job's figures at the end of TrainDriver.run (`d`), the accounting first."""
    a = d.acct
    return {
        "steps": d.step,
        "policy_version": d.version,
        "mode": d.cfg.grpo.mode,
        **asdict(a),  # every group's fate (generated = trained + dropped_stale + filtered + left_over)
        "groups_lost": a.groups_lost,
        "actor_restarts": d.rollout.stats.restarts + d.reward.stats.restarts,
        "learner_ranks": d.learner.names,
        "rollout_workers": d.rollout.names,
        "reward_workers": d.reward.names,
        "scale_decisions": d.elastic.decisions,
        "corrupt_samples_skipped": d.reader.num_corrupt,
        "wall_s": wall_s,
        "stopped_early": d.stop_requested and d.step < d.cfg.grpo.steps,
        "weight_sync_aborts": d.weights.aborts,
        "placement": d.placement.summary(),
    }


def overlay_examples(batch: list) -> list[tuple[str, Any]]:
    """(first answer, sample) of each group: the trackers' overlays, fetched only when they draw them (none
    when a rollout was lost with its node)."""
    try:
        return _examples(batch)
    except Exception as err:  # an overlay is not worth failing a step for
        logger.warning("no training overlays this step: %s", err)
        return []


def _examples(batch: list) -> list[tuple[str, Any]]:
    rollouts = ray.get([r.rollout for r in batch])
    samples = ray.get([r.sample for r in batch])
    return [
        (groups[r.index].completions[0].text, s)
        for r, groups, s in zip(batch, rollouts, samples, strict=True)
    ]
