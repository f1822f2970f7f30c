"""The metrics.jsonl line of a step (cluster/driver/metrics.py step_line): every figure of the learner's StepStats
reaches it and the trackers, StepStats declares every figure it carries, and the docs list exactly these keys."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from cluster.driver.metrics import LEARNER_KEYS, RENAMED_KEYS, step_line
from cluster.driver.state import RoutedGroup
from cluster.tracking import scalar_name, scalars_of
from protos import Completion, GroupHeader, GroupScores, RolloutGroup, StepStats
from tests.support.paths import REPO
from tests.support.synthetic import reward

# the pools' figures, added to the line by cluster/pools/elastic.py (docs/scaling.md)
POOL_KEYS = {"rollout_workers", "reward_workers", "wait_rollout_share", "wait_reward_share"}


def _stats() -> StepStats:
    """A StepStats whose every field holds a value of its own (none equal to its default)."""
    values = {}
    for k, (name, field) in enumerate(StepStats.model_fields.items(), start=3):
        values[name] = k if field.annotation is int else k + 0.25
    return StepStats(**values)


def _batch(stats: StepStats) -> list[RoutedGroup]:
    out = []
    for i in range(stats.num_groups):
        group = RolloutGroup(
            temperature=1.0,
            max_tokens=64,
            prompt_token_ids=[1, 2, 3],
            group_id=f"c{i}-0",
            sample_id=f"s{i}",
            policy_version=stats.policy_version - 1,
            completions=[Completion(text="x", token_ids=[1, 2], logprobs=[-0.5, -0.5]) for _ in range(2)],
            worker="rollout-0",
        )
        scores = GroupScores(group_id=group.group_id, scores=[reward(1.0), reward(0.0)])
        out.append(RoutedGroup(i, 0, GroupHeader.of(group), scores, f"rollout-{i}", f"ref-{i}"))
    return out


def _line(stats: StepStats) -> dict:
    batch = _batch(stats)
    staleness = [1] * len(batch)
    where = {"step": stats.step, "policy_version": stats.policy_version, "restarts": 0}
    sync = {  # a delta version's figures (weight_sync.delta): every key the line can carry
        "seconds": 0.5,
        "bytes": 1000,
        "full_bytes": 50_000,
        "delta": True,
        "changed_fraction": 0.02,
        "encode_s": 0.01,
        "decode_s": 0.02,
    }
    return step_line(stats, batch, staleness, sync, 2.0, **where)


def test_every_step_stats_field_is_in_the_metrics_line():
    stats = _stats()
    line = _line(stats)
    assert set(LEARNER_KEYS) | set(RENAMED_KEYS) == set(StepStats.model_fields)
    assert not set(LEARNER_KEYS) & set(RENAMED_KEYS)
    for name in StepStats.model_fields:
        key = RENAMED_KEYS.get(name, name)
        assert line[key] == getattr(stats, name), (name, key)
    assert line["tokens_per_s"] == stats.num_tokens / 2.0  # the throughput is the learner's counts
    assert line["masks_per_s"] == stats.num_completions / 2.0


def test_every_step_stats_figure_reaches_the_trackers():
    stats = _stats()
    sent = scalars_of(_line(stats))
    for name in StepStats.model_fields:
        if name == "step":  # the trackers' step axis
            continue
        key = RENAMED_KEYS.get(name, name)
        assert sent[scalar_name(key)] == float(getattr(stats, name)), (name, key)


def test_step_stats_refuses_an_undeclared_field():
    with pytest.raises(ValidationError, match="reward_mean"):
        StepStats(step=1, policy_version=1, loss=0.0, reward_mean=0.5)


def _documented(path: str, heading: str) -> set[str]:
    """The backticked names in the first column of the table that follows `heading` in a doc."""
    text = (REPO / path).read_text().split(heading, 1)[1]
    table = re.search(r"\n(\|[^\n]*\|\n)+", text).group(0)
    rows = table.strip().splitlines()[2:]
    return {name for r in rows for name in re.findall(r"`([^`]+)`", r.split(" | ", 1)[0])}


def test_docs_list_exactly_the_keys_of_the_line_and_the_fields_of_step_stats():
    line = _line(_stats())
    assert (
        _documented("docs/e2e.md", "## metrics.jsonl: one line per optimiser step") == set(line) | POOL_KEYS
    )
    assert _documented("docs/learner.md", "`StepStats` (protos/messages.py)") == set(StepStats.model_fields)
