"""`segr1 generate`: sample completions from a policy."""

from __future__ import annotations

from cluster.commands.common import not_built


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample completions from a policy")
    p.set_defaults(func=not_built("segr1 generate", "the rollout-actors issue"))
