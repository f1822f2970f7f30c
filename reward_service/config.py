"""The reward pool's config section (`reward:` in the YAML tree), owned by the reward worker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from protos.config import STRICT, Resources, max_workers_field


class RewardWeights(BaseModel):
    """Weights of each reward term (SEG-R1: total = format + 0.7 IoU + 0.3 clip(S, 0, 1))."""

    model_config = STRICT

    format: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the format reward.")
    iou: float = Field(0.7, ge=0.0, le=100.0, description="Weight of IoU in the segmentation reward.")
    s_measure: float = Field(0.3, ge=0.0, le=100.0, description="Weight of clip(S-measure, 0, 1).")
    segmentation: float = Field(
        1.0, ge=0.0, le=100.0, description="Weight of the segmentation reward in total."
    )
    box_iou: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="Weight of the IoU of the answer's box with the ground-truth mask's box (Seg-Zero's box "
        "reward). 0: Seg-R1's reward.",
    )
    box_l1: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="Weight of 1 - mean corner error / half the object's size (Seg-Zero's box L1 reward): pays "
        "for localising, where IoU terms pay for boxes enlarged to hedge. 0: Seg-R1's reward; the demo uses 2.",
    )
    refine_gain: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="Episodes of several turns (rollout.max_turns > 1): weight of the IoU gained from the first "
        "turn's mask to the last. 0: the last mask's reward alone.",
    )


class RewardConfig(BaseModel):
    """The pool of reward actors (`reward-<i>` in namespace segr1)."""

    model_config = STRICT

    segmenter: Literal["grabcut", "hf-sam2", "sam2"] = Field(
        "grabcut",
        description="grabcut (weight-free, CPU), hf-sam2 (transformers Sam2Model folder), sam2 (Meta's package).",
    )
    segmenter_path: str | None = Field(
        None, description="hf-sam2: a Hugging Face folder; sam2: a .pt checkpoint. Required for both."
    )
    sam2_config: str | None = Field(
        None, description="sam2 only: the model config name, e.g. configs/sam2.1/..."
    )
    num_workers: int = Field(1, ge=1, le=1024, description="Reward actors at start.")
    max_workers: int | None = max_workers_field()
    resources: Resources = Field(default_factory=Resources)
    weights: RewardWeights = Field(default_factory=RewardWeights)
    answer_format: Literal["full", "points"] = Field(
        "full",
        description="full: think + bbox + points + labels; points: the pre-RL points-and-labels format.",
    )
    max_boxes: int = Field(4, ge=1, le=64, description="More boxes than this fails the format check.")
    max_points: int = Field(32, ge=1, le=1024, description="More points than this fails the format check.")
    max_completion_chars: int = Field(
        8192, ge=64, le=1_000_000, description="Longer completions fail to parse."
    )
    max_inflight_per_worker: int = Field(
        4, ge=1, le=1024, description="Backpressure: requests queued per actor."
    )
    embedding_cache: int = Field(
        0,
        ge=0,
        le=65536,
        description="Images whose segmenter embedding each reward actor keeps between calls (least recently used "
        "dropped first), so an image scored again costs decodes only. 0: none kept; with rollout.max_turns > 1 "
        "the job sets max_inflight_per_worker x rollout.max_batch_groups (the images of the calls an actor may hold between "
        "an episode's turns). Each costs device memory (SAM2 at 1024 px: about 16 MB).",
    )
