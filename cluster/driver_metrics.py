"""Metrics of the training driver: the accounting of every group (generated = trained + dropped_stale +
filtered, lost = 0) and the staleness of what was trained. Exported through Ray like every pool's."""

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
