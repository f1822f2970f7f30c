"""`segr1 eval-masks`: metrics of a folder of predicted masks."""

from __future__ import annotations

from cluster.commands.common import not_built


def register(sub) -> None:
    p = sub.add_parser("eval-masks", help="metrics of a folder of predicted masks")
    p.set_defaults(func=not_built("segr1 eval-masks", "the datasets-and-evaluation issue"))
