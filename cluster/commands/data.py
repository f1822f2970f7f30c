"""`segr1 data synth|import|check`: make, import and check data sets (Parquet shards in protos.DATASET_SCHEMA)."""

from __future__ import annotations

import argparse

from cluster.commands import data_import
from cluster.commands.common import CommandError

SYNTH_KINDS = ("camouflaged", "salient", "mixed", "single")


def register(sub) -> None:
    p = sub.add_parser("data", help="make, import or check data sets (Parquet shards)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _register_synth(dsub)
    data_import.register(dsub)
    c = dsub.add_parser("check", help="read every row of a data set and report corrupt ones")
    c.add_argument("path", nargs="+", help="folder(s) of Parquet shards or .parquet files")
    c.add_argument("--max-reports", type=int, default=20, help="corrupt rows to print (default 20)")
    c.set_defaults(func=run_check)


def _register_synth(dsub) -> None:
    s = dsub.add_parser(
        "synth",
        help="synthetic images with exact masks (camouflaged / salient targets among distractors)",
        description="Write a synthetic segmentation data set as Parquet shards (see docs/data.md).",
    )
    s.add_argument("--out", required=True, help="output folder (shards of the same split are replaced)")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="seed; the same arguments give identical bytes")
    s.add_argument("--kind", choices=SYNTH_KINDS, default="mixed", help="target kind (default mixed)")
    s.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    s.add_argument("--shard-size", type=int, default=512, help="rows per Parquet shard (default 512)")
    s.add_argument("--split", default="train", help="the rows' split, also the shard name prefix")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from cluster.data.synth import MAX_SIZE, MIN_SIZE, write_synthetic

    if args.n < 1 or args.shard_size < 1:
        raise CommandError(f"--n ({args.n}) and --shard-size ({args.shard_size}) must be >= 1", exit_code=2)
    if not MIN_SIZE <= args.size <= MAX_SIZE:
        raise CommandError(f"--size {args.size} is out of range; use {MIN_SIZE}..{MAX_SIZE}", exit_code=2)
    if args.seed < 0:
        raise CommandError(f"--seed {args.seed} must be >= 0", exit_code=2)
    if not args.split or "/" in args.split or not args.split.replace("-", "").replace("_", "").isalnum():
        raise CommandError(f"--split {args.split!r}: use letters, digits, '-' or '_'", exit_code=2)
    t0 = time.perf_counter()
    try:
        with tqdm(total=args.n, desc="synth", unit="img", disable=args.no_progress, leave=False) as bar:
            result = write_synthetic(
                args.out, args.n, args.seed, args.kind, args.size, args.shard_size, args.split, bar.update
            )
    except OSError as err:
        raise CommandError(f"cannot write to --out {args.out}: {err}") from None
    if result.replaced:
        print(f"replaced {len(result.replaced)} earlier {args.split} shard(s) in {args.out}")
    print(
        f"wrote {result.rows} {args.kind} images ({args.size}x{args.size}, seed {args.seed}, split {args.split}) "
        f"into {len(result.paths)} shard(s) in {args.out} in {time.perf_counter() - t0:.1f}s"
    )
    return 0


def run_check(args: argparse.Namespace) -> int:
    from collections import Counter

    from cluster.data.reader import CorruptReport, DatasetError, iter_samples, resolve_shards

    try:
        shards = resolve_shards(args.path)
        reports: list[CorruptReport] = []
        kinds: Counter = Counter()
        for sample in iter_samples(shards, reports=reports):
            kinds[(sample.source, sample.split, sample.task)] += 1
    except DatasetError as err:
        raise CommandError(str(err)) from None
    total = sum(kinds.values())
    print(f"{total} valid rows, {len(reports)} corrupt, in {len(shards)} shard(s)")
    for (source, split, task), count in sorted(kinds.items()):
        print(f"  {source}/{split}/{task}: {count}")
    for report in reports[: args.max_reports]:
        print(f"  corrupt: {report}")
    if len(reports) > args.max_reports:
        print(f"  ... and {len(reports) - args.max_reports} more")
    return 1 if reports else 0
