"""`segr1 sft`: SFT warm-up on answers derived from masks (box, foreground/background points, short think)."""

from __future__ import annotations

import argparse

from cluster.commands.common import CommandError, add_config_args, load_config_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "sft",
        help="SFT warm-up on answers derived from masks",
        description="Supervised warm-up of the policy (model.policy) on data.train: the target answer of each "
        "image is derived from its mask in the policy's NxN pixel space. Saves a plain Hugging Face folder.",
    )
    add_config_args(p)
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    p.add_argument(
        "--out", help="output folder of the trained policy (default: <metrics.run_dir>/sft-policy)"
    )
    p.add_argument(
        "--lr", type=float, default=3e-3, help="peak learning rate, cosine after warm-up (default 3e-3)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="samples per step (default 16)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps (default 10)")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds (then save)")
    p.add_argument("--fg-points", type=int, default=2, help="foreground points per answer (default 2)")
    p.add_argument("--bg-points", type=int, default=1, help="background points per answer (default 1)")
    p.add_argument(
        "--turns",
        type=int,
        default=None,
        help="2: teach the refine turn too (a shifted first answer, the picture of its mask, then the corrected "
        "answer or a stop) for --refine-share of the examples; default: 2 when rollout.max_turns > 1, else 1",
    )
    p.add_argument(
        "--refine-share",
        type=float,
        default=0.5,
        help="with --turns 2: share of two-turn examples (default 0.5)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise CommandError(f"--steps {args.steps} must be >= 1", exit_code=2)
    if args.batch_size < 1:
        raise CommandError(f"--batch-size {args.batch_size} must be >= 1", exit_code=2)
    if not 0 < args.lr <= 1:
        raise CommandError(f"--lr {args.lr} must be in (0, 1]", exit_code=2)
    if args.fg_points < 1 or args.bg_points < 0:
        raise CommandError("--fg-points must be >= 1 and --bg-points >= 0", exit_code=2)
    if args.turns not in (None, 1, 2) or not 0 <= args.refine_share <= 1:
        raise CommandError("--turns must be 1 or 2 and --refine-share in [0, 1]", exit_code=2)


def run(args: argparse.Namespace) -> int:
    _check(args)
    cfg = load_config_from_args(args)
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from cluster.data.reader import DatasetError, DatasetReader
    from learner.sft import run_sft
    from learner.sft_turns import default_turns

    out = Path(args.out) if args.out else Path(cfg.metrics.run_dir) / "sft-policy"
    if not Path(cfg.model.policy).is_dir():
        raise CommandError(
            f"model.policy={cfg.model.policy} is not a folder; build one with `segr1 models tiny --out runs/models`",
            exit_code=2,
        )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bar = tqdm(total=args.steps, desc="sft", unit="step", disable=args.no_progress, leave=False)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        result = run_sft(
            cfg.policy_spec(),
            cfg.learner,
            DatasetReader.from_config(cfg).next_batch,
            args.steps,
            out,
            lr=args.lr,
            batch_size=args.batch_size,
            progress=progress,
            time_limit_s=args.time_limit,
            warmup_steps=args.warmup_steps,
            n_fg=args.fg_points,
            n_bg=args.bg_points,
            turns=args.turns or default_turns(cfg.rollout.max_turns),
            refine_share=args.refine_share,
        )
    except DatasetError as err:
        raise CommandError(str(err), exit_code=2) from None
    finally:
        bar.close()
    print(
        f"sft: {result.steps} steps in {result.seconds:.1f}s, loss {result.first_loss:.3f} -> "
        f"{result.last_loss:.3f}; policy saved to {result.out_dir}"
        + (
            f" ({result.skipped_empty_masks} samples with empty masks skipped)"
            if result.skipped_empty_masks
            else ""
        )
    )
    return 0
