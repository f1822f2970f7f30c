"""The messages of every hop of one GRPO step. Frozen pydantic models that validate themselves.

Shapes of the flow (docs/architecture.md):
  driver -RolloutRequest-> actors -RolloutGroup-> driver -RewardRequest-> reward_service -GroupScores-> driver
  driver -ScoredGroup (the RolloutGroup it kept, joined with its GroupScores)-> learner
  learner -WeightsManifest (+ flat buckets)-> actors;  learner -StepStats-> driver
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protos.dataset import Sample

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class SamplingConfig(BaseModel):
    """How to sample completions; part of RolloutRequest (driver -> actors)."""

    model_config = _FROZEN

    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(400, ge=1, le=32768)
    seed: int | None = Field(None, description="Per-request sampling seed; None draws one.")


class RolloutRequest(BaseModel):
    """driver -> actors: generate `group_size` completions for one sample.

    The sample itself travels separately through the object store (put once, shared with the reward workers).
    """

    model_config = _FROZEN

    request_id: str = Field(min_length=1)
    sample_id: str = Field(min_length=1)
    instruction: str
    group_size: int = Field(
        ge=2, le=1024, description="G > 1: GRPO with one sample per group learns nothing."
    )
    sampling: SamplingConfig = SamplingConfig()
    min_policy_version: int = Field(0, ge=0, description="The worker must hold at least this version.")


class Completion(BaseModel):
    """One sampled answer, part of a RolloutGroup (actors -> driver -> reward_service, learner)."""

    model_config = _FROZEN

    text: str
    token_ids: list[int]
    logprobs: list[float] = Field(description="Behaviour log-probability of each token in token_ids.")
    finish_reason: Literal["stop", "length", "abort"] = "stop"

    @model_validator(mode="after")
    def _lengths_agree(self) -> Completion:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Completion has {len(self.token_ids)} token_ids but {len(self.logprobs)} logprobs; "
                "the engine must return one behaviour logprob per generated token"
            )
        if any(not math.isfinite(lp) or lp > 1e-6 for lp in self.logprobs):
            raise ValueError("Completion.logprobs must be finite log-probabilities (<= 0)")
        return self


class RolloutGroup(BaseModel):
    """actors -> driver: the G completions of one prompt, stamped with the policy version that wrote them."""

    model_config = _FROZEN

    group_id: str = Field(min_length=1)
    sample_id: str = Field(min_length=1)
    policy_version: int = Field(ge=0)
    completions: list[Completion]
    temperature: float = Field(ge=0.0, le=10.0, description="The temperature it was sampled at (0: greedy).")
    max_tokens: int = Field(ge=1, le=32768, description="The completion-length cap it was sampled with.")
    worker: str = Field("", description="Name of the rollout actor that generated the group.")
    prompt_tokens: int = Field(0, ge=0)
    generate_s: float = Field(0.0, ge=0.0)

    @field_validator("completions")
    @classmethod
    def _group_of_at_least_two(cls, v: list[Completion]) -> list[Completion]:
        if len(v) < 2:
            raise ValueError(
                f"a RolloutGroup needs G >= 2 completions, got {len(v)}: "
                "group-relative advantages of a single completion are always zero"
            )
        return v

    @property
    def group_size(self) -> int:
        return len(self.completions)


class MaskPrompt(BaseModel):
    """One segmenter prompt (a box and the labelled points inside it), in the pixel space of the target mask.

    Produced by reward_service's parser; consumed by a Segmenter.
    """

    model_config = _FROZEN

    box: tuple[float, float, float, float] | None = Field(
        None, description="x1, y1, x2, y2 with x1<x2, y1<y2."
    )
    points: list[tuple[float, float]] = Field(default_factory=list)
    labels: list[int] = Field(default_factory=list, description="1 foreground, 0 background; one per point.")

    @model_validator(mode="after")
    def _consistent(self) -> MaskPrompt:
        if len(self.points) != len(self.labels):
            raise ValueError(f"MaskPrompt has {len(self.points)} points but {len(self.labels)} labels")
        if any(label not in (0, 1) for label in self.labels):
            raise ValueError(f"MaskPrompt labels must be 0 or 1, got {self.labels}")
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            if not (x1 < x2 and y1 < y2):
                raise ValueError(f"MaskPrompt box {self.box} needs x1 < x2 and y1 < y2")
        if self.box is None and not self.points:
            raise ValueError("MaskPrompt needs a box or at least one point")
        return self


class ParsedAnswer(BaseModel):
    """What the parser made of one completion (inside reward_service; reported in CompletionReward)."""

    model_config = _FROZEN

    ok: bool
    prompts: list[MaskPrompt] = Field(default_factory=list)
    think: str = ""
    failure: str | None = Field(None, description="Why parsing failed: a short machine-readable reason.")
    detail: str | None = Field(None, description="Human-readable detail of the failure.")

    @model_validator(mode="after")
    def _ok_iff_no_failure(self) -> ParsedAnswer:
        if self.ok == (self.failure is not None):
            raise ValueError("ParsedAnswer: ok must be True exactly when failure is None")
        if self.ok and not self.prompts:
            raise ValueError("ParsedAnswer: a successful parse has at least one prompt")
        return self


class RewardRequest(BaseModel):
    """driver -> reward_service: score every completion of a group against the sample's ground truth."""

    model_config = _FROZEN

    group: RolloutGroup
    sample: Sample
    policy_image_size: int | None = Field(
        None, ge=16, le=8192, description="Side of the square image the policy saw; None: original pixels."
    )

    @model_validator(mode="after")
    def _same_sample(self) -> RewardRequest:
        if self.group.sample_id != self.sample.id:
            raise ValueError(
                f"RewardRequest pairs group for sample {self.group.sample_id!r} with sample {self.sample.id!r}"
            )
        return self


class RewardComponents(BaseModel):
    """Each reward term of one completion, so a user can see why it scored what it did."""

    model_config = _FROZEN

    format: float
    iou: float
    s_measure: float
    segmentation: float
    box_iou: float = Field(
        0.0,
        description="IoU of the answer's enclosing box with the ground truth's box (weighted by w.box_iou).",
    )
    box_l1: float = Field(
        0.0,
        description="1 - the box's mean corner error / half the object's size, clipped (weighted by w.box_l1).",
    )
    total: float


class CompletionReward(BaseModel):
    """The reward of one completion, inside GroupScores (reward_service -> driver) and ScoredGroup (-> learner)."""

    model_config = _FROZEN

    rewards: RewardComponents
    parse_ok: bool
    parse_failure: str | None = None


class GroupScores(BaseModel):
    """reward_service -> driver: one CompletionReward per completion of RolloutGroup `group_id`, and the time
    scoring it took. The completions do not travel back: the driver joins these with the group it kept
    (ScoredGroup.join). Timings are this group's share of the reward worker's batched call."""

    model_config = _FROZEN

    group_id: str = Field(min_length=1)
    scores: list[CompletionReward]
    reward_worker: str = Field("", description="Name of the reward actor that scored the group.")
    encode_s: float = Field(
        0.0, ge=0.0, description="Share of the image encode (split over the groups of an image)."
    )
    decode_s: float = Field(0.0, ge=0.0, description="Share of the batched decode (by number of prompts).")
    total_s: float = Field(0.0, ge=0.0, description="Share of the whole call (by number of completions).")

    @property
    def totals(self) -> list[float]:
        return [s.rewards.total for s in self.scores]


class ScoredGroup(BaseModel):
    """driver -> learner: a RolloutGroup with one CompletionReward per completion (`join` of the group the driver
    kept and the GroupScores the reward worker sent back)."""

    model_config = _FROZEN

    group: RolloutGroup
    scores: list[CompletionReward]
    reward_worker: str = ""
    encode_s: float = Field(0.0, ge=0.0)
    decode_s: float = Field(0.0, ge=0.0)
    total_s: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _one_score_per_completion(self) -> ScoredGroup:
        if len(self.scores) != len(self.group.completions):
            raise ValueError(
                f"ScoredGroup {self.group.group_id!r} has {len(self.scores)} scores for "
                f"{len(self.group.completions)} completions"
            )
        return self

    @classmethod
    def join(cls, group: RolloutGroup, scores: GroupScores) -> ScoredGroup:
        """The group and its scores as one ScoredGroup; they must be for the same group id."""
        if scores.group_id != group.group_id:
            raise ValueError(
                f"GroupScores for group {scores.group_id!r} joined with RolloutGroup {group.group_id!r}; pair each "
                "reward result with the group it scored (RewardWorker.score answers in the order it was given)"
            )
        return cls(
            group=group,
            scores=scores.scores,
            reward_worker=scores.reward_worker,
            encode_s=scores.encode_s,
            decode_s=scores.decode_s,
            total_s=scores.total_s,
        )

    @property
    def totals(self) -> list[float]:
        return [s.rewards.total for s in self.scores]


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


class StepStats(BaseModel):
    """learner -> driver: what one optimiser step did. The driver adds pool figures to metrics.jsonl."""

    model_config = ConfigDict(frozen=True, extra="allow")

    step: int = Field(ge=0)
    policy_version: int = Field(ge=0)
    loss: float
    kl: float = 0.0
    clip_fraction: float = 0.0
    ratio_mean: float = 1.0
    grad_norm: float = 0.0
    lr: float = 0.0
    num_groups: int = Field(0, ge=0)
    num_completions: int = Field(0, ge=0)
    num_tokens: int = Field(0, ge=0)
    step_s: float = Field(0.0, ge=0.0)
