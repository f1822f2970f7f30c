"""`segr1 sft`: SFT warm-up on answers derived from masks."""

from __future__ import annotations

from cluster.commands.common import not_built


def register(sub) -> None:
    p = sub.add_parser("sft", help="SFT warm-up on answers derived from masks")
    p.set_defaults(func=not_built("segr1 sft", "the learner issue"))
