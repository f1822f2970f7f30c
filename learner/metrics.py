"""Metrics of the learner and of the weight broadcast (declared once; see runtime/metrics.py)."""

from __future__ import annotations

from runtime.metrics import counter, gauge, histogram
from runtime.weights.interface import SendStats

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
SYNC_VERSIONS = counter(
    "segr1_weight_sync_versions_total",
    "Versions sent to the rollout workers, by kind: delta (only the changed values) or full.",
    ("backend", "kind"),
)
SYNC_CHANGED = gauge(
    "segr1_weight_sync_changed_fraction",
    "Fraction of the policy's values that changed in the last version compared against its base (weight_sync.delta).",
)
SYNC_VERSION = gauge("segr1_weight_sync_version", "Last policy version every rollout worker acknowledged.")


def record_sync(s: SendStats, backend: str) -> dict:
    """One send's figures: to Prometheus, and (returned) to the driver's metrics.jsonl line."""
    kind = "full" if s.delta_base is None else "delta"
    SYNC_SECONDS.observe(s.seconds, backend=backend)
    SYNC_BYTES.inc(s.nbytes, backend=backend)
    SYNC_VERSIONS.inc(1, backend=backend, kind=kind)
    SYNC_VERSION.set(s.version)
    out = {"version": s.version, "bytes": s.nbytes, "buckets": s.buckets, "seconds": s.seconds}
    if s.full_bytes is not None:  # weight_sync.delta
        out.update(full_bytes=s.full_bytes, delta=s.delta_base is not None, encode_s=s.encode_s)
        if s.changed_fraction is not None:
            SYNC_CHANGED.set(s.changed_fraction)
            out["changed_fraction"] = s.changed_fraction
    return out
