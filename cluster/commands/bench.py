"""`segr1 bench`: run a benchmark."""

from __future__ import annotations

from cluster.commands.common import not_built


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark")
    p.set_defaults(func=not_built("segr1 bench", "each pool's issue"))
