"""The `RolloutEngine` protocol and what both engines (actors/vllm_engine.py, actors/hf_engine.py) share.

An engine turns a batch of `RolloutRequest`s (instruction + task + sampling settings + G) and their images into G
`Completion`s per request: text, token ids, and one BEHAVIOUR log-probability per generated token.

Behaviour logprobs (both engines, same definition): the log-probability of each sampled token under the
distribution it was actually drawn from, i.e. after
  1. suppressing the vision special tokens (and ids the tokenizer does not have), and the repetition penalty
     when one is set (evaluation with the model's generation_config; 1 = none, the training setting),
  2. dividing the logits by the temperature (temperature 0 = greedy: the logprobs are then those of
     softmax(logits) at temperature 1, with the same suppression),
  3. top-k, then top-p truncation (nucleus), RENORMALISED over the kept tokens (the others get -inf).
With top_p = 1, top_k = 0 (the Seg-R1 setting) and a policy that puts no mass on vision tokens, this equals
log_softmax(logits / T) of a teacher-forced forward pass, which is what the learner recomputes
(learner/policy.py); the tests check it within a tolerance. vLLM produces them with
`logprobs_mode="processed_logprobs"`; the transformers engine with its own last logits processor.

Completions end at <|im_end|> or <|endoftext|>; the stop token is part of `token_ids` (and has a logprob, so the
learner also learns to stop) but not of `text`. `finish_reason` is "stop" or "length" (max_tokens reached).

Weight updates are atomic: `load_weights(named_tensors, version)` validates every name and shape before it
touches the model (a `WeightStream` from its manifest, before the first bucket arrives), so a bad update leaves
the engine on its previous version; if copying fails half-way (or a stream breaks off) the engine refuses to
generate (`InconsistentWeightsError`) until a complete update succeeds. Generation and
loading are serialised by a lock, so no completion ever mixes two versions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from protos import Completion, RolloutRequest, SamplingConfig
from protos.answer import DEFAULT_PRESET, PromptSet, preset_prompts

if TYPE_CHECKING:
    import torch
    from PIL import Image

NamedTensors = Iterable[tuple[str, "torch.Tensor"]]


class StaleWeightsError(RuntimeError):
    """A request needs a newer policy than the worker holds (`min_policy_version` > `policy_version`).

    The pool resyncs the worker's weights and retries; a worker never generates from old weights silently."""

    def __init__(self, worker: str, held: int, needed: int):
        super().__init__(
            f"rollout worker {worker!r} holds policy version {held} but the request needs >= {needed}; "
            "push the current weights to it (weight sync) and retry"
        )
        self.worker, self.held, self.needed = worker, held, needed

    def __reduce__(self):  # keep the fields across Ray's pickling
        return (StaleWeightsError, (self.worker, self.held, self.needed))


class WeightUpdateError(ValueError):
    """A weight update that cannot be applied (unknown or missing names, wrong shapes, version going back).

    Raised BEFORE the model is touched: the engine keeps its previous weights and version."""


class InconsistentWeightsError(RuntimeError):
    """Copying an update failed half-way: the engine's weights are a mix of versions, so it refuses to
    generate until a complete `load_weights` succeeds."""


@dataclass(frozen=True)
class GenerationBatch:
    """What one engine call produced: G completions per request, each request's prompt token ids exactly as
    the model saw them (chat template applied, image tokens expanded; the learner scores the completions after
    them), and the ONE policy version every completion of the call was generated with."""

    completions: list[list[Completion]]
    prompt_token_ids: list[list[int]]
    policy_version: int

    @property
    def prompt_tokens(self) -> list[int]:
        """Each request's prompt length in tokens, image tokens included."""
        return [len(ids) for ids in self.prompt_token_ids]


@dataclass(frozen=True)
class NextTurn:
    """One episode's next turn (multi-turn refinement): its prompt ids (runtime.turns.next_turn_ids: the previous
    prompt and answer as the engine reported them, then the new user turn, image placeholders collapsed), its
    images in order (the sample's, then each picture shown since), and how to sample its ONE answer."""

    prompt_ids: list[int]
    images: list[Any]
    sampling: SamplingConfig

    def key(self) -> BatchKey:
        return sampling_key(self.sampling, 1, True)


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates G completions per request from the policy weights of one version.

    `generate_batch` is `generate` plus the prompt token ids and the version the call used (read under the
    same lock as the generation, so a concurrent weight update cannot make the stamp wrong)."""

    @property
    def policy_version(self) -> int: ...

    def generate(
        self, requests: Sequence[RolloutRequest], images: Sequence[Image.Image | None]
    ) -> list[list[Completion]]: ...

    def generate_batch(
        self, requests: Sequence[RolloutRequest], images: Sequence[Image.Image | None]
    ) -> GenerationBatch: ...

    def load_weights(self, named_tensors: NamedTensors, version: int) -> None: ...

    def weight_names(self) -> list[str]: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def render_messages(
    request: RolloutRequest,
    has_image: bool,
    prompts: PromptSet,
    answer_format: str = "full",
    image_size: int = 768,
) -> list[dict]:
    """Chat messages of one request from the policy's prompt set (PolicySpec.prompt): with an image, [system,]
    user = image + the user text for the request's task; without (text-only models, `segr1 generate --prompt`),
    the same turns as plain strings without the image placeholder, so any chat template renders them."""
    return prompts.messages(request.instruction, request.task, answer_format, image_size, has_image)


def default_prompts(prompts: PromptSet | None) -> PromptSet:
    """An engine's prompt set: the one given, else the default preset's training texts (as PolicySpec)."""
    return prompts if prompts is not None else preset_prompts(DEFAULT_PRESET, "train")


def check_batch(requests: Sequence[RolloutRequest], images: Sequence[object]) -> None:
    if len(requests) != len(images):
        raise ValueError(
            f"generate got {len(requests)} requests but {len(images)} images; pass one image (or None for a "
            "text-only prompt) per request, in the same order"
        )


@dataclass(frozen=True)
class BatchKey:
    """Requests that can share one generate call: same sampling settings (seed aside), G and modality."""

    temperature: float
    top_p: float
    max_tokens: int
    group_size: int
    has_image: bool
    top_k: int = 0
    repetition_penalty: float = 1.0


def sampling_key(s: SamplingConfig, group_size: int, has_image: bool) -> BatchKey:
    return BatchKey(
        s.temperature, s.top_p, s.max_tokens, group_size, has_image, s.top_k, s.repetition_penalty
    )


def batch_key(request: RolloutRequest, has_image: bool) -> BatchKey:
    return sampling_key(request.sampling, request.group_size, has_image)


def group_requests(requests: Sequence[RolloutRequest], images: Sequence[object]) -> dict[BatchKey, list[int]]:
    """Indices of the requests, grouped by BatchKey in first-seen order."""
    groups: dict[BatchKey, list[int]] = {}
    for i, (req, img) in enumerate(zip(requests, images, strict=True)):
        groups.setdefault(batch_key(req, img is not None), []).append(i)
    return groups


def request_seed(sampling: SamplingConfig) -> int:
    """The request's seed, or a fresh random one (completion j of the group uses seed + j in both engines)."""
    if sampling.seed is not None:
        return int(sampling.seed)
    return int.from_bytes(os.urandom(4), "little") >> 1


# ----------------------------------------------------------------------------------------------------------------
# Completions


def make_completion(
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    stop_ids: set[int] | frozenset[int],
    decode,
) -> Completion:
    """Cut at the first stop token (kept), decode the text without special tokens, clamp float noise."""
    ids = [int(t) for t in token_ids]
    lps = [min(float(x), 0.0) for x in logprobs]
    cut = next((k for k, t in enumerate(ids) if t in stop_ids), None)
    if cut is not None:
        ids, lps = ids[: cut + 1], lps[: cut + 1]
    finish = "stop" if cut is not None else "length"
    return Completion(text=decode(ids), token_ids=ids, logprobs=lps, finish_reason=finish)


# ----------------------------------------------------------------------------------------------------------------
# Weight updates


# transformers >= 5 names Qwen2.5-VL's parameters model.language_model.* / model.visual.* in memory but saves
# them as model.* / visual.* (the release layout, which vLLM's loader also maps); both name the same weight.
_CANONICAL_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def canonical_name(name: str) -> str:
    """The checkpoint (release) spelling of a parameter name, so in-memory and saved names compare equal."""
    for new, old in _CANONICAL_PREFIXES:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def validate_update(
    named_tensors: NamedTensors,
    expected: Mapping[str, tuple[int, ...]],
    optional: Iterable[str] = (),
    where: str = "engine",
) -> NamedTensors:
    """Check an update before anything is copied.

    `expected`: name -> shape of every weight the engine holds; `optional`: names that may be left out (tied
    aliases such as lm_head.weight when the embeddings are tied). Names are compared in their canonical
    (checkpoint) spelling, so the learner's in-memory names and a checkpoint's names are both accepted. Every
    required name must come exactly once, with its shape; unknown names are refused. A `WeightStream`
    (runtime/weights/stream.py: the buckets arrive as the engine loads them) is checked from its manifest and
    returned as it is, unread; anything else is materialised and returned as a list of (name, tensor)."""
    from runtime.weights.stream import WeightStream

    if isinstance(named_tensors, WeightStream):
        _check_layout(named_tensors.shapes(), expected, optional, where)
        return named_tensors
    items = list(named_tensors)
    _check_layout([(n, tuple(t.shape)) for n, t in items], expected, optional, where)
    return items


def _check_layout(shapes, expected, optional, where: str) -> None:
    expected = {canonical_name(n): tuple(shape) for n, shape in expected.items()}
    optional = {canonical_name(n) for n in optional}
    seen: set[str] = set()
    problems: list[str] = []
    for sent, shape in shapes:
        name = canonical_name(sent)
        if name in seen:
            problems.append(f"{name!r} sent twice")
            continue
        seen.add(name)
        if name not in expected:
            problems.append(f"unknown name {name!r}")
        elif tuple(shape) != tuple(expected[name]):
            problems.append(f"{name!r} has shape {tuple(shape)}, the model needs {tuple(expected[name])}")
    missing = sorted(set(expected) - seen - optional)
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[:3]})")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise WeightUpdateError(
            f"{where}: weight update refused, nothing was loaded: {shown}. Send every parameter of the policy "
            "with its Hugging Face name (learner Policy.named_weights()), for the model this worker loaded"
        )


def check_consistent(consistent: bool, where: str) -> None:
    """InconsistentWeightsError unless the engine's weights are one whole version."""
    if not consistent:
        raise InconsistentWeightsError(
            f"{where}: a weight update failed half-way; load a complete version before generating"
        )


def check_version(current: int, version: int, where: str = "engine") -> None:
    if not isinstance(version, int) or version < 0:
        raise WeightUpdateError(f"{where}: policy version must be an int >= 0, got {version!r}")
    if version < current:
        raise WeightUpdateError(
            f"{where}: refusing to go back from policy version {current} to {version}; "
            "versions only increase (a stale update arrived late?)"
        )
