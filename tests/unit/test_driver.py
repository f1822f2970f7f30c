"""The driver's bookkeeping that needs no Ray: which scored groups are too stale to train, and the accounting that
must close (generated = trained + dropped_stale + filtered + left_over)."""

from __future__ import annotations

from cluster.driver import Accounting, request_seed, split_by_staleness
from learner.synthetic import reward
from protos import Completion, RolloutGroup, ScoredGroup


def scored(group_id: str, policy_version: int) -> tuple[ScoredGroup, str]:
    completions = [Completion(text="x", token_ids=[1], logprobs=[-0.5]) for _ in range(2)]
    group = RolloutGroup(
        temperature=1.0,
        max_tokens=64,
        prompt_token_ids=[1, 2, 3],
        group_id=group_id,
        sample_id=f"s-{group_id}",
        policy_version=policy_version,
        completions=completions,
    )
    # the driver pairs each group with its sample's ObjectRef; the split never looks at it
    return ScoredGroup(group=group, scores=[reward(1.0), reward(0.5)]), f"sample-{group_id}"


def ids(items) -> list[str]:
    return [sg.group.group_id for sg, _ in items]


def test_stale_groups_are_found_anywhere_in_arrival_order():
    # scoring finishes out of generation order: a version-3 group can arrive before a version-1 one
    ready = [scored("c4-0", 3), scored("c1-0", 1), scored("c3-0", 2), scored("c0-0", 0), scored("c5-0", 4)]
    fresh, stale = split_by_staleness(ready, version=4, max_staleness=2)
    assert ids(fresh) == ["c4-0", "c3-0", "c5-0"]  # 4 - 3, 4 - 2, 4 - 4 <= 2, arrival order kept
    assert ids(stale) == ["c1-0", "c0-0"]  # 4 - 1 = 3 and 4 - 0 = 4 versions behind


def test_max_staleness_zero_trains_only_the_current_version():
    ready = [scored("a", 5), scored("b", 4), scored("c", 5)]
    fresh, stale = split_by_staleness(ready, version=5, max_staleness=0)
    assert ids(fresh) == ["a", "c"] and ids(stale) == ["b"]
    assert split_by_staleness([], version=5, max_staleness=0) == ([], [])


def test_accounting_reports_what_is_missing_from_the_sum_as_lost():
    a = Accounting(groups_generated=20, groups_trained=12, groups_dropped_stale=3, groups_filtered=4)
    assert a.groups_lost == 1
    a.groups_left_over += 1
    assert a.groups_lost == 0
    a.groups_failed = 2  # failed calls are inside `lost`, not a separate term of the sum
    assert a.groups_lost == 0


def test_request_seeds_never_share_a_completion_stream_within_a_run():
    g = 8
    seeds = [request_seed(7, chunk, i, g) for chunk in range(50) for i in range(16)]
    streams = {s + j for s in seeds for j in range(g)}  # completion j samples with seed + j
    assert len(streams) == len(seeds) * g
    assert request_seed(7, 0, 0, g) != request_seed(8, 0, 0, g)
