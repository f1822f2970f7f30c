"""`segr1 score`: score one completion against a ground-truth mask."""

from __future__ import annotations

from cluster.commands.common import not_built


def register(sub) -> None:
    p = sub.add_parser("score", help="score one completion against a ground-truth mask")
    p.set_defaults(func=not_built("segr1 score", "the reward-service issue"))
