"""The one configuration tree of a training job: pydantic v2 models, validated in one place.

Loaded from YAML (`load_config`) with `key.sub=value` overrides from the command line. Every field has a
description and bounds; an invalid value fails with a message naming the field, saying why and how to fix it.
Nothing is silently rewritten. `segr1 train --config FILE --dry-run` prints the resolved tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which field, why, and how to fix it."""


class Resources(BaseModel):
    """Ray resources of ONE worker of a pool."""

    model_config = _STRICT

    num_cpus: float = Field(1.0, ge=0.0, le=512, description="CPUs reserved per worker.")
    num_gpus: float = Field(
        0.0, ge=0.0, le=8, description="GPUs per worker; fractions share a GPU (colocated)."
    )
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources, e.g. {'rollout_pool': 1} to land on the KubeRay 'rollout' group.",
    )


class ModelConfig(BaseModel):
    """Which policy and which segmenter."""

    model_config = _STRICT

    policy: str = Field(
        "runs/models/policy",
        min_length=1,
        description="Policy: a Hugging Face folder or hub id of a Qwen2.5-VL model (the tiny one in the demo).",
    )
    reference: str | None = Field(
        None,
        description="Frozen reference for the KL term; None uses the starting policy. Unused when beta=0.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto: bfloat16 on GPU, float32 on CPU."
    )


class SamplingSection(BaseModel):
    """Sampling of rollouts (SEG-R1: temperature 1.0, 400 tokens)."""

    model_config = _STRICT

    temperature: float = Field(1.0, ge=0.0, le=10.0, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(400, ge=1, le=32768, description="Maximum completion length in tokens.")


class RolloutConfig(BaseModel):
    """The pool of rollout actors (`rollout-<i>` in namespace segr1)."""

    model_config = _STRICT

    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="vllm in production; hf (transformers generate) where vLLM cannot run the model."
    )
    num_workers: int = Field(1, ge=1, le=1024, description="Rollout actors at start.")
    max_workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Upper bound when the pool is scaled during a run; None: num_workers.",
    )
    resources: Resources = Field(default_factory=Resources)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    gpu_memory_utilization: float = Field(0.6, gt=0.0, le=0.98, description="vLLM KV-cache memory fraction.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="vLLM tensor parallel degree.")
    enable_prefix_caching: bool = Field(
        True, description="vLLM prefix caching (the G samples share a prompt)."
    )
    max_batch_groups: int = Field(8, ge=1, le=4096, description="Groups one generate call may batch.")
    max_model_len: int | None = Field(
        None, ge=64, le=1_048_576, description="vLLM context length (prompt + completion); None: 8192."
    )
    enforce_eager: bool | None = Field(
        None, description="vLLM without torch.compile / CUDA graphs; None: eager on CPU (fast start), compiled on GPU."
    )


class RewardWeights(BaseModel):
    """Weights of each reward term (SEG-R1: total = format + 0.7 IoU + 0.3 clip(S, 0, 1))."""

    model_config = _STRICT

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


class RewardConfig(BaseModel):
    """The pool of reward actors (`reward-<i>` in namespace segr1)."""

    model_config = _STRICT

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
    num_workers: int = Field(1, ge=1, le=1024, description="Reward actors.")
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


class GRPOConfig(BaseModel):
    """GRPO (SEG-R1: G=4, beta 0.04, on-policy, seq-mean-token-mean)."""

    model_config = _STRICT

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
        False, description="Drop groups whose rewards are all equal (counted)."
    )
    steps: int = Field(100, ge=0, le=10_000_000, description="Optimiser steps to run.")

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

    model_config = _STRICT

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
    lora_rank: int = Field(
        0, ge=0, le=4096, description="LoRA rank (needs the peft package); 0 trains every parameter."
    )
    lora_alpha: float = Field(16.0, gt=0.0, le=1e6, description="LoRA scaling numerator (scale = alpha / rank).")
    resources: Resources = Field(default_factory=Resources)


class WeightSyncConfig(BaseModel):
    """How new weights reach the rollout actors."""

    model_config = _STRICT

    backend: Literal["auto", "gloo", "nccl", "cuda-ipc", "object-store"] = Field(
        "auto", description="auto: nccl on GPU, gloo on CPU, cuda-ipc when colocated on one GPU."
    )
    bucket_mb: int = Field(256, ge=1, le=65536, description="Size of one flat bucket in MiB.")
    timeout_s: float = Field(
        300.0,
        ge=5.0,
        le=86_400.0,
        description="How long forming the group or one bucket's transfer may wait for a member; a rollout "
        "worker that dies then costs this long before the object-store fallback. Raise it for slow links.",
    )


class CheckpointConfig(BaseModel):
    """Checkpoints: HF folder + optimiser + JSON state, written atomically."""

    model_config = _STRICT

    dir: str = Field("runs/checkpoints", min_length=1, description="Where checkpoints go.")
    every: int = Field(50, ge=0, le=10_000_000, description="Save every N steps; 0 saves only at the end.")
    keep: int = Field(2, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")


class MetricsConfig(BaseModel):
    """Prometheus export and run logs."""

    model_config = _STRICT

    port: int = Field(
        9108, ge=0, le=65535, description="Prometheus port of the driver; 0 disables the server."
    )
    run_dir: str = Field(
        "runs/train", min_length=1, description="metrics.jsonl, plots and summary.json go here."
    )


class DataConfig(BaseModel):
    """Data sets and the image size the policy sees."""

    model_config = _STRICT

    train: str = Field(
        "runs/data/train", min_length=1, description="Folder (or file) of training Parquet shards."
    )
    eval: str | None = Field(None, description="Folder of held-out Parquet shards.")
    image_size: int = Field(
        768, ge=16, le=4096, description="Images are resized to NxN for the policy (SEG-R1: 768 or 1024)."
    )
    shuffle: bool = Field(True, description="Shuffle per epoch with the job seed.")
    on_corrupt: Literal["skip", "raise"] = Field(
        "skip", description="A corrupt row is reported, then skipped or fatal."
    )


class PlacementConfig(BaseModel):
    """Where the pools run."""

    model_config = _STRICT

    mode: Literal["colocated", "disaggregated"] = Field(
        "colocated",
        description="colocated: all pools share the node(s); disaggregated: each on its own group.",
    )
    ray_address: str | None = Field(
        None, description="Ray address; None starts a local Ray unless RAY_ADDRESS set."
    )
    namespace: str = Field("segr1", min_length=1, description="Ray namespace of the named actors.")


class TrainConfig(BaseModel):
    """A whole training job."""

    model_config = _STRICT

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of data order, sampling and initialisation.")

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        if self.reward.segmenter in ("hf-sam2", "sam2") and not self.reward.segmenter_path:
            raise ValueError(
                f"reward.segmenter={self.reward.segmenter} needs reward.segmenter_path "
                "(a Hugging Face SAM2 folder for hf-sam2, a .pt checkpoint for sam2), or use reward.segmenter=grabcut"
            )
        if self.reward.segmenter == "sam2" and not self.reward.sam2_config:
            raise ValueError(
                "reward.segmenter=sam2 needs reward.sam2_config, e.g. configs/sam2.1/sam2.1_hiera_l.yaml"
            )
        w = self.reward.weights
        if (w.box_iou > 0 or w.box_l1 > 0) and self.reward.answer_format == "points":
            raise ValueError(
                f"reward.weights.box_iou={w.box_iou} / box_l1={w.box_l1} reward boxes, but "
                "reward.answer_format=points asks for none; set both to 0 or use answer_format=full"
            )
        mw = self.rollout.max_workers
        if mw is not None and mw < self.rollout.num_workers:
            raise ValueError(
                f"rollout.max_workers={mw} is below rollout.num_workers={self.rollout.num_workers}; raise it or unset it"
            )
        return self


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _parse_scalar(text: str) -> Any:
    """An override's value, read as YAML ('3' -> 3, 'true' -> True, 'null' -> None, '[1,2]' -> list)."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. grpo.group_size=8)")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_scalar(raw)
    return tree


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling against `segr1 train --dry-run` or README's config reference"
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        lines.append(f"  {field}: {msg}{got}")
    return "\n".join(lines)


def build_config(tree: dict, source: str = "<dict>") -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when path is None) and apply overrides."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist; pass --config with a YAML file (see cluster/configs/)"
            )
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        tree = loaded or {}
        source = str(p)
    if overrides:
        apply_overrides(tree, overrides)
        source += " + overrides"
    return build_config(tree, source)


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what --dry-run prints)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
