"""One dataset row (`Sample`) and the Arrow schemas of the project's Parquet files.

`Sample`: dataset (Parquet) -> cluster driver -> rollout and reward workers (through the Ray object store, put once).
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protos.answer import TaskKind

# One row per (image, target mask, instruction). Images keep their original encoding (PNG or JPEG bytes); masks are
# single-channel PNGs with values 0/1 (binarised once, at import).
DATASET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field(
            "source", pa.string(), nullable=False
        ),  # data set name: "synthetic", "cod10k", "refcocog", ...
        pa.field("split", pa.string(), nullable=False),  # "train", "val", "test", ...
        pa.field("task", pa.string(), nullable=False),  # one of TASK_KINDS
        pa.field("instruction", pa.string(), nullable=False),  # user-turn text after the image
        pa.field("image", pa.binary(), nullable=False),  # PNG or JPEG bytes, original resolution
        pa.field("mask", pa.binary(), nullable=False),  # PNG bytes, one channel, 0/1, same size as the image
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)

# One row per scored completion, written by the driver and by evaluation.
ROLLOUT_LOG_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("completion_index", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("parse_ok", pa.bool_(), nullable=False),
        pa.field("parse_failure", pa.string(), nullable=True),
        pa.field("reward_format", pa.float32(), nullable=False),
        pa.field("reward_iou", pa.float32(), nullable=False),
        pa.field("reward_s_measure", pa.float32(), nullable=False),
        pa.field("reward_segmentation", pa.float32(), nullable=False),
        pa.field("reward_total", pa.float32(), nullable=False),
    ]
)


class Sample(BaseModel):
    """One dataset row: dataset (Parquet) -> driver -> rollout workers and reward workers.

    `image` is the original encoded image; `mask` a one-channel 0/1 PNG of the same size.
    """

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    split: str = Field(min_length=1)
    task: TaskKind
    instruction: str
    image: bytes = Field(repr=False)
    mask: bytes = Field(repr=False)
    width: int = Field(gt=0, le=65536)
    height: int = Field(gt=0, le=65536)

    @model_validator(mode="after")
    def _non_empty_payloads(self) -> Sample:
        if not self.image:
            raise ValueError(f"sample {self.id!r}: field 'image' is empty; a row needs encoded image bytes")
        if not self.mask:
            raise ValueError(f"sample {self.id!r}: field 'mask' is empty; a row needs a PNG mask")
        return self

    def to_row(self) -> dict:
        """This sample as a dict in DATASET_SCHEMA's column order."""
        return {name: getattr(self, name) for name in DATASET_SCHEMA.names}

    @classmethod
    def from_row(cls, row: dict) -> Sample:
        return cls(**{name: row[name] for name in DATASET_SCHEMA.names})
