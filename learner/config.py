"""The learner's config sections (`learner:`, `grpo:` and `checkpoint:` in the YAML tree)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from protos.config import STRICT, PolicySpec, Resources
from runtime.weights.config import WeightSyncConfig


class GRPOConfig(BaseModel):
    """GRPO (SEG-R1: G=4, beta 0.04, on-policy, seq-mean-token-mean)."""

    model_config = STRICT

    group_size: int = Field(4, ge=2, le=1024, description="Completions per prompt (G).")
    batch_size: int = Field(8, ge=1, le=65536, description="Prompts (groups) per optimiser step.")
    clip_low: float = Field(0.2, ge=0.0, le=1.0, description="Ratio clip below: 1 - clip_low.")
    clip_high: float = Field(0.2, ge=0.0, le=10.0, description="Ratio clip above: 1 + clip_high.")
    beta: float = Field(0.04, ge=0.0, le=10.0, description="KL (k3) weight; 0 loads no reference model.")
    loss_aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = Field(
        "seq-mean-token-mean", description="Reference / DAPO / Dr. GRPO aggregation of per-token losses."
    )
    normalize_std: bool = Field(True, description="Divide advantages by the group std (+ 1e-4).")
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: generate, score, update. async: pipelined."
    )
    max_staleness: int = Field(
        1,
        ge=0,
        le=64,
        description="async: trained groups are at most this many versions older than the policy.",
    )
    filter_zero_variance: bool = Field(
        False,
        description="Drop groups whose rewards are all equal (counted); sync mode then draws more prompts to "
        "refill the batch (grpo.max_fill_rounds).",
    )
    max_fill_rounds: int = Field(
        8,
        ge=0,
        le=1000,
        description="sync + filter_zero_variance: extra rounds of generation per step to refill the batch to "
        "batch_size informative groups (DAPO's dynamic sampling); 0 trains on what the first round kept.",
    )
    updates_per_batch: int = Field(
        1,
        ge=1,
        le=1024,
        description="Optimiser steps per batch: the batch's completions split into this many mini-batches, one "
        "update each (the clip acts from the second on); 1 is the reference's single on-policy update.",
    )
    tis_cap: float = Field(
        2.0,
        ge=0.0,
        le=1e6,
        description="Cap C of the behaviour importance weight min(pi_old / pi_behaviour, C), which corrects "
        "engine mismatch and async staleness; 0 disables the correction (the mismatch is still logged).",
    )
    is_level: Literal["token", "sequence"] = Field(
        "token",
        description="Importance weight per token, or per sequence (the product of its tokens' ratios).",
    )
    is_mode: Literal["truncate", "mask"] = Field(
        "truncate",
        description="A weight above tis_cap is truncated to it, or its token (sequence) is masked out of the "
        "loss.",
    )
    steps: int = Field(100, ge=0, le=10_000_000, description="Optimiser steps to run.")

    @field_validator("tis_cap")
    @classmethod
    def _cap_zero_or_at_least_one(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError(
                f"tis_cap={v} would cut every importance weight below 1, including on-policy tokens (weight 1); "
                "set grpo.tis_cap to 0 (no correction) or to 1 or more (2 is the usual choice)"
            )
        return v

    @field_validator("group_size", mode="before")
    @classmethod
    def _group_size_above_one(cls, v: Any) -> Any:
        if isinstance(v, int) and v == 1:
            raise ValueError(
                "group_size=1 makes every group-relative advantage zero, so GRPO would learn nothing; "
                "set grpo.group_size to 2 or more (the reference uses 4)"
            )
        return v


class LearnerConfig(BaseModel):
    """The learner: optimiser and precision."""

    model_config = STRICT

    lr: float = Field(1e-6, gt=0.0, le=1.0, description="AdamW learning rate (SEG-R1: 1e-6 constant).")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="LR schedule after warm-up."
    )
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    micro_batch_size: int = Field(8, ge=1, le=65536, description="Completions per forward/backward.")
    grad_accumulation: int | None = Field(
        None, ge=1, le=65536, description="Micro-batches per step; None derives it from the batch."
    )
    grad_clip: float = Field(1.0, gt=0.0, le=1e6, description="Max global grad norm.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    num_gpus: int = Field(0, ge=0, le=1024, description="GPUs of the learner; >1 uses FSDP2 data parallel.")
    world_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Learner ranks (actors learner-0..n-1, one GPU each on a GPU cluster) sharding the policy "
        "with FSDP2; None: num_gpus when > 0, else 1.",
    )
    max_restarts: int = Field(
        2,
        ge=0,
        le=1000,
        description="Times a job restarts its learner group from the latest checkpoint after a rank died; 0: "
        "the job fails (with the --resume command).",
    )
    lora_rank: int = Field(
        0, ge=0, le=4096, description="LoRA rank (needs the peft package); 0 trains every parameter."
    )
    lora_alpha: float = Field(
        16.0, gt=0.0, le=1e6, description="LoRA scaling numerator (scale = alpha / rank)."
    )
    resources: Resources = Field(default_factory=Resources)

    @property
    def ranks(self) -> int:
        """learner.world_size resolved: the number of learner ranks the job runs."""
        if self.world_size is not None:
            return self.world_size
        return self.num_gpus if self.num_gpus > 0 else 1


class CheckpointConfig(BaseModel):
    """Checkpoints: HF folder + optimiser + JSON state, written atomically."""

    model_config = STRICT

    dir: str = Field("runs/checkpoints", min_length=1, description="Where checkpoints go.")
    every: int = Field(50, ge=0, le=10_000_000, description="Save every N steps; 0 saves only at the end.")
    keep: int = Field(2, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")
    keep_best: Literal["val/mean_iou", "val/s_measure", "val/parse_rate", "val/box_iou"] | None = Field(
        None,
        description="Also keep the checkpoint with the highest value of this validation metric (needs "
        "eval.every > 0); best.json in checkpoint.dir names it. None: off.",
    )
    resume_from: Literal["latest", "best"] = Field(
        "latest",
        description="What --resume continues from: the newest step-* folder, or the one keep_best kept (later "
        "step-* folders are then moved to superseded/).",
    )


class LearnerSpec(BaseModel):
    """What cluster/config.py hands the learner: its own sections, the shared policy, and how its weights leave
    (weight_sync with its backend resolved, and the dtype the rollout engines hold)."""

    model_config = STRICT

    policy: PolicySpec
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    export_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="The rollout engines' dtype: weights are published in it."
    )
