"""The driver's bookkeeping that needs no Ray: which scored groups are too stale to train, the accounting that
must close (generated = trained + dropped_stale + filtered + left_over), and the groups it routes by reference
(a RoutedGroup per group, one TrainBatch per step that each learner rank assembles itself)."""

from __future__ import annotations

import pytest

from cluster.driver.batches import fill_batch
from cluster.driver.state import (
    Accounting,
    Chunk,
    RoutedGroup,
    request_seed,
    routed,
    split_by_staleness,
    train_batch,
)
from protos import Completion, GroupHeader, GroupScores, RolloutGroup, TrainBatch
from tests.support.samples import placeholder_sample
from tests.support.synthetic import reward


def rollout_group(group_id: str, policy_version: int, tokens: int = 1) -> RolloutGroup:
    completions = [
        Completion(text=f"{group_id}/{j}", token_ids=[1] * tokens, logprobs=[-0.5] * tokens) for j in range(2)
    ]
    return RolloutGroup(
        temperature=1.0,
        max_tokens=64,
        prompt_token_ids=[1, 2, 3],
        group_id=group_id,
        sample_id=f"s-{group_id}",
        policy_version=policy_version,
        completions=completions,
    )


def scores(group_id: str, totals=(1.0, 0.5)) -> GroupScores:
    return GroupScores(group_id=group_id, scores=[reward(t) for t in totals])


def scored(group_id: str, policy_version: int) -> RoutedGroup:
    # the refs are opaque to the driver's bookkeeping: strings stand in for ObjectRefs here
    header = GroupHeader.of(rollout_group(group_id, policy_version))
    return RoutedGroup(0, 0, header, scores(group_id), f"rollout-{group_id}", f"sample-{group_id}")


def ids(items) -> list[str]:
    return [r.header.group_id for r in items]


def test_a_header_carries_what_the_driver_reads_of_a_group():
    group = rollout_group("c3-1", policy_version=7, tokens=5)
    h = GroupHeader.of(group)
    assert (h.group_id, h.sample_id, h.policy_version) == ("c3-1", "s-c3-1", 7)
    assert h.completions == 2 and h.completion_tokens == 10


def test_routed_joins_headers_and_scores_in_order_and_refuses_a_mismatch():
    groups = [rollout_group("c2-0", 1), rollout_group("c2-1", 1)]
    chunk = Chunk(
        2, ["s0", "s1"], [{}, {}], open=2, rollout="r2", headers=[GroupHeader.of(g) for g in groups]
    )
    out = routed(chunk, [scores("c2-0"), scores("c2-1", (1.0, 1.0))])
    assert [(r.chunk_id, r.index, r.sample, r.rollout) for r in out] == [
        (2, 0, "s0", "r2"),
        (2, 1, "s1", "r2"),
    ]
    assert [r.zero_variance for r in out] == [False, True]
    with pytest.raises(ValueError, match="scores of group 'c2-1' for group 'c2-0'"):
        routed(chunk, [scores("c2-1"), scores("c2-0")])


def test_a_train_batch_names_each_rollout_once_and_every_rank_assembles_the_same_groups():
    """Groups of two chunks, picked out of order: the learner gets each rollout ref once, then one sample ref
    per group; assembling the resolved values gives exactly the groups and samples picked, joined with their
    scores."""
    rollouts = {0: [rollout_group("c0-0", 0), rollout_group("c0-1", 0)], 1: [rollout_group("c1-0", 1)]}
    batch = [
        RoutedGroup(1, 0, GroupHeader.of(rollouts[1][0]), scores("c1-0"), "ref-c1", "sample-c1-0"),
        RoutedGroup(0, 1, GroupHeader.of(rollouts[0][1]), scores("c0-1"), "ref-c0", "sample-c0-1"),
    ]
    tb, refs = train_batch(batch)
    assert refs == ["ref-c1", "ref-c0", "sample-c1-0", "sample-c0-1"] and tb.rollouts == 2
    samples = {i: placeholder_sample(f"s-{g}") for i, g in enumerate(("c1-0", "c0-1"))}
    resolved = [rollouts[1], rollouts[0], samples[0], samples[1]]  # what Ray hands each rank
    groups, got = TrainBatch.model_validate(tb.model_dump()).assemble(resolved)
    assert [g.group.group_id for g in groups] == ["c1-0", "c0-1"] and got == [samples[0], samples[1]]
    assert [g.totals for g in groups] == [[1.0, 0.5], [1.0, 0.5]]
    with pytest.raises(ValueError, match="pass one sample per pick"):
        tb.assemble(resolved[:3])


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


def test_groups_whose_rollout_was_lost_are_generated_again_once_per_chunk_keeping_their_chunk():
    """A node that held rollouts died: the groups' requests and sample refs go out again, one chunk per chunk
    they came in (the chunk id is kept, so training them closes the original chunk), marked as generated again
    (their groups were counted when first generated)."""
    from cluster.driver.state import regeneration

    def routed_group(chunk_id: int, i: int) -> RoutedGroup:
        r = rollout_group(f"c{chunk_id}-{i}", 0)
        return RoutedGroup(
            chunk_id,
            i,
            GroupHeader.of(r),
            scores(r.group_id),
            f"lost-{chunk_id}",
            f"s{chunk_id}{i}",
            request=f"request-c{chunk_id}-{i}",
        )

    again = regeneration([routed_group(3, 1), routed_group(5, 0), routed_group(3, 0)])
    assert [(c.chunk_id, c.refs, c.requests, c.counted) for c in again] == [
        (3, ["s31", "s30"], ["request-c3-1", "request-c3-0"], True),
        (5, ["s50"], ["request-c5-0"], True),
    ]
    assert all(c.rollout is None and c.headers == [] and c.open == 0 for c in again)


def test_a_lost_object_is_told_from_an_actor_error_however_ray_wraps_it():
    from ray.exceptions import ObjectLostError, OwnerDiedError

    from cluster.pools.actor_pool import lost_object

    lost = ObjectLostError("ab" * 14, None, "")
    assert lost_object(lost) and lost_object(OwnerDiedError("ab" * 14, None, ""))
    try:
        raise RuntimeError("learner rank failed") from lost
    except RuntimeError as wrapped:
        assert lost_object(wrapped)
    assert not lost_object(ValueError("bad batch")) and not lost_object(None)
    from cluster.pools.learner_group import LearnerDied

    died = LearnerDied("learner-1", "node-a", "the actor died unexpectedly")  # its `cause` is a text
    assert not lost_object(died)


def test_a_checkpoint_a_learner_rank_could_not_write_ends_the_job_with_its_message(ray_local, tmp_path):
    """learner rank -> driver -> `segr1 train`: the rank's CheckpointError (disk full here) reaches the user as one
    CheckpointFailed, without Ray's tracebacks, saying the earlier checkpoint is there to --resume from."""
    import errno

    from cluster.driver.recovery import CheckpointFailed, checkpoint_failed
    from cluster.launch import _get_run
    from learner.checkpoint import save_checkpoint
    from tests.support.checkpoints import empty_optimizer, empty_policy

    ray = ray_local
    root = str(tmp_path / "checkpoints")

    def policy(folder, fail=False):
        empty_policy(folder)
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    @ray.remote
    def rank_saves(step: int, fail: bool) -> str:
        return str(save_checkpoint(root, step, {}, lambda f: policy(f, fail), empty_optimizer))

    @ray.remote
    def driver(step: int) -> str:
        try:
            return ray.get(rank_saves.remote(step, True))
        except ray.exceptions.RayTaskError as err:
            raise checkpoint_failed(err, root) from None

    with pytest.raises(CheckpointFailed) as first:
        _get_run(driver.remote(1))
    assert not first.value.resumable and "there is no earlier checkpoint" in str(first.value)
    ray.get(rank_saves.remote(1, False))
    with pytest.raises(CheckpointFailed) as second:
        _get_run(driver.remote(2))
    message = str(second.value)
    assert second.value.resumable and "Traceback" not in message, message
    assert message.startswith(f"the learner could not write a checkpoint: checkpoint {root}/step-000002"), (
        message
    )
    assert "[Errno 28] No space left on device" in message and f"free space under {root}" in message, message
    assert f"the newest complete checkpoint is still {root}/step-000001" in message, message


def test_a_checkpoint_names_the_open_samples_and_a_restore_generates_exactly_those_first(synthetic_data):
    """Async mode's pipeline at a checkpoint: chunk A half trained, chunk B still generating. The checkpoint keeps
    the reader where it is and names the open samples (A's untrained half, all of B); a restored driver generates
    those first and then goes on where the reader was: nothing trained twice, nothing skipped. A's open groups
    were counted as generated, so the saved accounting leaves them out (they are counted again when generated
    again); B's were not counted yet."""
    from cluster.config import TrainConfig
    from cluster.data.reader import DatasetReader
    from cluster.driver.state import Accounting, Chunk, Samples, open_work

    cfg = TrainConfig.model_validate({"model": {"policy": "unused"}, "data": {"train": str(synthetic_data)}})
    samples = Samples(DatasetReader.from_config(cfg))
    a, a_at = samples.read(4)
    b, b_at = samples.read(4)
    chunk_a = Chunk(0, [], a_at, open=2, closed={0, 2}, counted=True)
    chunk_b = Chunk(1, [], b_at, open=4)
    replay, saved = open_work([chunk_b, chunk_a, Chunk(2, [], [], open=0)], Accounting(4, groups_trained=2))
    assert replay == [a_at[1], a_at[3], *b_at]
    assert saved["groups_generated"] == 2 and Accounting(**saved).groups_lost == 0

    restored = Samples(DatasetReader.from_config(cfg))
    restored.restore(samples.reader.state_dict(), replay)
    got, got_at = restored.read(8)
    after, _ = samples.read(2)  # the uninterrupted run's next samples
    assert [s.id for s in got] == [a[1].id, a[3].id, *(s.id for s in b), *(s.id for s in after)]
    assert got_at[:6] == replay  # a second checkpoint names them by the same cursors
