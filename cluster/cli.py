"""`segr1`: the command line. Each subcommand lives in cluster/commands/<name>.py and imports heavy packages
(torch, ray, transformers) only when it runs, so `segr1 --help` is instant."""

from __future__ import annotations

import argparse
import sys

from cluster.commands import (
    bench,
    data,
    eval_job,
    eval_masks,
    generate,
    models,
    plan,
    predict,
    preflight,
    scale,
    score,
    sft,
    train,
)
from cluster.commands.common import CommandError

COMMANDS = (
    train,
    preflight,
    plan,
    sft,
    eval_job,
    eval_masks,
    predict,
    score,
    generate,
    data,
    models,
    scale,
    bench,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segr1",
        description="Seg-R1: train a vision-language model to segment with GRPO, on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as err:
        print(f"segr1 {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"segr1 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
