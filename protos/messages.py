"""The messages of every hop of one GRPO step. Frozen pydantic models that validate themselves.

Shapes of the flow (docs/architecture.md):
  driver -RolloutRequest-> actors -RolloutGroup-> driver -RewardRequest-> reward_service -GroupScores-> driver
  driver -ScoredGroup (the RolloutGroup it kept, joined with its GroupScores)-> learner
  learner -WeightsManifest (+ flat buckets; protos/weights.py)-> actors;  learner -StepStats (protos/stats.py)-> driver
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protos.answer import TaskKind
from protos.dataset import Sample

_FROZEN = ConfigDict(frozen=True, extra="forbid")

Purpose = Literal["train", "val", "eval"]
"""What a rollout is for: a training group ("train"), validation while training ("val", eval.every) or an
evaluation job ("eval", `segr1 eval`). It travels on RolloutRequest and RolloutGroup, and the pools' throughput
metrics carry it as their `purpose` label, so training throughput never counts validation or evaluation work."""

ZERO_VARIANCE_TOL = 1e-9
"""Rewards of one group whose spread (max - min) is below this count as equal: every group-relative advantage
is 0, the group teaches nothing (ScoredGroup.zero_variance; learner/grpo.py gives such groups zeros)."""


class SamplingConfig(BaseModel):
    """How to sample completions; part of RolloutRequest (driver -> actors)."""

    model_config = _FROZEN

    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(400, ge=1, le=32768)
    seed: int | None = Field(None, description="Per-request sampling seed; None draws one.")
    top_k: int = Field(0, ge=0, le=1_000_000, description="Keep the k most likely tokens; 0 keeps all.")
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="Penalty on tokens already in prompt or completion; 1 is none."
    )


class RolloutRequest(BaseModel):
    """driver -> actors: generate `group_size` completions for one sample.

    The sample itself travels separately through the object store (put once, shared with the reward workers).
    """

    model_config = _FROZEN

    request_id: str = Field(min_length=1)
    sample_id: str = Field(min_length=1)
    instruction: str
    task: TaskKind = Field("foreground", description="The sample's task: picks the prompt's user text.")
    group_size: int = Field(
        ge=2, le=1024, description="G > 1: GRPO with one sample per group learns nothing."
    )
    sampling: SamplingConfig = SamplingConfig()
    min_policy_version: int = Field(0, ge=0, description="The worker must hold at least this version.")
    purpose: Purpose = Field("train", description="train | val | eval: the `purpose` label of its metrics.")

    @classmethod
    def for_sample(
        cls,
        sample: Sample,
        group_size: int,
        sampling: SamplingConfig | Any,
        *,
        request_id: str,
        seed: int | None = None,
        min_policy_version: int = 0,
        purpose: Purpose = "train",
    ) -> RolloutRequest:
        """The request for `sample` (its id, instruction and task). `sampling`: a SamplingConfig or any object with
        its fields (the rollout config's sampling section); `seed`, when given, replaces its seed."""
        base = SamplingConfig.model_validate(sampling, from_attributes=True)
        if seed is not None:
            base = SamplingConfig(**{**base.model_dump(), "seed": seed})
        return cls(
            request_id=request_id,
            sample_id=sample.id,
            instruction=sample.instruction,
            task=sample.task,
            group_size=group_size,
            sampling=base,
            min_policy_version=min_policy_version,
            purpose=purpose,
        )


class Completion(BaseModel):
    """One sampled answer, part of a RolloutGroup (actors -> driver -> reward_service, learner).

    An episode of several turns (multi-turn refinement) is one Completion too: `token_ids` is everything after
    the group's prompt, as the engine fed and generated it (each answer, then the user turn that showed the next
    picture, its image tokens expanded, then the next answer), `policy_mask` marks the answers' tokens (the loss
    covers those and nothing else), `pictures` are the pictures shown after the first turn and `text` is the
    last answer."""

    model_config = _FROZEN

    text: str
    token_ids: list[int]
    logprobs: list[float] = Field(
        description="Behaviour log-probability of each token in token_ids (0 where policy_mask is 0)."
    )
    finish_reason: Literal["stop", "length", "abort"] = "stop"
    policy_mask: list[int] | None = Field(
        None,
        description="1 on the tokens the policy generated, 0 on what was shown to it between its answers; "
        "None: every token is the policy's (one turn).",
    )
    pictures: list[bytes] = Field(
        default_factory=list,
        repr=False,
        description="PNG of each picture shown after the first turn, in the order their image tokens appear.",
    )
    earlier_texts: list[str] = Field(
        default_factory=list,
        description="The answers of an episode's turns before its last (`text`), in order.",
    )

    @model_validator(mode="after")
    def _lengths_agree(self) -> Completion:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"Completion has {len(self.token_ids)} token_ids but {len(self.logprobs)} logprobs; "
                "the engine must return one behaviour logprob per generated token"
            )
        if any(not math.isfinite(lp) or lp > 1e-6 for lp in self.logprobs):
            raise ValueError("Completion.logprobs must be finite log-probabilities (<= 0)")
        mask = self.policy_mask
        if mask is not None and (len(mask) != len(self.token_ids) or set(mask) - {0, 1}):
            raise ValueError(
                f"Completion.policy_mask has {len(mask)} entries for {len(self.token_ids)} token_ids: give one "
                "0 (shown to the policy) or 1 (generated by it) per token"
            )
        if (self.pictures or self.earlier_texts) and mask is None:
            raise ValueError(
                "a Completion with pictures is an episode of several turns: give its policy_mask"
            )
        return self

    @property
    def texts(self) -> list[str]:
        """Every turn's answer, in order (one for a one-turn answer)."""
        return [*self.earlier_texts, self.text]

    @property
    def loss_mask(self) -> list[int]:
        """1 on each token the policy generated (every token of a one-turn answer)."""
        return [1] * len(self.token_ids) if self.policy_mask is None else list(self.policy_mask)

    @property
    def policy_tokens(self) -> int:
        return len(self.token_ids) if self.policy_mask is None else sum(self.policy_mask)


class RolloutGroup(BaseModel):
    """actors -> driver: the G completions of one prompt, stamped with the policy version that wrote them.

    `prompt_token_ids` is the prompt the G completions were sampled after, exactly as the engine fed it to the
    model (chat template, image tokens expanded); the learner scores the completions after these ids."""

    model_config = _FROZEN

    group_id: str = Field(min_length=1)
    sample_id: str = Field(min_length=1)
    policy_version: int = Field(ge=0)
    completions: list[Completion]
    temperature: float = Field(ge=0.0, le=10.0, description="The temperature it was sampled at (0: greedy).")
    max_tokens: int = Field(ge=1, le=32768, description="The completion-length cap it was sampled with.")
    prompt_token_ids: list[int] = Field(
        min_length=1, description="The prompt's token ids as the engine saw them (image tokens expanded)."
    )
    worker: str = Field("", description="Name of the rollout actor that generated the group.")
    generate_s: float = Field(0.0, ge=0.0)
    purpose: Purpose = Field("train", description="Its request's purpose (train | val | eval).")

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

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens, image tokens included."""
        return len(self.prompt_token_ids)


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
    stop: bool = Field(
        False, description="A later turn's answer that the mask shown is right: no prompts, that mask stands."
    )
    failure: str | None = Field(None, description="Why parsing failed: a short machine-readable reason.")
    detail: str | None = Field(None, description="Human-readable detail of the failure.")

    @model_validator(mode="after")
    def _ok_iff_no_failure(self) -> ParsedAnswer:
        if self.ok == (self.failure is not None):
            raise ValueError("ParsedAnswer: ok must be True exactly when failure is None")
        if self.ok and not self.prompts and not self.stop:
            raise ValueError("ParsedAnswer: a successful parse has at least one prompt, or is a stop")
        if self.stop and self.prompts:
            raise ValueError("ParsedAnswer: a stop answer has no prompts")
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
    refine_gain: float = Field(
        0.0, description="An episode's IoU at its last turn minus at its first (weighted by w.refine_gain)."
    )
    total: float


REWARD_TERMS: tuple[str, ...] = tuple(RewardComponents.model_fields)
"""Every reward term's name, in RewardComponents' order (metrics.jsonl's reward_<term>, trackers, Prometheus)."""


class CompletionReward(BaseModel):
    """The reward of one completion, inside GroupScores (reward_service -> driver) and ScoredGroup (-> learner)."""

    model_config = _FROZEN

    rewards: RewardComponents
    parse_ok: bool
    parse_failure: str | None = None
    turns: list[RewardComponents] = Field(
        default_factory=list,
        description="An episode of several turns: each turn's own terms (`rewards` is the episode's). Empty for "
        "one turn.",
    )
    stop: bool = Field(False, description="The episode ended with a stop answer (the mask shown stands).")
    goes_on: bool = Field(
        False,
        description="Its last answer made a mask: the episode may take another turn (rollout.max_turns).",
    )

    @property
    def num_turns(self) -> int:
        return max(1, len(self.turns))


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

    @property
    def zero_variance(self) -> bool:
        """All G rewards equal (spread below ZERO_VARIANCE_TOL): every advantage is 0, no learning signal."""
        return _all_equal(self.totals)


class RewardRequest(BaseModel):
    """driver -> reward_service: score every completion of a group against the sample's ground truth."""

    model_config = _FROZEN

    group: RolloutGroup
    sample: Sample
    policy_image_size: int | None = Field(
        None, ge=16, le=8192, description="Side of the square image the policy saw; None: original pixels."
    )
    previous: GroupScores | None = Field(
        None,
        description="Episodes of several turns: the group's scores after its previous turn, so that only the new "
        "turn's answers are parsed and segmented. None: every turn is scored.",
    )

    @model_validator(mode="after")
    def _same_sample(self) -> RewardRequest:
        if self.group.sample_id != self.sample.id:
            raise ValueError(
                f"RewardRequest pairs group for sample {self.group.sample_id!r} with sample {self.sample.id!r}"
            )
        p = self.previous
        if p is not None and (p.group_id != self.group.group_id or len(p.scores) != self.group.group_size):
            raise ValueError(
                f"RewardRequest for group {self.group.group_id!r} ({self.group.group_size} completions) got the "
                f"previous scores of group {p.group_id!r} ({len(p.scores)} completions)"
            )
        return self


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

    @property
    def sample_id(self) -> str:
        return self.group.sample_id

    @property
    def zero_variance(self) -> bool:
        """All G rewards equal (spread below ZERO_VARIANCE_TOL): every advantage is 0, no learning signal."""
        return _all_equal(self.totals)


def _all_equal(totals: list[float]) -> bool:
    """The zero-variance rule: G rewards whose spread is below ZERO_VARIANCE_TOL."""
    return max(totals) - min(totals) < ZERO_VARIANCE_TOL


def _pair_label(item: RolloutRequest | RolloutGroup | ScoredGroup) -> tuple[str, str]:
    """(what the item is, its id) for check_pairs' messages."""
    if isinstance(item, RolloutRequest):
        return "request", item.request_id
    if isinstance(item, ScoredGroup):
        return "scored group", item.group.group_id
    return "group", item.group_id


def check_pairs(
    items: Sequence[RolloutRequest | RolloutGroup | ScoredGroup],
    samples: Sequence[Sample],
    what: str,
    match_ids: bool = True,
) -> None:
    """Sample i belongs to item i (requests, groups or scored groups): as many samples as items and, with
    `match_ids`, sample i's id is item i's sample_id. `what` names the call in the error ("Learner.step").
    The one pairing check of the rollout worker, the reward worker (it counts only: it scores a group paired
    with another sample 0) and the learner."""
    noun = _pair_label(items[0])[0] if items else "item"
    if len(samples) != len(items):
        raise ValueError(
            f"{what} got {len(items)} {noun}s but {len(samples)} samples; pass one each, in the same order "
            f"(sample i belongs to {noun} i)"
        )
    if not match_ids:
        return
    for i, (item, sample) in enumerate(zip(items, samples, strict=True)):
        if item.sample_id != sample.id:
            noun, label = _pair_label(item)
            raise ValueError(
                f"{what}: {noun} {i} ({label!r}) is for sample {item.sample_id!r} but sample {i} is "
                f"{sample.id!r}; keep the {noun}s and the samples in the same order"
            )
