"""Metrics of the training driver: the accounting of every group (generated = trained + dropped_stale +
filtered, lost = 0), the staleness of what was trained and the latest validation (cluster/validation.py). Exported through Ray like every pool's."""

from __future__ import annotations

from runtime.metrics import counter, gauge, histogram

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
