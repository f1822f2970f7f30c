"""`segr1 train --config FILE [key.sub=value ...] [--dry-run] [--resume]`: GRPO training."""

from __future__ import annotations

import argparse
import json

from cluster.commands.common import add_config_args, load_config_from_args


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
    from cluster.launch import run_training

    summary = run_training(cfg, resume=args.resume)
    print(json.dumps(summary, indent=1))
    return 0 if summary["groups_lost"] == 0 else 1
