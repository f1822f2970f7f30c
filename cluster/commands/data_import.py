"""`segr1 data import --format FORMAT --src DIR --out DIR [--split S] [--strict] [--trust-pickle]`.

Registered under `segr1 data` by cluster/commands/data.py (`data_import.register(dsub)`).
"""

from __future__ import annotations

import argparse
import os

from cluster.commands.common import CommandError

FORMATS = (
    "folder",
    "cod10k",
    "camo",
    "nc4k",
    "duts",
    "dut-omron",
    "hku-is",
    "ecssd",
    "dis5k",
    "refcoco",
    "refcoco+",
    "refcocog",
    "reasonseg",
)

EPILOG = """layouts (see docs/evaluation.md):
  folder     --images DIR --masks DIR (paired by file stem)
  cod10k     Train|Test/Image + GT_Object (COD10K-v3); NonCAM images left out unless --include-noncam
  camo       Images/Train|Test + GT (CAMO-V.1.0-CVIU2019)
  nc4k       Imgs + GT             duts       DUTS-TR/DUTS-TR-Image + DUTS-TR-Mask (DUTS-TE-... for test)
  dut-omron  DUT-OMRON-image + pixelwiseGT-new-PNG      hku-is  imgs + gt      ecssd  images + ground_truth_mask
  dis5k      DIS-TR|DIS-VD|DIS-TE1..4 / im + gt (split train, val, te1..te4, test = TE1..4)
  refcoco*   instances.json + refs(unc|umd).p (+ --images COCO train2014); needs --trust-pickle
  reasonseg  train|val|test/<name>.jpg + <name>.json
"""


def register(dsub) -> None:
    """Add the `import` action to the `segr1 data` subparsers."""
    p = dsub.add_parser(
        "import",
        help="import COD10K, CAMO, DUTS, DIS5K, RefCOCO, ReasonSeg, ... from a local folder",
        description="Import a data set from its distribution layout into Parquet shards (protos.DATASET_SCHEMA).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="the data set's format")
    p.add_argument("--src", help="the data set's root folder (not for --format folder)")
    p.add_argument("--out", required=True, help="output folder for the shards and import_report.json")
    p.add_argument("--split", help="split to import (default depends on the format: train, test or val)")
    p.add_argument(
        "--images", help="folder: the images; refcoco*: COCO train2014; others: override the layout"
    )
    p.add_argument("--masks", help="folder: the masks; others: override the layout (with --images)")
    p.add_argument("--strict", action="store_true", help="any missing, corrupt or mismatched file is fatal")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="refcoco*: allow reading refs(*.p), a Python pickle (only for files from a source you trust)",
    )
    p.add_argument("--include-noncam", action="store_true", help="cod10k: keep the NonCAM images")
    p.add_argument(
        "--all-texts", action="store_true", help="reasonseg: one row per question, not the first only"
    )
    p.add_argument("--source", help="the rows' `source` name (default: the format)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--shard-rows", type=int, default=256, help="rows per Parquet shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cluster.data.importers import ImportError_, ImportOptions, import_dataset

    if args.shard_rows < 1 or args.workers < 1:
        raise CommandError("--shard-rows and --workers must be >= 1", exit_code=2)
    opts = ImportOptions(
        format=args.format,
        out=Path(args.out),
        src=Path(args.src) if args.src else None,
        split=args.split,
        images=Path(args.images) if args.images else None,
        masks=Path(args.masks) if args.masks else None,
        strict=args.strict,
        trust_pickle=args.trust_pickle,
        include_noncam=args.include_noncam,
        all_texts=args.all_texts,
        source=args.source,
        workers=args.workers,
        shard_rows=args.shard_rows,
        progress=not args.no_progress,
    )
    try:
        report = import_dataset(opts)
    except ImportError_ as err:
        raise CommandError(str(err)) from None
    dropped = "".join(f", dropped {n} {why}" for why, n in report.dropped.items())
    print(
        f"imported {report.imported} rows ({report.format}/{report.split}) into {len(report.shards)} shard(s) "
        f"in {args.out}; skipped {len(report.skipped)}{dropped}; report: {Path(args.out) / 'import_report.json'}"
    )
    return 0
