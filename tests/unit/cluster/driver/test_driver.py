"""The driver's bookkeeping that needs no Ray: which scored groups are too stale to train, and the accounting that
must close (generated = trained + dropped_stale + filtered + left_over)."""

from __future__ import annotations

from cluster.driver.batches import fill_batch
from cluster.driver.state import Accounting, request_seed, split_by_staleness
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


class Source:
    """A stand-in for the pools: prompt i is informative unless i is in `flat`; records each draw's size."""

    def __init__(self, flat: set[int]):
        self.flat, self.next, self.draws, self.generated, self.filtered = flat, 0, [], 0, 0

    def draw(self, n: int):
        ids = list(range(self.next, self.next + n))
        self.next += n
        self.draws.append(n)
        self.generated += n
        kept = [(i, f"ref-{i}") for i in ids if i not in self.flat]
        self.filtered += n - len(kept)
        return kept, [f"chunk-{i}" for i in ids]


def test_fill_batch_refills_with_exactly_the_missing_groups_until_the_batch_is_full():
    src = Source(flat={1, 2, 5, 8, 9})  # 0..3: two flat; 4..5: one flat; 6..6: full
    filled = fill_batch(src.draw, 4, refill=True, max_fill_rounds=8)
    assert [i for i, _ in filled.kept] == [0, 3, 4, 6] and filled.fill_rounds == 2
    assert src.draws == [4, 2, 1]  # never more than missing: nothing is carried over
    assert len(filled.chunks) == src.generated == 7
    # the accounting closes: generated = trained + filtered
    assert src.generated == len(filled.kept) + src.filtered


def test_fill_batch_stops_after_max_fill_rounds_and_without_the_filter():
    src = Source(flat=set(range(1, 100)))  # only prompt 0 is informative
    filled = fill_batch(src.draw, 4, refill=True, max_fill_rounds=2)
    assert [i for i, _ in filled.kept] == [0] and filled.fill_rounds == 2 and src.draws == [4, 3, 3]
    src = Source(flat={0})
    filled = fill_batch(src.draw, 4, refill=False, max_fill_rounds=8)
    assert len(filled.kept) == 3 and filled.fill_rounds == 0 and src.draws == [4]
    filled = fill_batch(Source(flat={0}).draw, 4, refill=True, max_fill_rounds=0)
    assert len(filled.kept) == 3 and filled.fill_rounds == 0
