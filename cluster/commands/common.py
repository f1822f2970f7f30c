"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse


class CommandError(Exception):
    """A failure to report to the user without a traceback; the message says what to do."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see cluster/configs/); defaults when omitted")
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. grpo.group_size=8"
    )


def load_config_from_args(args: argparse.Namespace):
    from cluster.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        raise CommandError(str(err), exit_code=2) from None
