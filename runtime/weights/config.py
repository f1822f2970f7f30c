"""How new weights travel from the learner to the rollout workers (`weight_sync:` in the YAML tree)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from protos.config import STRICT


class WeightSyncConfig(BaseModel):
    """How new weights reach the rollout actors."""

    model_config = STRICT

    backend: Literal["auto", "gloo", "nccl", "cuda-ipc", "object-store"] = Field(
        "auto", description="auto: nccl on GPU, gloo on CPU, cuda-ipc when colocated on one GPU."
    )
    bucket_mb: int = Field(256, ge=1, le=65536, description="Size of one flat bucket in MiB.")
    timeout_s: float = Field(
        300.0,
        ge=5.0,
        le=86_400.0,
        description="How long forming the group or one bucket's transfer may wait for a slow member. A member "
        "that dies does not cost this: the driver abandons the generation as soon as Ray reports the death. "
        "Raise it for slow links.",
    )
