"""Config sections that several workers share: the policy they all load and the Ray resources of one worker.

Each worker package owns the section of its own worker (actors/config.py, reward_service/config.py,
learner/config.py, runtime/weights/config.py); cluster/config.py composes them into the YAML tree users write and
hands each worker its section plus this `PolicySpec`. Pure pydantic.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protos.answer import AnswerFormat

STRICT = ConfigDict(extra="forbid", validate_assignment=True)
"""Every config section: unknown keys fail (a typo never passes silently), assignments are validated."""

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class Resources(BaseModel):
    """Ray resources of ONE worker of a pool."""

    model_config = STRICT

    num_cpus: float = Field(1.0, ge=0.0, le=512, description="CPUs reserved per worker.")
    num_gpus: float = Field(
        0.0, ge=0.0, le=8, description="GPUs per worker; fractions share a GPU (colocated)."
    )
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources, e.g. {'rollout_pool': 1} to land on the KubeRay 'rollout' group.",
    )


class PolicySpec(BaseModel):
    """The policy every worker agrees on: which weights, at which precision, seeing which image, answering in
    which format. Built by cluster/config.py from model.*, data.image_size, reward.answer_format and seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(min_length=1, description="A Hugging Face folder of a Qwen2.5-VL policy.")
    reference: str | None = Field(None, description="Frozen reference for the KL term; None: the policy.")
    dtype: Dtype = Field("auto", description="Weights dtype; auto: bfloat16 on GPU, float32 on CPU.")
    image_size: int = Field(768, ge=16, le=4096, description="The policy sees NxN images.")
    answer_format: AnswerFormat = Field("full", description="full or points (protos/answer.py).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of sampling and initialisation.")
