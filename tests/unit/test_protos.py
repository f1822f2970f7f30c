"""protos: purity, round-trips and validation."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest
from pydantic import ValidationError

from protos import (
    DATASET_SCHEMA,
    Completion,
    CompletionReward,
    MaskPrompt,
    ParsedAnswer,
    RewardComponents,
    RewardRequest,
    RolloutGroup,
    RolloutRequest,
    Sample,
    ScoredGroup,
    TensorSpec,
    WeightsManifest,
)


def _sample(sid: str = "s0") -> Sample:
    return Sample(
        id=sid,
        source="synthetic",
        split="train",
        task="foreground",
        instruction="segment it",
        image=b"\x89PNG...",
        mask=b"\x89PNG...",
        width=64,
        height=48,
    )


def _completion(n: int = 3) -> Completion:
    return Completion(text="x" * n, token_ids=list(range(n)), logprobs=[-0.5] * n)


def _group(g: int = 4) -> RolloutGroup:
    return RolloutGroup(
        temperature=1.0,
        max_tokens=64,
        group_id="g0",
        sample_id="s0",
        policy_version=3,
        completions=[_completion()] * g,
    )


def test_importing_protos_loads_no_heavy_framework():
    code = (
        "import sys, protos\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch','ray','vllm','transformers'})\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_sample_round_trips_through_arrow():
    s = _sample()
    table = pa.Table.from_pylist([s.to_row()], schema=DATASET_SCHEMA)
    assert Sample.from_row(table.to_pylist()[0]) == s


def test_sample_rejects_empty_image_naming_the_field():
    with pytest.raises(ValidationError, match="image"):
        Sample(**{**_sample().model_dump(), "image": b""})


def test_messages_round_trip_json():
    scored = ScoredGroup(
        group=_group(),
        scores=[
            CompletionReward(
                rewards=RewardComponents(format=1, iou=0.5, s_measure=0.6, segmentation=0.53, total=1.53),
                parse_ok=True,
            )
        ]
        * 4,
    )
    assert ScoredGroup.model_validate_json(scored.model_dump_json()) == scored
    assert scored.totals == [1.53] * 4
    req = RewardRequest(group=_group(), sample=_sample(), policy_image_size=768)
    assert RewardRequest.model_validate_json(req.model_dump_json()) == req


def test_group_of_one_is_rejected():
    with pytest.raises(ValidationError, match="G >= 2"):
        _group(1)
    with pytest.raises(ValidationError):
        RolloutRequest(request_id="r", sample_id="s", instruction="i", group_size=1)


def test_completion_lengths_must_agree():
    with pytest.raises(ValidationError, match="logprobs"):
        Completion(text="a", token_ids=[1, 2], logprobs=[-0.1])
    with pytest.raises(ValidationError):
        Completion(text="a", token_ids=[1], logprobs=[float("nan")])


def test_scored_group_needs_one_score_per_completion():
    cr = CompletionReward(
        rewards=RewardComponents(format=0, iou=0, s_measure=0, segmentation=0, total=0),
        parse_ok=False,
        parse_failure="missing_tag",
    )
    with pytest.raises(ValidationError, match="3 scores for 4"):
        ScoredGroup(group=_group(4), scores=[cr] * 3)


def test_reward_request_must_pair_the_right_sample():
    with pytest.raises(ValidationError, match="pairs group"):
        RewardRequest(group=_group(), sample=_sample("other"))


def test_mask_prompt_validation():
    MaskPrompt(box=(1, 2, 3, 4), points=[(2, 3)], labels=[1])
    with pytest.raises(ValidationError, match="x1 < x2"):
        MaskPrompt(box=(3, 2, 1, 4))
    with pytest.raises(ValidationError, match="2 points but 1 labels"):
        MaskPrompt(points=[(1, 1), (2, 2)], labels=[1])
    with pytest.raises(ValidationError, match="0 or 1"):
        MaskPrompt(points=[(1, 1)], labels=[2])


def test_parsed_answer_ok_iff_no_failure():
    ParsedAnswer(ok=False, failure="missing_tag")
    with pytest.raises(ValidationError):
        ParsedAnswer(ok=True, failure="missing_tag")
    with pytest.raises(ValidationError):
        ParsedAnswer(ok=True)


def test_weights_manifest_rejects_overrun():
    WeightsManifest(
        version=1,
        bucket_nbytes=[16],
        tensors=[TensorSpec(name="w", shape=(2, 2), dtype="float32", bucket=0, offset=0, nbytes=16)],
    )
    with pytest.raises(ValidationError, match="overruns"):
        WeightsManifest(
            version=1,
            bucket_nbytes=[8],
            tensors=[TensorSpec(name="w", shape=(2, 2), dtype="float32", bucket=0, offset=0, nbytes=16)],
        )
