"""The pools' calls for one chunk, as closures over the actor the pool picks (retried as they are on another
actor when theirs dies): each returns the ref the pool waits on and keeps the refs the driver hands on
(the groups, the next turn's pictures) on the chunk, never reading them."""

from __future__ import annotations

from typing import Any

from cluster.driver.state import Chunk


def generate_by_ref(actor: Any, chunk: Chunk) -> Any:
    """A chunk's rollout call: the pool waits on the headers; the groups' ref is kept for the next calls."""
    headers, chunk.rollout = actor.generate_by_ref.options(num_returns=2).remote(chunk.requests, *chunk.refs)
    return headers


def score_by_ref(actor: Any, chunk: Chunk, last_turn: bool = True) -> Any:
    """A chunk's scoring call: the pool waits on the scores. When its episodes may go on (not `last_turn`,
    rollout.max_turns > 1) the next turn's pictures come back too, their ref kept for the next rollout call. A later
    turn sends the chunk's scores after the previous one: only the new turn's answers are segmented."""
    prev = {"previous": chunk.scores} if chunk.scores is not None else {}
    if last_turn:
        return actor.score.remote(chunk.rollout, *chunk.refs, **prev)
    scores, chunk.pictures = actor.score_turn.options(num_returns=2).remote(
        chunk.rollout, *chunk.refs, **prev
    )
    return scores


def next_turn_by_ref(actor: Any, chunk: Chunk, before: Any, pictures: Any) -> Any:
    """A chunk's next-turn call on its groups so far (`before`) and the pictures, by ref (captured when it was
    submitted, so a retry sends the same); the new groups' ref replaces the chunk's rollout."""
    headers, chunk.rollout = actor.next_turns_by_ref.options(num_returns=2).remote(
        chunk.requests, before, pictures, *chunk.refs
    )
    return headers
