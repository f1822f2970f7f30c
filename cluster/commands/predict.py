"""`segr1 predict`: masks and overlays for your own images."""

from __future__ import annotations

from cluster.commands.common import not_built


def register(sub) -> None:
    p = sub.add_parser("predict", help="masks and overlays for your own images")
    p.set_defaults(func=not_built("segr1 predict", "the datasets-and-evaluation issue"))
