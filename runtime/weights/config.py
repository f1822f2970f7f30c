"""How new weights travel from the learner to the rollout workers (`weight_sync:` in the YAML tree)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from protos.config import STRICT


class WeightSyncConfig(BaseModel):
    """How new weights reach the rollout actors."""

    model_config = STRICT

    def delta_on(self, backend: str, gpu: bool) -> bool:
        """Whether `delta` is on for a resolved backend and a learner on a GPU (`gpu`) or the CPU."""
        if isinstance(self.delta, bool):
            return self.delta
        return gpu and backend in ("gloo", "nccl", "object-store")

    backend: Literal["auto", "gloo", "nccl", "cuda-ipc", "object-store"] = Field(
        "auto", description="auto: nccl on GPU, gloo on CPU, cuda-ipc when colocated on one GPU."
    )
    bucket_mb: int = Field(256, ge=1, le=65536, description="Size of one flat bucket in MiB.")
    delta: bool | Literal["auto"] = Field(
        "auto",
        description="Send only the values that changed since the version every rollout worker holds "
        "(runtime/weights/delta.py). auto: on for a learner on GPUs over gloo, nccl or the object store; off for cuda-ipc (one "
        "GPU, no network to save) and for a learner on the CPU, where finding the changes costs more than "
        "sending everything (docs/benchmarks.md). Costs the learner one copy of the policy on its device and "
        "every rollout worker one in host memory.",
    )
    delta_max_changed: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="A bucket whose changed fraction exceeds this is sent whole, and so is the rest of its "
        "version; the next 1, 2, 4, ... versions (up to full_every) are then sent whole without comparing.",
    )
    full_every: int = Field(
        50, ge=1, le=1_000_000, description="Every Nth version is sent whole even when a delta would do."
    )
    timeout_s: float = Field(
        300.0,
        ge=5.0,
        le=86_400.0,
        description="How long forming the group or one bucket's transfer may wait for a slow member. A member "
        "that dies does not cost this: the driver abandons the generation as soon as Ray reports the death. "
        "Raise it for slow links.",
    )
