"""learner -> actors: the layout of a weight update's flat buckets (the weight-sync transports, runtime/weights)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(BaseModel):
    """Where one parameter lies inside the flat buckets of a weight update."""

    model_config = _FROZEN

    name: str = Field(min_length=1)
    shape: tuple[int, ...]
    dtype: str = Field(description="torch dtype name, e.g. 'bfloat16'.")
    bucket: int = Field(ge=0)
    offset: int = Field(ge=0, description="Byte offset inside the bucket.")
    nbytes: int = Field(ge=0)


class WeightsManifest(BaseModel):
    """learner -> actors: the layout of the flat buckets that carry policy version `version`.

    A receiver switches to `version` only after every one of `bucket_nbytes` arrived.
    """

    model_config = _FROZEN

    version: int = Field(ge=0)
    bucket_nbytes: list[int]
    tensors: list[TensorSpec]

    @model_validator(mode="after")
    def _tensors_fit(self) -> WeightsManifest:
        for t in self.tensors:
            if t.bucket >= len(self.bucket_nbytes):
                raise ValueError(f"tensor {t.name!r} names bucket {t.bucket} of {len(self.bucket_nbytes)}")
            if t.offset + t.nbytes > self.bucket_nbytes[t.bucket]:
                raise ValueError(f"tensor {t.name!r} overruns bucket {t.bucket}")
        return self

    @property
    def total_bytes(self) -> int:
        return sum(self.bucket_nbytes)
