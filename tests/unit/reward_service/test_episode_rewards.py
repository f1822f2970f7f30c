"""Episodes of several turns on the reward worker (reward_service/episodes.py, GrabCut): each turn scored as a
one-turn answer is, the episode's reward its last turn's with the mean format and the IoU gained, a stop keeping
the mask it was shown, a garbled turn ending the episode; pictures for the episodes that go on."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.config import TrainConfig
from protos import Completion, RolloutGroup
from protos.answer import format_answer, format_stop
from reward_service.worker import RewardWorker
from runtime.images import load_image
from tests.unit.reward_service.test_reward_worker import GOOD, POLICY, _group, _sample

PART = format_answer([[8, 8, 30, 30]], [[26, 26]], [1], "a corner of it")  # a box on the disk's edge


def _episode(texts: list[str]) -> Completion:
    """An episode whose turns answered `texts` (the token ids do not matter to the reward)."""
    n = len(texts)
    return Completion(
        text=texts[-1],
        token_ids=list(range(2 * n)),
        logprobs=[-0.5] * (2 * n),
        policy_mask=[1, 0] * (n - 1) + [1, 1],
        earlier_texts=texts[:-1],
    )


def _episodes(sid: str, episodes: list[list[str]]) -> RolloutGroup:
    return _group(sid, ["x"] * len(episodes)).model_copy(
        update={"completions": [_episode(t) for t in episodes]}
    )


@pytest.fixture(scope="module")
def worker():
    cfg = TrainConfig(data={"image_size": POLICY}, reward={"weights": {"refine_gain": 2.0}})
    return RewardWorker(cfg.policy_spec(), cfg.reward, name="w-episodes")


def test_an_episode_scores_its_last_turn_with_the_mean_format_and_the_iou_gained(worker):
    sample, _, _ = _sample("s0", 0)
    one = worker.score([_group("s0", [PART, GOOD])], sample)[0].scores
    part, good = one
    group = _episodes(
        "s0", [[PART, GOOD], [PART, format_stop("the mask covers it")], [PART, "garbled"], [GOOD]]
    )
    refined, stopped, garbled, single = worker.score([group], sample)[0].scores
    assert refined.turns == [part.rewards, good.rewards] and refined.num_turns == 2
    gain = good.rewards.iou - part.rewards.iou
    assert gain > 0.5 and refined.rewards.refine_gain == pytest.approx(gain)
    assert refined.rewards.total == pytest.approx(good.rewards.total + 2.0 * gain)
    assert refined.parse_ok and not refined.stop and refined.goes_on
    # a stop keeps the mask it was shown: no gain, turn 1's terms, formats 1 and 1
    assert stopped.stop and not stopped.goes_on and stopped.rewards.refine_gain == 0.0
    assert stopped.rewards.iou == part.rewards.iou and stopped.rewards.total == pytest.approx(
        part.rewards.total
    )
    # a garbled turn ends the episode with no mask; its format counts half
    assert not garbled.parse_ok and garbled.parse_failure == "missing_bbox" and not garbled.goes_on
    assert garbled.rewards.format == 0.5 and garbled.rewards.iou == 0.0
    assert garbled.rewards.refine_gain == pytest.approx(-part.rewards.iou)
    # an episode that ended at turn 1 (its second answer never came) scores as that answer, and does not go on
    assert single.turns == [] and single.rewards == good.rewards and not single.goes_on and single.parse_ok


def test_turn_one_scores_as_without_episodes_and_pictures_follow_what_goes_on(worker):
    sample, image, _ = _sample("s1", 1)
    group = _group("s1", [GOOD, "garbled", PART])
    scores, pictures = worker.score_turn([group], sample)
    # one code path: a turn-1 group scores as a one-turn group
    assert scores[0].scores == worker.score([group], sample)[0].scores
    assert [s.goes_on for s in scores[0].scores] == [True, False, True]
    assert pictures[0][1] is None
    for png in (pictures[0][0], pictures[0][2]):
        picture = np.asarray(load_image(png))  # (POLICY, POLICY, 3): the image with the mask tinted on it
        assert picture.shape == (POLICY, POLICY, 3)
    assert not np.array_equal(pictures[0][0], pictures[0][2])  # each completion's own mask and prompts


def test_a_later_turn_with_the_previous_scores_segments_only_its_own_answers(worker):
    """What the training driver sends (RewardRequest.previous): the same rewards as scoring every turn again,
    for the decodes of the newest turn only."""
    sample, _, _ = _sample("s2", 2)
    first = worker.score([_group("s2", [PART, PART, PART, GOOD])], sample)
    group = _episodes(
        "s2", [[PART, GOOD], [PART, format_stop("the mask covers it")], [PART, "garbled"], [GOOD]]
    )
    group = group.model_copy(update={"group_id": first[0].group_id})
    decoded = worker.segmenter.prompts_decoded
    again = worker.score([group], sample)[0]
    every_turn = worker.segmenter.prompts_decoded - decoded
    continued = worker.score([group], sample, previous=first)[0]
    newest_only = worker.segmenter.prompts_decoded - decoded - every_turn
    assert continued.scores == again.scores
    assert (
        newest_only == 1 < every_turn
    )  # GOOD's one box of turn 2; the stop and the garbled answer have none
    # the episode's reward seconds: the first turn's and this call's (what a step's score_s sums)
    assert continued.total_s > first[0].total_s > 0
    assert continued.decode_s >= first[0].decode_s and continued.encode_s >= first[0].encode_s


def test_predict_gives_an_episode_its_last_mask_with_every_earlier_turn(worker):
    """The evaluation path (validation during training predicts through the reward pool): an episode's prediction
    is its last turn's mask, a stop's is the mask it was shown, a garbled turn has none; the earlier turns' are
    kept in order, each equal to that answer's prediction alone; all turns of one image take one encode."""
    sample, _, _ = _sample("s3", 3)
    (part, good, garbled) = worker.predict([_group("s3", [PART, GOOD, "garbled"])], sample)[0]
    group = _episodes(
        "s3", [[PART, GOOD], [PART, format_stop("the mask covers it")], [PART, "garbled"], [GOOD]]
    )
    encodes = worker.segmenter.encode_calls
    refined, stopped, broken, single = worker.predict([group], sample)[0]
    assert worker.segmenter.encode_calls - encodes <= 1
    for episode in (refined, stopped, broken):
        assert episode.turns == 2 and np.array_equal(episode.first.mask, part.mask)
        assert episode.first.boxes == part.boxes and episode.earlier[0].earlier == []
    assert np.array_equal(refined.mask, good.mask) and refined.boxes == good.boxes and not refined.stop
    assert stopped.stop and stopped.parse_ok and np.array_equal(stopped.mask, part.mask)
    assert stopped.boxes == part.boxes
    assert broken.mask is None and not broken.parse_ok and broken.failure == garbled.failure
    assert single.turns == 1 and single.earlier == [] and np.array_equal(single.mask, good.mask)
