"""Rewards of episodes of several turns (rollout.max_turns > 1): the policy answered, saw the mask its prompts
made, and answered again (new prompts, or a stop that keeps the mask it was shown).

Every turn is parsed and segmented on the same image (one encode: the items of one image share it, and the
embedding cache keeps it between the calls of an episode), and scored on its own as a one-turn answer is. The
episode's reward is its last turn's, with
    format      = the mean of every turn's format term (a garbled turn costs its share)
    refine_gain = IoU of the last turn's mask - IoU of the first's (0 for one turn)
    total       = the last turn's total with that format, + w.refine_gain * refine_gain.
A stop scores the mask (and box) it was shown; an answer that does not parse ends the episode and scores as an
unparsable answer does (no mask). A group at turn 1 scores exactly as without episodes.

With the group's scores after its previous turn (RewardRequest.previous, what the training driver sends) only the
newest turn's answers are parsed and segmented: the earlier turns' terms are those scores' (`continue_items`,
`continued_rewards`); the result is the same as scoring every turn again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protos import CompletionReward, ParsedAnswer, RewardComponents
from reward_service.predictor import NO_TURN, Item
from reward_service.rewards import GroundTruth, box_terms, combine, scores_from_counts


def continue_items(parse, texts: Sequence[Sequence[str]], image, key: bytes) -> list[Item]:
    """`turn_items` (reward_service/predictor.py) of the newest turn only: one item holding each episode's answer
    of the group's newest turn (NO_TURN for the episodes that ended before it)."""
    turns = max(len(t) for t in texts)
    return [Item(image, key, [parse(t[-1], turns > 1) if len(t) == turns else NO_TURN for t in texts])]


def continued_rewards(
    item: Item, counts: Sequence, truth: GroundTruth, weights, previous: Sequence[CompletionReward]
):
    """`episode_rewards` from the previous turn's scores and the newest turn (`continue_items`' one item): an
    episode that ended before it keeps its reward; one that took it adds the new turn's terms (a stop: the terms
    of the turn it keeps)."""
    for c, (answer, prior) in enumerate(zip(item.answers, previous, strict=True)):
        if answer is NO_TURN:
            yield prior.model_copy(update={"goes_on": False}), prior.parse_failure
            continue
        per_turn = list(prior.turns) or [prior.rewards]
        if answer.stop:
            per_turn.append(per_turn[-1])
        else:
            scores = None if counts[c] is None else scores_from_counts(counts[c], truth)
            per_turn.append(
                combine(answer.ok, scores, weights, box_terms([p.box for p in answer.prompts], truth))
            )
        yield _episode(per_turn, answer, True, weights), answer.failure


def episode_rewards(items: Sequence[Item], counts: Sequence[Sequence], truth: GroundTruth, weights):
    """Each completion's CompletionReward from its turns. `counts[k][c]`: mask_counts of turn k's mask of
    completion c (None: no mask). Yields (reward, the failure of its last turn)."""
    for c in range(len(items[0].answers)):
        per_turn: list[RewardComponents] = []
        shown, shown_boxes, last = None, [], items[0].answers[c]
        for k, item in enumerate(items):
            answer = item.answers[c]
            if answer is NO_TURN:
                break
            last = answer
            if not answer.stop:
                shown, shown_boxes = counts[k][c], [p.box for p in answer.prompts]
            scores = None if shown is None else scores_from_counts(shown, truth)
            per_turn.append(combine(answer.ok, scores, weights, box_terms(shown_boxes, truth)))
            if not answer.ok:
                break
        yield _episode(per_turn, last, len(per_turn) == len(items), weights), last.failure


def _episode(per_turn: list[RewardComponents], last: ParsedAnswer, latest: bool, weights) -> CompletionReward:
    end = per_turn[-1]
    fmt = float(np.mean([r.format for r in per_turn]))
    gain = end.iou - per_turn[0].iou if len(per_turn) > 1 else 0.0
    total = end.total + weights.format * (fmt - end.format) + weights.refine_gain * gain
    rewards = end.model_copy(update={"format": fmt, "refine_gain": gain, "total": total})
    return CompletionReward(
        rewards=rewards,
        parse_ok=last.ok,
        parse_failure=last.failure,
        turns=per_turn if len(per_turn) > 1 else [],
        stop=last.stop,
        goes_on=latest and last.ok and not last.stop,
    )
