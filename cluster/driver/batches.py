"""Synchronous mode's batch: generate and score B prompts, and with `grpo.filter_zero_variance` draw more until
the batch holds B informative groups (DAPO's dynamic sampling), bounded by `grpo.max_fill_rounds`.

Each extra round asks for exactly the groups still missing, so a step never holds more than B groups and nothing
is carried over to a later step (every trained group keeps staleness 0). Every group of every round is counted
by the driver as it arrives (generated) and as it leaves (filtered here, trained by the learner), so the
accounting closes: generated = trained + dropped_stale + filtered + left_over. When the rounds run out (a data
set, or a policy, with few informative prompts) the step trains on the informative groups it has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# draw(n): generate and score n new prompts; returns (the groups kept by the filter, RoutedGroups of
# cluster/driver/state.py, at most n of them; the rollout chunks the n prompts went out in)
Draw = Callable[[int], tuple[list[tuple[Any, Any]], list[Any]]]


@dataclass
class FilledBatch:
    """The groups to train on (at most batch_size), every chunk drawn for them, and the extra rounds it took."""

    kept: list[tuple[Any, Any]] = field(default_factory=list)
    chunks: list[Any] = field(default_factory=list)
    fill_rounds: int = 0


def fill_batch(draw: Draw, batch_size: int, refill: bool, max_fill_rounds: int) -> FilledBatch:
    """One round of batch_size prompts; then, when `refill` (grpo.filter_zero_variance), up to max_fill_rounds
    rounds of the missing count until batch_size groups are kept."""
    out = FilledBatch()
    want = batch_size
    while True:
        kept, chunks = draw(want)
        if len(kept) > want:
            raise RuntimeError(
                f"fill_batch: draw({want}) returned {len(kept)} groups; it may return at most {want}"
            )
        out.kept.extend(kept)
        out.chunks.extend(chunks)
        want = batch_size - len(out.kept)
        if not refill or want == 0 or out.fill_rounds >= max_fill_rounds:
            return out
        out.fill_rounds += 1
