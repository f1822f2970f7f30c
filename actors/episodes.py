"""The next turn of a rollout group's episodes (rollout.max_turns > 1): each completion whose episode goes on
sees the picture the reward pool drew of its newest mask (reward_service: score_turn) after the refine text, and
answers once more; the answer joins its episode (runtime.turns.join_turns), token for token what the engine fed
and generated, so the learner scores exactly that sequence.

A group's episodes take their turns together (one engine call for every episode of the call's groups that goes
on); those that ended (a stop, an answer without a mask, the turn limit) stay as they are. A group keeps the
policy version of its first turn: the oldest of its turns, which bounds its staleness (a later turn may come from
a newer policy in async mode; each turn's behaviour logprobs are its own, so the learner's importance weights
see that).
"""

from __future__ import annotations

from collections.abc import Sequence

from actors.engine import GenerationBatch, NextTurn
from protos import Completion, RolloutGroup, RolloutRequest, Sample
from runtime.images import load_image, resize_for_policy
from runtime.turns import join_turns, last_answer, next_turn_ids

# turn t of completion j samples with the request's seed + j + TURN_SEED_STRIDE * (t - 1): another stream than
# any completion of the first turn (requests are spaced group_size apart, cluster/driver/state.request_seed)
TURN_SEED_STRIDE = 1_000_003


def turn_seed(seed: int | None, completion: int, turn: int) -> int | None:
    """The sampling seed of `turn` (1-based) of completion `completion`; None stays None (a fresh draw)."""
    if seed is None:
        return None
    return (seed + completion + TURN_SEED_STRIDE * (turn - 1)) % (2**31)


def next_turns(
    engine,
    image_size: int,
    requests: Sequence[RolloutRequest],
    groups: Sequence[RolloutGroup],
    pictures: Sequence[Sequence[bytes | None]],
    samples: Sequence[Sample],
) -> tuple[list[RolloutGroup], GenerationBatch | None]:
    """Each group with its episodes that go on (a picture, not None) one turn longer; (the groups, the engine's
    batch, None when no episode went on)."""
    refine = engine.prompts.refine_text(image_size)
    turns: list[NextTurn] = []
    where: list[tuple[int, int, bytes]] = []
    for g, (req, group, shown, sample) in enumerate(zip(requests, groups, pictures, samples, strict=True)):
        if all(png is None for png in shown):  # none of the group's episodes goes on
            continue
        image = resize_for_policy(sample.image, image_size)
        for c, (episode, png) in enumerate(zip(group.completions, shown, strict=True)):
            if png is None:
                continue
            start = last_answer(episode)
            prompt = [*group.prompt_token_ids, *episode.token_ids[:start]]
            ids = next_turn_ids(engine.tokenizer, prompt, episode.token_ids[start:], refine)
            seed = turn_seed(req.sampling.seed, c, len(episode.texts) + 1)
            sampling = req.sampling.model_copy(update={"seed": seed})
            # PIL, as every engine takes them
            shown_so_far = [load_image(p) for p in (*episode.pictures, png)]
            turns.append(NextTurn(ids, [image, *shown_so_far], sampling))
            where.append((g, c, png))
    if not turns:
        return list(groups), None
    batch = engine.generate_turns(turns)
    completions: list[list[Completion]] = [list(group.completions) for group in groups]
    for (g, c, png), prompt, answers in zip(where, batch.prompt_token_ids, batch.completions, strict=True):
        turn = [(groups[g].prompt_token_ids, completions[g][c]), (prompt, answers[0])]
        completions[g][c] = join_turns(turn, [png])
    out = [
        group.model_copy(update={"completions": comps})
        for group, comps in zip(groups, completions, strict=True)
    ]
    return out, batch
