"""protos: purity, round-trips and validation."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
from pydantic import ValidationError

import protos
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
    SamplingConfig,
    ScoredGroup,
    TensorSpec,
    WeightsManifest,
    check_pairs,
)
from tests.support.samples import placeholder_sample


def _sample(sid: str = "s0") -> Sample:
    return placeholder_sample(sid)


def _completion(n: int = 3) -> Completion:
    return Completion(text="x" * n, token_ids=list(range(n)), logprobs=[-0.5] * n)


def _group(g: int = 4) -> RolloutGroup:
    return RolloutGroup(
        temperature=1.0,
        max_tokens=64,
        prompt_token_ids=[1, 2, 3],
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


def _top_level_imports(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def test_protos_imports_no_third_party_package_but_pydantic_and_pyarrow():
    allowed = set(sys.stdlib_module_names) | {"protos", "pydantic", "pyarrow"}
    files = sorted(Path(protos.__file__).parent.rglob("*.py"))
    assert files
    bad = {str(f): sorted(_top_level_imports(f) - allowed) for f in files}
    assert {f: mods for f, mods in bad.items() if mods} == {}


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


def _scored(totals: list[float], sid: str = "s0") -> ScoredGroup:
    group = _group(len(totals)).model_copy(update={"sample_id": sid})
    scores = [
        CompletionReward(
            rewards=RewardComponents(format=0, iou=0, s_measure=0, segmentation=0, total=t), parse_ok=True
        )
        for t in totals
    ]
    return ScoredGroup(group=group, scores=scores)


def test_rollout_group_carries_its_prompt_ids():
    assert _group().prompt_tokens == 3  # len(prompt_token_ids)
    with pytest.raises(ValidationError, match="prompt_token_ids"):
        RolloutGroup(**{**_group().model_dump(), "prompt_token_ids": []})


def test_zero_variance_is_one_rule_with_one_tolerance():
    assert _scored([0.1 + 0.2, 0.3, 0.3]).zero_variance  # float noise is not a signal
    assert _scored([1.0, 1.0]).zero_variance
    assert not _scored([1.0, 1.0 + 1e-6]).zero_variance
    assert not _scored([0.0, 2.0, 1.0]).zero_variance


def test_check_pairs_counts_and_matches_ids():
    groups = [_scored([0.0, 1.0], "a"), _scored([0.0, 1.0], "b")]
    check_pairs(groups, [_sample("a"), _sample("b")], "Learner.step")
    with pytest.raises(ValueError, match="Learner.step got 2 scored groups but 1 samples; pass one each"):
        check_pairs(groups, [_sample("a")], "Learner.step")
    with pytest.raises(ValueError, match=r"scored group 0 \('g0'\) is for sample 'a' but sample 0 is 'b'"):
        check_pairs(groups, [_sample("b"), _sample("a")], "Learner.step")
    check_pairs(groups, [_sample("b"), _sample("a")], "score", match_ids=False)  # the count only
    req = RolloutRequest(request_id="r1", sample_id="a", instruction="i", group_size=2)
    with pytest.raises(ValueError, match="request 0 .*same order"):
        check_pairs([req], [_sample("b")], "generate")


def test_request_for_sample_takes_its_id_instruction_and_sampling():
    s = _sample("s7")
    section = SimpleNamespace(temperature=0.7, top_p=0.9, max_tokens=12)  # e.g. the rollout config's section
    req = RolloutRequest.for_sample(s, 4, section, request_id="c3-1", seed=11, min_policy_version=2)
    assert (req.request_id, req.sample_id, req.instruction, req.group_size) == (
        "c3-1",
        "s7",
        s.instruction,
        4,
    )
    assert req.sampling == SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=12, seed=11)
    assert req.min_policy_version == 2
    kept = RolloutRequest.for_sample(s, 2, SamplingConfig(seed=5), request_id="e-0")
    assert kept.sampling.seed == 5 and kept.min_policy_version == 0
