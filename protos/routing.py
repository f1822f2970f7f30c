"""What the driver routes without reading: a group's header, and the batch a learner rank assembles itself.

A rollout group's completions (token ids, logprobs, text) travel rollout -> reward -> learner as an object ref.
The driver sees only:
- `GroupHeader` (rollout -> driver): what it needs of a RolloutGroup to account for it, check its staleness and
  write its step's metrics line;
- the `GroupScores` (reward -> driver), to filter zero-variance groups and log rewards.
It then sends every learner rank one `TrainBatch` (one object for all ranks) and the refs of the rollouts and
samples it names; each rank joins the groups with their scores (`TrainBatch.assemble`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protos.dataset import Sample
from protos.messages import GroupScores, RolloutGroup, ScoredGroup


class GroupHeader(BaseModel):
    """rollout -> driver: a RolloutGroup without its completions (the group stays in the object store)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    group_id: str = Field(min_length=1)
    sample_id: str = Field(min_length=1)
    policy_version: int = Field(ge=0)
    worker: str = ""
    generate_s: float = Field(0.0, ge=0.0)
    completions: int = Field(ge=0, description="G: completions in the group.")
    completion_tokens: int = Field(
        ge=0, description="Tokens generated, over the G completions (every turn's)."
    )

    @classmethod
    def of(cls, group: RolloutGroup) -> GroupHeader:
        return cls(
            group_id=group.group_id,
            sample_id=group.sample_id,
            policy_version=group.policy_version,
            worker=group.worker,
            generate_s=group.generate_s,
            completions=len(group.completions),
            completion_tokens=sum(c.policy_tokens for c in group.completions),
        )


class BatchPick(BaseModel):
    """One group of a TrainBatch: group `index` of rollout `rollout` (a position in the rollout refs the rank
    was given), with its scores; its sample is the sample ref at the pick's own position."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rollout: int = Field(ge=0)
    index: int = Field(ge=0)
    scores: GroupScores


class TrainBatch(BaseModel):
    """driver -> every learner rank: the groups of one optimiser step, by reference. The rank is called with
    `(batch, *rollouts, *samples)`: `rollouts` rollout results (list[RolloutGroup], resolved by Ray from their
    refs), then one Sample per pick, in pick order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    picks: list[BatchPick] = Field(min_length=1)
    rollouts: int = Field(ge=1, description="How many rollout results precede the samples.")

    @model_validator(mode="after")
    def _picks_name_given_rollouts(self) -> TrainBatch:
        bad = [p.rollout for p in self.picks if p.rollout >= self.rollouts]
        if bad:
            raise ValueError(
                f"TrainBatch picks rollout {bad[0]} of {self.rollouts}; pass every rollout it names"
            )
        return self

    def assemble(self, refs: Sequence[Any]) -> tuple[list[ScoredGroup], list[Sample]]:
        """(scored groups, their samples) from the resolved `(*rollouts, *samples)` the rank was called with."""
        rollouts, samples = refs[: self.rollouts], list(refs[self.rollouts :])
        if len(samples) != len(self.picks):
            raise ValueError(
                f"TrainBatch of {len(self.picks)} groups got {len(samples)} samples after its {self.rollouts} "
                "rollouts; pass one sample per pick, in pick order"
            )
        groups: list[RolloutGroup] = [rollouts[p.rollout][p.index] for p in self.picks]
        return [ScoredGroup.join(g, p.scores) for g, p in zip(groups, self.picks, strict=True)], samples
