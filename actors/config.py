"""The rollout pool's config section (`rollout:` in the YAML tree), owned by the rollout worker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from protos.config import STRICT, Resources, max_workers_field


class SamplingSection(BaseModel):
    """Sampling of rollouts (SEG-R1: temperature 1.0, 400 tokens)."""

    model_config = STRICT

    temperature: float = Field(1.0, ge=0.0, le=10.0, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(400, ge=1, le=32768, description="Maximum completion length in tokens.")


class RolloutConfig(BaseModel):
    """The pool of rollout actors (`rollout-<i>` in namespace segr1)."""

    model_config = STRICT

    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="vllm in production; hf (transformers generate) where vLLM cannot run the model."
    )
    num_workers: int = Field(1, ge=1, le=1024, description="Rollout actors at start.")
    max_workers: int | None = max_workers_field()
    resources: Resources = Field(default_factory=Resources)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    gpu_memory_utilization: float = Field(0.6, gt=0.0, le=0.98, description="vLLM KV-cache memory fraction.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="vLLM tensor parallel degree.")
    enable_prefix_caching: bool = Field(
        True, description="vLLM prefix caching (the G samples share a prompt)."
    )
    max_batch_groups: int = Field(8, ge=1, le=4096, description="Groups one generate call may batch.")
    max_turns: int = Field(
        1,
        ge=1,
        le=8,
        description="Turns of an episode: after each answer the policy sees the mask its prompts made and "
        "refines it or stops. 1: Seg-R1's single answer.",
    )
    max_model_len: int | None = Field(
        None, ge=64, le=1_048_576, description="vLLM context length (prompt + completion); None: 8192."
    )
    enforce_eager: bool | None = Field(
        None,
        description="vLLM without torch.compile / CUDA graphs; None: eager on CPU (fast start), compiled on GPU.",
    )
