"""learner -> driver: the figures of one optimiser step."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StepStats(BaseModel):
    """learner -> driver: what one Learner.step (one batch, grpo.updates_per_batch optimiser updates) did. The
    driver writes every field into the step's metrics.jsonl line (cluster/driver/metrics.py STEP_STATS_KEYS) next
    to its own figures of the batch (rewards, staleness). Means are over the batch's completion tokens in the
    loss. Strict: a figure the learner computes is declared here, or it would never reach metrics.jsonl."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int = Field(ge=0)
    policy_version: int = Field(ge=0)
    loss: float
    kl: float = 0.0
    clip_fraction: float = Field(0.0, description="clip_fraction_low + clip_fraction_high.")
    clip_fraction_low: float = Field(
        0.0, description="Share of tokens whose lower clip won the min (ratio < 1 - clip_low, advantage < 0)."
    )
    clip_fraction_high: float = Field(
        0.0,
        description="Share of tokens whose upper clip won the min (ratio > 1 + clip_high, advantage > 0).",
    )
    ratio_mean: float = 1.0
    entropy: float = Field(0.0, description="Mean -log p of the sampled tokens (per-token entropy estimate).")
    advantage_abs_mean: float = Field(
        0.0, ge=0.0, description="Mean |advantage| over the batch's completions."
    )
    skipped_non_finite: int = Field(
        0,
        ge=0,
        description="Updates skipped because the gradient norm was not finite (weights left as they were).",
    )
    grad_norm: float = 0.0
    lr: float = 0.0
    num_groups: int = Field(0, ge=0)
    num_completions: int = Field(0, ge=0)
    num_tokens: int = Field(0, ge=0)
    step_s: float = Field(0.0, ge=0.0)
    num_updates: int = Field(1, ge=0, description="Optimiser updates made on the batch (mini-batches).")
    first_ratio_mean: float = Field(
        1.0, description="ratio_mean of the first micro-batch (1 when on-policy)."
    )
    first_clip_fraction: float = Field(0.0, description="clip_fraction of the first micro-batch.")
    is_weight_mean: float = Field(1.0, description="Mean behaviour importance weight applied to the loss.")
    is_truncated_fraction: float = Field(0.0, description="Share of tokens whose weight was cut to tis_cap.")
    is_masked_fraction: float = Field(0.0, description="Share of tokens masked out (weight above tis_cap).")
    mismatch_logp_abs: float = Field(
        0.0, description="Mean |logp_behaviour - logp_old| (rollout vs learner)."
    )
    mismatch_outside_fraction: float = Field(
        0.0, description="Share of tokens with pi_old / pi_behaviour outside [0.9, 1.1]."
    )
