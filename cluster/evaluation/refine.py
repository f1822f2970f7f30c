"""Episodes of several turns in-process (`segr1 predict --turns N`, `segr1 eval` with rollout.max_turns > 1):
after each answer the policy sees the mask its prompts made (runtime/overlay.feedback_image: the mask and the
prompts on the image, never the ground truth) with the refine text, and answers again: new prompts, or a stop that
keeps the mask it was shown.

An episode ends at a stop, at its N-th answer, or at an answer that does not parse (that turn has no mask, as
an unparsable single answer has none). Each next turn is built from the ids the engine reported and generated
(RolloutWorker.next_turns -> runtime/turns.py), so a turn's prompt is the previous turn's prompt and answer,
token for token, then the new user turn. Training and validation during training take their turns through the
pools instead (cluster/driver/loop.py, cluster/driver/validation.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from protos import RolloutGroup, Sample, SamplingConfig
from reward_service.predictor import kept_on_stop

logger = logging.getLogger(__name__)


@dataclass
class Turn:
    """One answer of an episode and the mask the episode stands at after it (a stop: the mask it was shown)."""

    text: str
    prediction: Any  # reward_service.predictor.CompletionPrediction; a stop's carries the kept mask
    prompt_ids: list[int]  # the prompt it was generated after, as the engine reported it
    answer_ids: list[int]  # the answer's token ids as generated
    picture: Any = None  # the PIL picture this answer was given (None for turn 1: the sample's image)

    @property
    def goes_on(self) -> bool:
        p = self.prediction
        return bool(p.parse_ok and not p.stop and p.mask is not None)


def refine(
    rollout,
    predictor,
    samples: Sequence[Sample],
    rgbs: Sequence[np.ndarray],
    groups: Sequence[RolloutGroup],
    first: Sequence[Any],
    turns: int,
    sampling: SamplingConfig,
) -> list[list[Turn]]:
    """Every sample's episode: turn 1 is completion 0 of its group (`first[i]`: its prediction), then up to
    `turns - 1` more. `rgbs[i]`: sample i's (H, W, 3) image, on which its masks are drawn."""
    from runtime.images import resize_for_policy
    from runtime.overlay import feedback_image

    size = rollout.policy.image_size
    episodes = [
        [Turn(g.completions[0].text, p, list(g.prompt_token_ids), list(g.completions[0].token_ids))]
        for g, p in zip(groups, first, strict=True)
    ]
    pictures = [[resize_for_policy(s.image, size)] for s in samples]
    for _ in range(turns - 1):
        active = [i for i, ep in enumerate(episodes) if ep[-1].goes_on]
        if not active:
            break
        for i in active:
            p = episodes[i][-1].prediction
            pictures[i].append(feedback_image(rgbs[i], p.mask, size, p.boxes, p.points, p.labels))
        last = [episodes[i][-1] for i in active]
        batch = rollout.next_turns(
            [t.prompt_ids for t in last],
            [t.answer_ids for t in last],
            [pictures[i] for i in active],
            sampling,
        )
        texts = [c[0].text for c in batch.completions]
        preds = predictor.predict_answers(texts, *[samples[i] for i in active])
        for k, i in enumerate(active):
            pred = preds[k]
            if pred.stop:  # the mask shown stands
                pred = kept_on_stop(episodes[i][-1].prediction, pred)
            answer = list(batch.completions[k][0].token_ids)
            episodes[i].append(Turn(texts[k], pred, batch.prompt_token_ids[k], answer, pictures[i][-1]))
    return episodes


def refine_chunk(
    rollout, predictor, chunk: Sequence[Sample], groups, preds, turns: int, sampling: SamplingConfig
) -> list:
    """Evaluation with `turns` > 1: every sample whose group and turn-1 prediction exist gets its episode (`refine`);
    returns each sample's last prediction, with its earlier turns' in `earlier` (CompletionPrediction). A sample
    without them, or whose later turns failed, keeps its first prediction (one turn)."""
    from runtime.images import decode_image

    final = list(preds)
    idx = [k for k, (g, p) in enumerate(zip(groups, preds, strict=True)) if g is not None and p is not None]
    if not idx:
        return final
    rgbs = [decode_image(chunk[k].image) for k in idx]
    first = ([chunk[k] for k in idx], rgbs, [groups[k] for k in idx], [preds[k] for k in idx])
    try:
        episodes = refine(rollout, predictor, *first, turns, sampling)
    except Exception as err:  # a failed later turn: the samples keep their first answer, counted as one turn
        logger.warning("eval: refining %d samples failed (%s); their first answers stand", len(idx), err)
        return final
    for k, episode in zip(idx, episodes, strict=True):
        final[k] = replace(episode[-1].prediction, earlier=[t.prediction for t in episode[:-1]])
    return final


def refinement_summary(results: Sequence, turns: int) -> dict:
    """The `refinement` entry of a summary (evaluation, validation) from its SampleResults: turns asked, mean
    turns taken, stop rate, mean IoU of the first turn's masks (the summary's mean_iou is the last turn's)."""
    n = max(1, len(results))
    return {
        "turns": turns,
        "turns_mean": sum(r.turns for r in results) / n,
        "stop_rate": sum(r.stop for r in results) / n,
        "turn1_mean_iou": float(np.mean([r.iou_turn1 for r in results])) if results else None,
    }
