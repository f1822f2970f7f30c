"""Config sections that several workers share: the policy they all load and the Ray resources of one worker.

Each worker package owns the section of its own worker (actors/config.py, reward_service/config.py,
learner/config.py, runtime/weights/config.py); cluster/config.py composes them into the YAML tree users write and
hands each worker its section plus this `PolicySpec`. Pure pydantic.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protos.answer import DEFAULT_PRESET, AnswerFormat, PromptPreset, PromptSet, preset_prompts

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


def max_workers_field():
    """`<pool>.max_workers` of the scalable pools (rollout, reward): docs/scaling.md."""
    return Field(
        None,
        ge=1,
        le=1024,
        description="Upper bound when the pool is scaled during a run (segr1 scale, capacity, autoscale); "
        "None: num_workers.",
    )


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


_TEXTS = ("system", "system_points", "foreground", "referring", "reasoning", "points")
_TEXT_HELP = {
    "system": "System prompt of the full answer format ('' sends none; {size}: N of the NxN image).",
    "system_points": "System prompt of the points (pre-RL) format ('' sends none).",
    "foreground": "User text after the image, full format, foreground samples ({instruction}, {size}).",
    "referring": "User text after the image, full format, referring samples (must hold {instruction}).",
    "reasoning": "User text after the image, full format, reasoning samples (must hold {instruction}).",
    "points": "User text after the image, points format, every task ({instruction}, {size}).",
}


def _text(name: str, when: str = ""):
    return Field(None, max_length=20_000, description=when + _TEXT_HELP[name] + " None: the preset's text.")


class PromptTexts(BaseModel):
    """Explicit prompt texts for evaluation; each one set replaces the preset's (None keeps it)."""

    model_config = STRICT

    system: str | None = _text("system", "Evaluation only. ")
    system_points: str | None = _text("system_points", "Evaluation only. ")
    foreground: str | None = _text("foreground", "Evaluation only. ")
    referring: str | None = _text("referring", "Evaluation only. ")
    reasoning: str | None = _text("reasoning", "Evaluation only. ")
    points: str | None = _text("points", "Evaluation only. ")

    def overrides(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in _TEXTS if getattr(self, name) is not None}


class PromptConfig(BaseModel):
    """The prompts (`prompt:` in the YAML tree): a preset, then explicit texts that replace the preset's in
    training and evaluation, then `eval.*` texts that replace them in evaluation only. Templates take
    {instruction} (the sample's instruction) and {size} (N). protos/answer.py holds the presets' texts."""

    model_config = STRICT

    preset: PromptPreset = Field(
        DEFAULT_PRESET,
        description="seg-r1: the reference's texts, verbatim (RL, pre-RL, evaluation per task); compact: short "
        "texts for the tiny CPU models (demo, tests).",
    )
    system: str | None = _text("system")
    system_points: str | None = _text("system_points")
    foreground: str | None = _text("foreground")
    referring: str | None = _text("referring")
    reasoning: str | None = _text("reasoning")
    points: str | None = _text("points")
    eval: PromptTexts = Field(
        default_factory=PromptTexts,
        description="Texts for evaluation only (segr1 eval / predict, the demo's before / after).",
    )

    def resolve(self, phase: Literal["train", "eval"] = "train") -> PromptSet:
        """The texts of `phase`: the preset's, replaced by the explicit ones (and, in eval, by eval.*)."""
        texts = {name: getattr(self, name) for name in _TEXTS if getattr(self, name) is not None}
        if phase == "eval":
            texts.update(self.eval.overrides())
        return dataclasses.replace(preset_prompts(self.preset, phase), **texts)

    @model_validator(mode="after")
    def _check(self) -> PromptConfig:
        for phase in ("train", "eval"):
            try:
                self.resolve(phase).check()
            except ValueError as err:
                raise ValueError(f"{err} ({phase} prompts of preset {self.preset})") from None
        return self


class PolicySpec(BaseModel):
    """The policy every worker agrees on: which weights, at which precision, seeing which image, answering in
    which format after which prompts. Built by cluster/config.py from model.*, data.image_size,
    reward.answer_format, prompt and seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(min_length=1, description="A Hugging Face folder of a Qwen2.5-VL policy.")
    reference: str | None = Field(None, description="Frozen reference for the KL term; None: the policy.")
    dtype: Dtype = Field("auto", description="Weights dtype; auto: bfloat16 on GPU, float32 on CPU.")
    image_size: int = Field(768, ge=16, le=4096, description="The policy sees NxN images.")
    answer_format: AnswerFormat = Field("full", description="full or points (protos/answer.py).")
    prompt: PromptSet = Field(
        default_factory=lambda: preset_prompts(DEFAULT_PRESET, "train"),
        description="The resolved prompt texts every renderer uses (PromptConfig.resolve(phase)).",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of sampling and initialisation.")
    dummy_weights: bool = Field(
        False, description="Every model built from its config.json with random weights (segr1 preflight)."
    )
