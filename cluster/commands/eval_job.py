"""`segr1 eval`: evaluate a checkpoint on a data set."""

from __future__ import annotations

from cluster.commands.common import not_built


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a data set")
    p.set_defaults(func=not_built("segr1 eval", "the datasets-and-evaluation issue"))
