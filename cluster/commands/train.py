"""`segr1 train --config FILE [key.sub=value ...] [--dry-run] [--resume]`: GRPO training."""

from __future__ import annotations

import argparse

from cluster.commands.common import CommandError, add_config_args, load_config_from_args


def register(sub) -> None:
    p = sub.add_parser("train", help="GRPO training on local Ray or RAY_ADDRESS")
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.config import dump_config

    cfg = load_config_from_args(args)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    raise CommandError(
        "training is not built yet (the training-job issue); use --dry-run to check a config", 2
    )
