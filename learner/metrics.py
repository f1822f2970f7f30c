"""Metrics of the learner and of the weight broadcast (declared once; see runtime/metrics.py)."""

from __future__ import annotations

from runtime.metrics import counter, gauge, histogram

STEP_SECONDS = histogram(
    "segr1_learner_step_seconds", "Wall time of one learner optimiser step (forward, backward, update)."
)
LOSS = gauge("segr1_learner_loss", "GRPO loss of the last step.")
KL = gauge("segr1_learner_kl", "Mean per-token k3 KL to the reference model at the last step.")
CLIP_FRACTION = gauge(
    "segr1_learner_clip_fraction",
    "Fraction of completion tokens whose ratio was clipped at the last step.",
    ("side",),
)
IS_WEIGHT_MEAN = gauge(
    "segr1_learner_is_weight_mean",
    "Mean behaviour importance weight min(pi_old / pi_behaviour, grpo.tis_cap) over the last step's tokens.",
)
IS_CAPPED_FRACTION = gauge(
    "segr1_learner_is_capped_fraction",
    "Share of the last step's completion tokens whose importance weight exceeded grpo.tis_cap: truncated to it "
    "(mode=truncate) or masked out of the loss (mode=mask).",
    ("mode",),
)
MISMATCH_LOGP_ABS = gauge(
    "segr1_learner_mismatch_logp_abs",
    "Mean absolute difference logp_behaviour - logp_old over the last step's tokens: rollout engine vs learner "
    "(and staleness in async mode).",
)
MISMATCH_OUTSIDE_FRACTION = gauge(
    "segr1_learner_mismatch_outside_fraction",
    "Share of the last step's tokens whose ratio pi_old / pi_behaviour lies outside [0.9, 1.1].",
)
GRAD_NORM = gauge("segr1_learner_grad_norm", "Global gradient norm before clipping at the last step.")
LR = gauge("segr1_learner_lr", "Learning rate of the last step.")
POLICY_VERSION = gauge(
    "segr1_learner_policy_version", "Policy version the learner holds (+1 per optimiser step)."
)
STEPS = counter("segr1_learner_steps_total", "Optimiser steps taken.")
TOKENS = counter("segr1_learner_tokens_total", "Completion tokens trained on.")
SKIPPED_GROUPS = counter(
    "segr1_learner_skipped_groups_total",
    "Groups given to step() that carried no learning signal.",
    ("reason",),
)
CHECKPOINT_SECONDS = histogram("segr1_learner_checkpoint_seconds", "Wall time of writing one checkpoint.")

SYNC_SECONDS = histogram(
    "segr1_weight_sync_seconds",
    "Wall time of one weight broadcast, learner side, end to end.",
    labels=("backend",),
)
SYNC_BYTES = counter(
    "segr1_weight_sync_bytes_total", "Payload bytes broadcast to the rollout workers.", ("backend",)
)
SYNC_VERSION = gauge("segr1_weight_sync_version", "Last policy version every rollout worker acknowledged.")
